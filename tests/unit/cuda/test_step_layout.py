"""The host layout of a GPU step (worker/backends/cuda/step.py), without a GPU: which row
each token takes, the KV-pool row each key goes to, block tables, prompt-chunk records, the
logits rows (sampled first), the packed offsets and a graph bucket's padding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from worker.backends.cuda.kernels import KV_BLOCK, SAMPLE_ARGS_BYTES, sample_args
from worker.backends.cuda.step import (
    ARGS_DTYPE,
    Bucket,
    Sizes,
    choose_bucket,
    layout_step,
    prompt_buckets,
)
from worker.engine.batch import Chunk, SampleSpec
from worker.engine.params import SamplingParams

W, TRASH = 8, 99
P = SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.2)


def _fields(lay: object) -> dict[str, np.ndarray]:
    sz: Sizes = lay.sizes  # type: ignore[attr-defined]
    offs, counts = sz.offsets(), sz.counts()
    packed: np.ndarray = lay.packed  # type: ignore[attr-defined]
    return {k: packed[offs[k] : offs[k] + counts[k]] for k in offs}


def test_mixed_step_rows_tables_and_logits() -> None:
    spec = SampleSpec(P, 0.25, [7, 8])
    chunks = [
        Chunk(slot=3, tokens=list(range(10, 80)), start=60, blocks=[5, 2, 0], prefill=True),
        Chunk(slot=0, tokens=[42], start=130, blocks=[1, 4, 6], prefill=False, sample=spec),
        Chunk(slot=1, tokens=[1, 2, 3], start=0, blocks=[7], prefill=True, sample=spec),
        Chunk(slot=2, tokens=[9], start=5, blocks=[3], prefill=False, logits=True),
    ]
    lay = layout_step(chunks, width=W, trash_block=TRASH)
    sz = lay.sizes
    assert (sz.tokens, sz.decode, sz.chunks, sz.rows) == (75, 2, 2, 3)
    # decode rows first, in order; then each prompt chunk's rows
    assert lay.chunk_rows == [(2, 70), (0, 1), (72, 3), (1, 1)]
    assert lay.prefill == [(2, 70, 60), (72, 3, 0)]
    f = _fields(lay)
    assert list(f["ids"][:2]) == [42, 9] and list(f["ids"][2:72]) == list(range(10, 80))
    assert list(f["pos"][:2]) == [130, 5] and f["pos"][2] == 60 and f["pos"][71] == 129
    # key of position p -> block table[p // 64] * 64 + p % 64
    assert f["kvrow"][0] == 6 * KV_BLOCK + 130 % 64
    assert f["kvrow"][2] == 5 * KV_BLOCK + 60 and f["kvrow"][6] == 2 * KV_BLOCK + 0
    bt = f["bt"].reshape(4, W)
    assert list(bt[0]) == [1, 4, 6] + [TRASH] * 5  # decode row 0
    assert list(bt[1]) == [3] + [TRASH] * 7
    assert list(bt[2][:3]) == [5, 2, 0] and list(bt[3][:1]) == [7]
    assert list(f["seq"]) == [2, 70, 60, 72, 3, 0]
    # sampled rows (in chunk order), then the logits-only chunk's rows
    assert lay.sampled == [1, 2]
    assert list(f["gidx"]) == [0, 74, 1] and list(f["slot"][:2]) == [0, 1]
    args = f["sargs"].reshape(3, SAMPLE_ARGS_BYTES // 4)[0].tobytes()
    assert args == sample_args(
        n_pen=2,
        penalty=float(np.float32(1.2)),
        temperature=float(np.float32(0.7)),
        top_k=5,
        top_p=1.0,
        min_p=0.0,
        draw=0.25,
    )
    assert lay.logits_chunks == [3] and lay.logits_rows == [(2, 1)]
    offs = sz.offsets()
    assert all(o % 2 == 0 for o in offs.values())  # u64 sampler args stay 8-byte aligned


def test_bucket_padding_is_fixed_and_harmless() -> None:
    spec = SampleSpec(P, 0.5, [])
    chunks = [
        Chunk(slot=s, tokens=[s + 1], start=10 + s, blocks=[s], prefill=False, sample=spec)
        for s in range(3)
    ]
    lay = layout_step(chunks, width=W, trash_block=TRASH, bucket=Bucket(8, 0, 0), pad_slot=16)
    sz = lay.sizes
    assert (sz.tokens, sz.decode, sz.rows) == (8, 8, 8)
    f = _fields(lay)
    assert list(f["kvrow"][3:]) == [TRASH * KV_BLOCK] * 5  # padding writes the trash block
    assert list(f["pos"][3:]) == [0] * 5 and list(f["ids"][3:]) == [0] * 5
    # padding rows sample into the spare history slot, never a sequence's (a real slot 8
    # would have its history overwritten by a padding row)
    assert list(f["gidx"]) == [0, 1, 2] + [0] * 5 and list(f["slot"][3:]) == [16] * 5
    bt = f["bt"].reshape(8, W)
    assert (bt[3:] == TRASH).all()
    # the same sizes give the same offsets: a captured graph finds its inputs every step
    again = layout_step(chunks[:1], width=W, trash_block=TRASH, bucket=Bucket(8, 0, 0), pad_slot=16)
    assert again.sizes == sz and again.sizes.offsets() == sz.offsets()
    with pytest.raises(ValueError):
        layout_step(chunks, width=W, trash_block=TRASH, bucket=Bucket(2, 0, 0), pad_slot=16)
    with pytest.raises(ValueError, match="needs pad_slot"):
        layout_step(chunks, width=W, trash_block=TRASH, bucket=Bucket(8, 0, 0))
    taken = [dataclasses.replace(chunks[0], slot=16), *chunks[1:]]
    with pytest.raises(ValueError, match="belongs to a sequence"):
        layout_step(taken, width=W, trash_block=TRASH, bucket=Bucket(8, 0, 0), pad_slot=16)


def test_mixed_bucket_pads_prompt_rows_as_one_trash_chunk() -> None:
    """Two decode rows and two prompt chunks (one final, sampled; one not) in the bucket
    (4 decode rows, 24 prompt rows, 4 chunk records): the sizes are the bucket's whatever
    the step, the padding chunk keeps every key in the trash block and every logits row is
    sampled (the non-final chunk has none of its own)."""
    spec = SampleSpec(P, 0.5, [])
    chunks = [
        Chunk(slot=0, tokens=[5], start=70, blocks=[1, 2], prefill=False, sample=spec),
        Chunk(slot=1, tokens=list(range(1, 11)), start=64, blocks=[3, 4], prefill=True),
        Chunk(slot=2, tokens=[6], start=3, blocks=[5], prefill=False, sample=spec),
        Chunk(slot=3, tokens=[7, 8, 9], start=0, blocks=[6], prefill=True, sample=spec),
    ]
    b = Bucket(4, 24, 4)
    lay = layout_step(chunks, width=W, trash_block=TRASH, bucket=b, pad_slot=16)
    sz = lay.sizes
    assert (sz.tokens, sz.decode, sz.chunks, sz.rows) == (28, 4, 4, 8)
    assert lay.chunk_rows == [(0, 1), (4, 10), (1, 1), (14, 3)]
    # the real chunks, then the padding chunk: rows 17..27 at positions 0..10
    assert lay.prefill == [(4, 10, 64), (14, 3, 0), (17, 11, 0)]
    f = _fields(lay)
    assert list(f["seq"]) == [4, 10, 64, 14, 3, 0, 17, 11, 0, 0, 0, 0]
    assert list(f["kvrow"][17:]) == [TRASH * KV_BLOCK + p for p in range(11)]
    assert list(f["ids"][17:]) == [0] * 11 and list(f["pos"][17:]) == [0] * 11
    assert list(f["kvrow"][2:4]) == [TRASH * KV_BLOCK] * 2  # padding decode rows
    bt = f["bt"].reshape(8, W)
    assert list(bt[4][:2]) == [3, 4] and list(bt[5][:1]) == [6]
    assert (bt[6:] == TRASH).all() and (bt[2:4] == TRASH).all()
    # sampled: the decode rows and the final chunk's last row; then padding rows
    assert lay.sampled == [0, 2, 3]
    assert list(f["gidx"]) == [0, 1, 16, 0, 0, 0, 0, 0]
    assert list(f["slot"]) == [0, 2, 3] + [16] * 5
    # another step of the same bucket: the same sizes and offsets (one graph serves both)
    other = layout_step(chunks[1:2], width=W, trash_block=TRASH, bucket=b, pad_slot=16)
    assert other.sizes == sz and other.prefill[-1] == (14, 14, 0)
    with pytest.raises(ValueError, match="does not fit"):
        layout_step(chunks, width=W, trash_block=TRASH, bucket=Bucket(4, 12, 2), pad_slot=16)
    want_logits = [dataclasses.replace(chunks[3], logits=True)]
    with pytest.raises(ValueError, match="logits-only"):
        layout_step(want_logits, width=W, trash_block=TRASH, bucket=b, pad_slot=16)


def test_choose_bucket() -> None:
    spec = SampleSpec(P, 0.5, [])
    dec = Chunk(slot=0, tokens=[5], start=70, blocks=[1, 2], prefill=False, sample=spec)
    pr = Chunk(slot=1, tokens=list(range(40)), start=0, blocks=[3], prefill=True)
    sizes = prompt_buckets(512)
    assert sizes[:8] == [16, 24, 32, 48, 64, 96, 128, 192] and sizes[-2:] == [384, 512]
    assert prompt_buckets(100)[-2:] == [96, 100]
    kw = dict(
        decode_buckets=[1, 2, 4, 8], prompt_sizes=sizes, max_chunks=8, max_tokens=520, max_rows=72
    )
    assert choose_bucket([dec] * 3, **kw) == Bucket(4, 0, 0)  # type: ignore[arg-type]
    assert choose_bucket([dec, pr], **kw) == Bucket(1, 48, 4)  # type: ignore[arg-type]
    exact = dataclasses.replace(pr, tokens=list(range(48)))
    assert choose_bucket([exact], **kw) == Bucket(0, 48, 4)  # type: ignore[arg-type]
    assert choose_bucket([exact, pr], **kw) == Bucket(0, 96, 4)  # type: ignore[arg-type]
    # eager: an unsampled decode row, prompt logits, past the buckets or the buffers
    assert choose_bucket([dataclasses.replace(dec, sample=None)], **kw) is None  # type: ignore[arg-type]
    assert choose_bucket([dataclasses.replace(pr, logits=True)], **kw) is None  # type: ignore[arg-type]
    assert choose_bucket([dec] * 9, **kw) is None  # type: ignore[arg-type]
    big = dataclasses.replace(pr, tokens=list(range(513)))
    assert choose_bucket([big], **kw) is None  # type: ignore[arg-type]
    assert choose_bucket([dec] + [pr] * 5, **kw) == Bucket(1, 256, 8)  # type: ignore[arg-type]
    assert choose_bucket([dec] * 8 + [pr] * 12, **kw) is None  # type: ignore[arg-type]
    full = dataclasses.replace(pr, tokens=list(range(512)))
    assert choose_bucket([dec] * 8 + [full], **kw) == Bucket(8, 512, 4)  # type: ignore[arg-type]
    kw["max_tokens"] = 519
    assert choose_bucket([dec] * 8 + [full], **kw) is None  # type: ignore[arg-type]


def test_bad_chunks() -> None:
    with pytest.raises(ValueError, match="exactly one token"):
        layout_step([Chunk(0, [1, 2], 0, [0], prefill=False)], width=W, trash_block=TRASH)
    with pytest.raises(ValueError, match="wider"):
        layout_step([Chunk(0, [1], 0, list(range(9)), prefill=True)], width=W, trash_block=9)


def test_packed_sampler_args_equal_the_one_row_packing() -> None:
    """pack_sample_args (columns, a job's fixed fields cached) writes, row for row, the
    bytes sample_args packs for one row; greedy rows (None) too."""
    import random

    from worker.backends.cuda.step import pack_sample_args
    from worker.engine.rng import uniform

    rnd = random.Random(11)
    specs: list[SampleSpec | None] = []
    for k in range(40):
        if k % 7 == 3:
            specs.append(None)
            continue
        p = SamplingParams(
            temperature=rnd.choice([0.0, 0.3, 0.7, 1.9]),
            top_k=rnd.choice([0, 1, 40]),
            top_p=rnd.choice([1.0, 0.9, 0.123, 1e-6]),
            min_p=rnd.choice([0.0, 0.05, 0.5]),
            repetition_penalty=rnd.choice([1.0, 1.1, 1.7]),
        )
        draw = rnd.choice([0.0, 0.5, uniform(k, k * 3), 1e-12])
        specs.append(SampleSpec(p, draw, list(range(rnd.randrange(5)))))
    n = SAMPLE_ARGS_BYTES // 4
    packed = np.zeros(len(specs) * n, np.int32)
    pack_sample_args(packed, specs)
    for k, s in enumerate(specs):
        row = packed[k * n : (k + 1) * n].tobytes()
        if s is None:
            want = sample_args(
                n_pen=0, penalty=1.0, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, draw=0.0
            )
        else:
            q = s.params
            want = sample_args(
                n_pen=len(s.history),
                penalty=float(np.float32(q.repetition_penalty)),
                temperature=float(np.float32(q.temperature)),
                top_k=q.top_k,
                top_p=q.top_p,
                min_p=q.min_p,
                draw=s.draw,
            )
        assert row == want, k


def test_pending_rows_name_the_previous_steps_sampler_row() -> None:
    """A pending decode row's id is -2 - (its slot's sampled row in the step before), its
    sampler history one longer than the host's; a slot the step before did not sample is
    refused."""
    spec = SampleSpec(P, 0.5, [4, 5, 6])
    chunks = [
        Chunk(slot=2, tokens=[0], start=9, blocks=[1], prefill=False, sample=spec, pending=True),
        Chunk(slot=5, tokens=[77], start=3, blocks=[2], prefill=False, sample=spec),
        Chunk(slot=0, tokens=[0], start=4, blocks=[3], prefill=False, sample=spec, pending=True),
    ]
    lay = layout_step(chunks, width=W, trash_block=TRASH, prev_rows={0: 6, 2: 0, 5: 1})
    f = _fields(lay)
    assert list(f["ids"]) == [-2, 77, -8]
    assert list(f["sargs"].view(ARGS_DTYPE)["n_pen"]) == [4, 3, 4]
    assert lay.sampled_rows == {2: 0, 5: 1, 0: 2}  # what the next step's prev_rows will be
    with pytest.raises(ValueError, match="drew nothing"):
        layout_step(chunks, width=W, trash_block=TRASH, prev_rows={2: 0})


def test_decode_block_tables_of_many_lengths() -> None:
    rng = np.random.default_rng(3)
    spec = SampleSpec(P, 0.5, [])
    lens = [int(n) for n in rng.integers(1, W + 1, 40)]
    chunks = [
        Chunk(
            slot=k,
            tokens=[k],
            start=64 * n - 1,
            blocks=[int(b) for b in rng.integers(0, 90, n)],
            prefill=False,
            sample=spec,
        )
        for k, n in enumerate(lens)
    ]
    lay = layout_step(chunks, width=W, trash_block=TRASH)
    bt = _fields(lay)["bt"].reshape(len(chunks), W)
    for row, c in zip(bt, chunks, strict=True):
        assert list(row) == list(c.blocks) + [TRASH] * (W - len(c.blocks))
    wide = dataclasses.replace(chunks[0], blocks=list(range(W + 1)))
    with pytest.raises(ValueError, match="wider"):
        layout_step([*chunks, wide], width=W, trash_block=TRASH)
