"""A step's rows and its device inputs, laid out on the host (pure: tested without a GPU).

The executor runs every token of a step as one row of its activations. Decode tokens (one
per sequence) come first, rows 0..D-1, in the order given; then each prompt chunk's tokens,
one contiguous run of rows per chunk. Per row the device needs the token id, its position
and the KV-pool row its key and value go to; per decode row and per prompt chunk, the
sequence's block table (a fixed width W, padded with the trash block); per prompt chunk,
(first row, tokens, first position); and per row whose logits are wanted, its index. Rows
that are sampled come first among those.

All of it is packed into one int32 array (`pack`), copied to the device in one transfer;
the offsets of its fields depend only on the sizes (T tokens, D decode rows, P chunks, R
logits rows, W), so a step graph captured for one set of sizes finds its inputs at the same
addresses every replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from worker.backends.cuda.kernels import KV_BLOCK, SAMPLE_ARGS_BYTES, sample_fixed_point
from worker.engine.batch import Chunk, SampleSpec

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


@dataclass(slots=True)
class StepLayout:
    sizes: Sizes
    packed: np.ndarray  # int32 [sizes.total]
    prefill: list[tuple[int, int, int]]  # per chunk: (first row, tokens, first position)
    chunk_rows: list[tuple[int, int]]  # per input chunk: (first row, tokens)
    sampled: list[int]  # input chunk index of each sampled logits row, in row order
    logits_chunks: list[int]  # chunks with logits rows of their own (not sampled one-rows)
    logits_rows: list[tuple[int, int]]  # per logits chunk: its first gathered row, tokens


def layout_step(
    chunks: Sequence[Chunk],
    *,
    width: int,
    trash_block: int,
    pad_decode_to: int | None = None,
    pad_slot: int = -1,
) -> StepLayout:
    """The rows and packed inputs of `chunks` (see the module docstring). pad_decode_to: a
    decode-only step padded to that many rows (a graph bucket): padding rows decode token 0
    at position 0 over the trash block and are sampled greedily into `pad_slot`, a sampler
    history slot no sequence has (the sampler appends each row's id to its slot's history:
    a real slot there would be overwritten), their results unused."""
    decode = [i for i, c in enumerate(chunks) if not c.prefill]
    prompt = [i for i, c in enumerate(chunks) if c.prefill]
    for i in decode:
        if len(chunks[i].tokens) != 1:
            raise ValueError("a decode chunk carries exactly one token")
    n_dec = len(decode)
    pad = 0
    if pad_decode_to is not None:
        if prompt or pad_decode_to < n_dec:
            raise ValueError("padding is for decode-only steps of at most that many rows")
        if pad_decode_to > n_dec and any(chunks[i].slot == pad_slot for i in decode):
            raise ValueError(f"padding slot {pad_slot} belongs to a sequence of the step")
        if pad_decode_to > n_dec and pad_slot < 0:
            raise ValueError("padding needs pad_slot, a history slot no sequence has")
        pad = pad_decode_to - n_dec
    rows_of: dict[int, tuple[int, int]] = {}
    row = 0
    for i in decode:
        rows_of[i] = (row, 1)
        row += 1
    row += pad
    prefill: list[tuple[int, int, int]] = []
    for i in prompt:
        c = chunks[i]
        n = len(c.tokens)
        if n < 1:
            raise ValueError("a prompt chunk needs at least one token")
        rows_of[i] = (row, n)
        prefill.append((row, n, c.start))
        row += n
    n_tok = row
    sampled = [i for i, c in enumerate(chunks) if c.sample is not None]
    # a sampled one-row chunk's logits are its sampled row's; other chunks asking for
    # logits get rows of their own
    logits_chunks = [
        i for i, c in enumerate(chunks) if c.logits and not (c.sample and len(c.tokens) == 1)
    ]
    n_logits = sum(rows_of[i][1] for i in logits_chunks)
    n_rows = len(sampled) + pad + n_logits
    sizes = Sizes(n_tok, n_dec + pad, len(prompt), n_rows, width)
    offs, counts = sizes.offsets(), sizes.counts()
    packed = np.zeros(sizes.total, np.int32)
    f = {k: packed[offs[k] : offs[k] + counts[k]] for k in FIELDS}
    bt = f["bt"].reshape(sizes.decode + sizes.chunks, width) if width else f["bt"]
    bt[:] = trash_block
    if decode:  # one token each: filled column-wise from Python lists (the common case)
        dec = [chunks[i] for i in decode]
        pos = [c.start for c in dec]
        f["ids"][:n_dec] = [c.tokens[0] for c in dec]
        f["pos"][:n_dec] = pos
        f["kvrow"][:n_dec] = [
            c.blocks[p // KV_BLOCK] * KV_BLOCK + p % KV_BLOCK for c, p in zip(dec, pos, strict=True)
        ]
        for k, c in enumerate(dec):
            _fill_table(bt[k], c, width)
    for r in range(n_dec, n_dec + pad):  # padding rows: token 0 at 0 into the trash block
        f["kvrow"][r] = trash_block * KV_BLOCK
    for k, i in enumerate(prompt):
        c = chunks[i]
        r0, n = rows_of[i]
        _fill_rows(f, r0, c, trash_block)
        _fill_table(bt[sizes.decode + k], c, width)
        f["seq"][3 * k : 3 * k + 3] = (r0, n, c.start)
    # logits rows: the sampled ones (each chunk's last row), padding, then whole chunks
    gidx, slot = f["gidx"], f["slot"]
    n_s = len(sampled)
    if n_s:
        gidx[:n_s] = [rows_of[i][0] + rows_of[i][1] - 1 for i in sampled]
        slot[:n_s] = [chunks[i].slot for i in sampled]
        pack_sample_args(f["sargs"][: n_s * ARGS_INTS], [chunks[i].sample for i in sampled])
    r = n_s
    if pad:
        gidx[r : r + pad] = range(n_dec, n_dec + pad)
        slot[r : r + pad] = pad_slot  # the spare history slot (see the docstring)
        pack_sample_args(f["sargs"][r * ARGS_INTS : (r + pad) * ARGS_INTS], [None] * pad)
        r += pad
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


def pack_sample_args(dst: np.ndarray, specs: Sequence[SampleSpec | None]) -> None:
    """Each row's sampler settings (None: greedy, no history) into dst (int32 view of the
    packed records), column by column."""
    rec = dst.view(ARGS_DTYPE)
    cols: dict[str, list[int | float]] = {name: [] for name in ARGS_DTYPE.names or ()}
    for s in specs:
        if s is None:
            vals = (0, 1, 0, 1.0, 0.0, 0, 0, -1, 0)
        else:
            p = s.params
            tp_m, tp_sh, wfloor, d_m, d_sh = sample_fixed_point(p.top_p, p.min_p, s.draw)
            vals = (
                tp_m,
                wfloor,
                d_m,
                p.repetition_penalty,
                p.temperature,
                len(s.history),
                p.top_k,
                tp_sh,
                d_sh,
            )
        for name, v in zip(cols, vals, strict=True):
            cols[name].append(v)
    for name, vs in cols.items():
        rec[name] = vs  # float32 columns round exactly as float(np.float32(x)) does


def _fill_rows(f: dict[str, np.ndarray], r0: int, c: Chunk, trash_block: int) -> None:
    n = len(c.tokens)
    pos = np.arange(c.start, c.start + n, dtype=np.int64)
    f["ids"][r0 : r0 + n] = np.asarray(c.tokens, dtype=np.int64)
    f["pos"][r0 : r0 + n] = pos
    table = np.asarray(c.blocks, dtype=np.int64)
    f["kvrow"][r0 : r0 + n] = table[pos // KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK


def _fill_table(dst: np.ndarray, c: Chunk, width: int) -> None:
    n = len(c.blocks)
    if n > width:
        raise ValueError(f"block table of {n} blocks wider than {width}")
    dst[:n] = np.asarray(c.blocks, dtype=np.int32)
