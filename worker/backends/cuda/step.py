"""A step's rows and its device inputs, laid out on the host (pure: tested without a GPU).

The executor runs every token of a step as one row of its activations. Decode tokens (one
per sequence) come first, rows 0..D-1, in the order given; then each prompt chunk's tokens,
one contiguous run of rows per chunk. Per row the device needs the token id, its position
and the KV-pool row its key and value go to; per decode row and per prompt chunk, the
sequence's block table (a fixed width W, padded with the trash block); per prompt chunk,
(first row, tokens, first position); and per row whose logits are wanted, its index. Rows
that are sampled come first among those. A pending decode row (worker.engine.batch) gets
the id -2 - j: row j of the previous step's sampler output holds its token (the executor's
first kernel looks it up), and its sampler history counts that token too.

All of it is packed into one int32 array (`pack`), copied to the device in one transfer;
the offsets of its fields depend only on the sizes (T tokens, D decode rows, P chunks, R
logits rows, W), so a step graph captured for one set of sizes finds its inputs at the same
addresses every replay.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from worker.backends.cuda.kernels import (
    KV_BLOCK,
    SAMPLE_ARGS_BYTES,
    exact_fraction,
    sample_fixed_point,
)
from worker.engine.batch import Chunk, SampleSpec
from worker.engine.params import SamplingParams

ARGS_INTS = SAMPLE_ARGS_BYTES // 4
FIELDS = ("ids", "pos", "kvrow", "gidx", "slot", "sargs", "seq", "bt")


@dataclass(frozen=True, slots=True)
class Sizes:
    tokens: int  # T
    decode: int  # D
    chunks: int  # P
    rows: int  # R: rows whose logits are computed (sampled ones first)
    width: int  # W: block-table entries per sequence

    def counts(self) -> dict[str, int]:
        """int32 elements of each field."""
        t, d, p, r, w = self.tokens, self.decode, self.chunks, self.rows, self.width
        return {
            "ids": t,
            "pos": t,
            "kvrow": t,
            "gidx": r,
            "slot": r,
            "sargs": r * ARGS_INTS,
            "seq": 3 * p,
            "bt": (d + p) * w,
        }

    def offsets(self) -> dict[str, int]:
        """Offset (int32 elements) of each field; 8-byte aligned (the sampler args hold
        u64s)."""
        out: dict[str, int] = {}
        off = 0
        for name, n in self.counts().items():
            off = (off + 1) // 2 * 2
            out[name] = off
            off += n
        return out

    @property
    def total(self) -> int:
        offs, counts = self.offsets(), self.counts()
        return max(offs[k] + counts[k] for k in FIELDS)


@dataclass(frozen=True, slots=True)
class Bucket:
    """The fixed sizes a step is padded to, so that one captured graph replays every step
    of them: decode rows, prompt rows and prompt chunks (a decode-only step: 0 and 0)."""

    decode: int  # D rows, the step's decode rows and padding rows after them
    prompt: int  # prompt rows: the chunks' tokens, then one padding chunk's
    chunks: int  # prompt-chunk records: the real ones, the padding chunk, then empty ones
    # (a power of two, at least 4: choose_bucket)

    @property
    def tokens(self) -> int:
        return self.decode + self.prompt

    @property
    def rows(self) -> int:
        """Logits rows: one per decode row and one per chunk record (every one sampled)."""
        return self.decode + self.chunks


def own_logits_rows(c: Chunk) -> bool:
    """Whether a chunk's logits need rows of their own: it asks for logits and is not a
    sampled one-row chunk (whose logits are its sampled row's)."""
    return c.logits and not (c.sample is not None and len(c.tokens) == 1)


def prompt_buckets(limit: int) -> list[int]:
    """Prompt-row bucket sizes up to `limit` (which is always one): 16, 24, 32, 48, 64, 96,
    ... (each at most 1.5x the one before, so padding costs at most a third of a prompt
    step's rows)."""
    out: list[int] = []
    b = 16
    while b < limit:
        out.append(b)
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3  # 16, 24, 32, 48, 64, ...
    return [*out, limit]


def choose_bucket(
    chunks: Sequence[Chunk],
    *,
    decode_buckets: Sequence[int],
    prompt_sizes: Sequence[int],
    max_chunks: int,
    max_tokens: int,
    max_rows: int,
) -> Bucket | None:
    """The bucket a step is replayed in, or None when it runs eagerly: a decode row that is
    not sampled, a chunk that wants logits rows of its own (all positions of a prompt), or
    sizes past the largest bucket or the step buffers."""
    n_dec = n_prompt = n_chunks = 0
    for c in chunks:
        if own_logits_rows(c):
            return None
        if c.prefill:
            n_chunks += 1
            n_prompt += len(c.tokens)
        elif c.sample is None:
            return None
        else:
            n_dec += 1
    dec = 0
    if n_dec:
        dec = next((b for b in decode_buckets if b >= n_dec), 0)
        if not dec:
            return None
    if not n_chunks:
        return Bucket(dec, 0, 0)
    prompt = next((b for b in prompt_sizes if b >= n_prompt), 0)
    if not prompt:
        return None
    # chunk records: at least 4 (empty ones cost a few exiting blocks), so that steps of
    # one to three prompts share their graphs
    records = max(4, 1 << (n_chunks + (prompt > n_prompt) - 1).bit_length())
    b = Bucket(dec, prompt, records)
    if records > max_chunks or b.tokens > max_tokens or b.rows > max_rows:
        return None
    return b


@dataclass(slots=True)
class StepLayout:
    sizes: Sizes
    packed: np.ndarray  # int32 [sizes.total]
    prefill: list[tuple[int, int, int]]  # per chunk: (first row, tokens, first position)
    chunk_rows: list[tuple[int, int]]  # per input chunk: (first row, tokens)
    sampled: list[int]  # input chunk index of each sampled logits row, in row order
    logits_chunks: list[int]  # chunks with logits rows of their own (not sampled one-rows)
    logits_rows: list[tuple[int, int]]  # per logits chunk: its first gathered row, tokens
    sampled_rows: dict[int, int]  # slot -> its sampled row (the next step's prev_rows)


def layout_step(
    chunks: Sequence[Chunk],
    *,
    width: int,
    trash_block: int,
    bucket: Bucket | None = None,
    pad_slot: int = -1,
    prev_rows: Mapping[int, int] | None = None,
) -> StepLayout:
    """The rows and packed inputs of `chunks` (see the module docstring).

    bucket: the step padded to those sizes (a graph's; choose_bucket). Padding decode rows
    decode token 0 at position 0 over the trash block. Padding prompt rows form one more
    chunk, token 0 at positions 0.. with every key in the trash block (so every row the
    step computes holds finite values); chunk records past it are empty (0 tokens: their
    attention blocks exit). Every logits row is sampled: the step's sampled rows first,
    then padding rows, sampled greedily into `pad_slot`, a sampler history slot no sequence
    has (the sampler appends each row's id to its slot's history: a real slot there would
    be overwritten), their results unused. In `prefill` the padding chunk is included.
    prev_rows: slot -> its sampled row in the previous step (for pending chunks)."""
    decode = [i for i, c in enumerate(chunks) if not c.prefill]
    prompt = [i for i, c in enumerate(chunks) if c.prefill]
    for i in decode:
        if len(chunks[i].tokens) != 1:
            raise ValueError("a decode chunk carries exactly one token")
    n_dec = len(decode)
    n_prompt = sum(len(chunks[i].tokens) for i in prompt)
    sampled = [i for i, c in enumerate(chunks) if c.sample is not None]
    logits_chunks = [i for i, c in enumerate(chunks) if own_logits_rows(c)]
    if bucket is None:
        d_rows, p_rows, records = n_dec, n_prompt, len(prompt)
    else:
        d_rows, p_rows, records = bucket.decode, bucket.prompt, bucket.chunks
        padding = n_prompt < p_rows
        if logits_chunks or any(chunks[i].sample is None for i in decode):
            raise ValueError("a bucket's rows are all sampled: no logits-only rows")
        if d_rows < n_dec or p_rows < n_prompt or records < len(prompt) + padding:
            raise ValueError(f"the step does not fit its bucket {bucket}")
        if (p_rows > 0) != (records > 0):
            raise ValueError(f"bucket {bucket}: prompt rows without chunk records or back")
        if bucket.rows > len(sampled) and pad_slot < 0:
            raise ValueError("padding needs pad_slot, a history slot no sequence has")
        if any(chunks[i].slot == pad_slot for i in sampled):
            raise ValueError(f"padding slot {pad_slot} belongs to a sequence of the step")
    rows_of: dict[int, tuple[int, int]] = {}
    for r, i in enumerate(decode):
        rows_of[i] = (r, 1)
    row = d_rows
    prefill: list[tuple[int, int, int]] = []
    for i in prompt:
        c = chunks[i]
        n = len(c.tokens)
        if n < 1:
            raise ValueError("a prompt chunk needs at least one token")
        rows_of[i] = (row, n)
        prefill.append((row, n, c.start))
        row += n
    if row < d_rows + p_rows:  # the padding chunk
        prefill.append((row, d_rows + p_rows - row, 0))
    n_logits = sum(rows_of[i][1] for i in logits_chunks)
    n_rows = len(sampled) + n_logits if bucket is None else bucket.rows
    sizes = Sizes(d_rows + p_rows, d_rows, records, n_rows, width)
    offs, counts = sizes.offsets(), sizes.counts()
    packed = np.zeros(sizes.total, np.int32)
    f = {k: packed[offs[k] : offs[k] + counts[k]] for k in FIELDS}
    bt = f["bt"].reshape(sizes.decode + sizes.chunks, width) if width else f["bt"]
    bt[:] = trash_block
    if decode:  # one token each: filled column-wise from Python lists (the common case)
        dec = [chunks[i] for i in decode]
        pos = [c.start for c in dec]
        f["ids"][:n_dec] = [_pending_id(c, prev_rows) if c.pending else c.tokens[0] for c in dec]
        f["pos"][:n_dec] = pos
        f["kvrow"][:n_dec] = [
            c.blocks[p // KV_BLOCK] * KV_BLOCK + p % KV_BLOCK for c, p in zip(dec, pos, strict=True)
        ]
        _fill_tables(bt[:n_dec], dec, width)
    # padding decode rows: token 0 at 0 into the trash block (ids and pos are zero already)
    f["kvrow"][n_dec:d_rows] = trash_block * KV_BLOCK
    for i in prompt:
        _fill_rows(f, rows_of[i][0], chunks[i], trash_block)
    _fill_tables(bt[sizes.decode : sizes.decode + len(prompt)], [chunks[i] for i in prompt], width)
    if len(prefill) > len(prompt):  # padding prompt rows: positions 0.. in the trash block
        r0, n, _ = prefill[-1]
        f["kvrow"][r0 : r0 + n] = trash_block * KV_BLOCK + np.arange(n) % KV_BLOCK
    f["seq"][: 3 * len(prefill)] = np.asarray(prefill, np.int32).reshape(-1)
    # logits rows: the sampled ones (each chunk's last row), padding, then whole chunks
    gidx, slot = f["gidx"], f["slot"]
    n_s = len(sampled)
    if n_s:
        gidx[:n_s] = [rows_of[i][0] + rows_of[i][1] - 1 for i in sampled]
        slot[:n_s] = [chunks[i].slot for i in sampled]
        pack_sample_args(
            f["sargs"][: n_s * ARGS_INTS],
            [chunks[i].sample for i in sampled],
            [chunks[i].pending for i in sampled],
        )
    r = n_s
    if bucket is not None and n_rows > n_s:  # padding rows read row 0 (a computed one)
        slot[r:n_rows] = pad_slot  # the spare history slot (see the docstring)
        pack_sample_args(f["sargs"][r * ARGS_INTS : n_rows * ARGS_INTS], [None] * (n_rows - r))
        r = n_rows
    logits_rows: list[tuple[int, int]] = []
    for i in logits_chunks:
        r0, n = rows_of[i]
        logits_rows.append((r, n))
        gidx[r : r + n] = np.arange(r0, r0 + n, dtype=np.int32)
        slot[r : r + n] = 0
        r += n
    return StepLayout(
        sizes=sizes,
        packed=packed,
        prefill=prefill,
        chunk_rows=[rows_of[i] for i in range(len(chunks))],
        sampled=sampled,
        logits_chunks=logits_chunks,
        logits_rows=logits_rows,
        sampled_rows={chunks[i].slot: r for r, i in enumerate(sampled)},
    )


# sample_rows' SampleArgs as a NumPy record (cuda_src/sampling.cu; kernels.sample_args packs
# the same fields one row at a time)
ARGS_DTYPE = np.dtype(
    [
        ("top_p_m", "<u8"),
        ("wfloor", "<u8"),
        ("draw_m", "<u8"),
        ("pen", "<f4"),
        ("temperature", "<f4"),
        ("n_pen", "<i4"),
        ("top_k", "<i4"),
        ("top_p_sh", "<i4"),
        ("draw_sh", "<i4"),
    ]
)
assert ARGS_DTYPE.itemsize == SAMPLE_ARGS_BYTES


_GREEDY = (0, 1, 0, 1.0, 0.0, 0, 0, -1, 0)  # a row without settings, in ARGS_DTYPE order


_JobArgs = tuple[int, int, float, float, int, int]
# id(params) -> (params, its fields): a job's SamplingParams object lives as long as the
# job, and an identity lookup skips hashing its every field for every row of every step
_JOB_ARGS: dict[int, tuple[SamplingParams, _JobArgs]] = {}


def _job_args(p: SamplingParams) -> _JobArgs:
    """A job's fixed sampler fields: (top_p_m, wfloor, pen, temperature, top_k, top_p_sh)."""
    hit = _JOB_ARGS.get(id(p))
    if hit is not None and hit[0] is p:
        return hit[1]
    tp_m, tp_sh, wfloor, _, _ = sample_fixed_point(p.top_p, p.min_p, 0.0)
    args = (tp_m, wfloor, p.repetition_penalty, p.temperature, p.top_k, tp_sh)
    if len(_JOB_ARGS) >= 4096:  # ended jobs' entries: forget them all now and then
        _JOB_ARGS.clear()
    _JOB_ARGS[id(p)] = (p, args)
    return args


def pack_sample_args(
    dst: np.ndarray, specs: Sequence[SampleSpec | None], pending: Sequence[bool] = ()
) -> None:
    """Each row's sampler settings (None: greedy, no history) into dst (int32 view of the
    packed records), column by column (a job's fixed fields computed once: _job_args).
    A pending row's history is one longer than its spec's (the device holds that id)."""
    if not specs:
        return
    rows: list[tuple[int | float, ...]] = []
    for k, s in enumerate(specs):
        if s is None:
            rows.append(_GREEDY)
            continue
        tp_m, wfloor, pen, temp, top_k, tp_sh = _job_args(s.params)
        d_m, d_sh = exact_fraction(s.draw)
        n_pen = len(s.history) + (k < len(pending) and pending[k])
        rows.append((tp_m, wfloor, d_m, pen, temp, n_pen, top_k, tp_sh, d_sh))
    rec = dst.view(ARGS_DTYPE)
    for name, col in zip(ARGS_DTYPE.names or (), zip(*rows, strict=True), strict=True):
        rec[name] = col  # float32 columns round exactly as float(np.float32(x)) does


def _pending_id(c: Chunk, prev_rows: Mapping[int, int] | None) -> int:
    row = None if prev_rows is None else prev_rows.get(c.slot)
    if row is None:
        raise ValueError(f"pending chunk in slot {c.slot}: the previous step drew nothing there")
    return -2 - row


def _fill_rows(f: dict[str, np.ndarray], r0: int, c: Chunk, trash_block: int) -> None:
    n = len(c.tokens)
    pos = np.arange(c.start, c.start + n, dtype=np.int64)
    f["ids"][r0 : r0 + n] = np.asarray(c.tokens, dtype=np.int64)
    f["pos"][r0 : r0 + n] = pos
    table = np.asarray(c.blocks, dtype=np.int64)
    f["kvrow"][r0 : r0 + n] = table[pos // KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK


def _fill_tables(dst: np.ndarray, chunks: Sequence[Chunk], width: int) -> None:
    """Block table k of dst = chunks[k]'s blocks, the rest of each row untouched: one
    scatter for all of them (a call per row was a third of a 64-row step's layout)."""
    if not chunks:
        return
    lens = np.fromiter((len(c.blocks) for c in chunks), np.int64, len(chunks))
    if lens.max(initial=0) > width:
        raise ValueError(f"block table of {int(lens.max())} blocks wider than {width}")
    n = int(lens.sum())
    flat = np.fromiter(itertools.chain.from_iterable(c.blocks for c in chunks), np.int32, n)
    rows = np.repeat(np.arange(len(chunks)), lens)
    cols = np.arange(n) - np.repeat(np.cumsum(lens) - lens, lens)
    dst[rows, cols] = flat
