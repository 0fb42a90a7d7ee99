"""Host-side logic of the CUDA backend that needs no GPU: arena and KV planning, chunked
upload planning, launch argument checks, exact sampler parameter encoding, RoPE tables."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from worker.backends.cuda.arena import (
    DevBuf,
    LaunchRefused,
    align_up,
    kv_bytes_per_token,
    plan_arena,
    plan_ctx,
)
from worker.backends.cuda.kernels import (
    AttnShape,
    ceil_mul_pow2,
    exact_fraction,
    need,
    strided_extent,
)
from worker.backends.cuda.loader import plan_chunks, progress_marks
from worker.errors import CudaError, ErrorCode
from worker.gguf.hparams import RopeParams
from worker.models.common import rope_angles
from worker.models.recipe import rope_inv_freq


def test_arena_offsets_are_256_aligned_and_disjoint() -> None:
    rng = np.random.default_rng(0)
    items = [(f"t{i}", int(n)) for i, n in enumerate(rng.integers(0, 5000, size=300))]
    plan = plan_arena(items)
    prev_end = 0
    for name, n in items:
        off = plan.offsets[name]
        assert off % 256 == 0
        assert off >= prev_end
        prev_end = off + n
    assert plan.total >= prev_end and plan.total % 256 == 0
    with pytest.raises(ValueError):
        plan_arena([("a", 1), ("a", 2)])
    with pytest.raises(ValueError):
        plan_arena([("a", 1)], align=100)


def test_devbuf_view_bounds() -> None:
    b = DevBuf(0x1000, 1024, "buf")
    v = b.view(256, 512)
    assert (v.ptr, v.nbytes) == (0x1100, 512)
    with pytest.raises(ValueError):
        b.view(768, 512)
    with pytest.raises(ValueError):
        b.view(-1, 4)


def test_kv_sizing_caps_to_free_memory() -> None:
    per = kv_bytes_per_token(24, 2, 64, 64)
    assert per == 24 * 2 * 128 * 2
    # plenty of room: the requested size stands
    assert (
        plan_ctx(
            requested=4096,
            n_ctx_train=32768,
            per_token=per,
            fixed_bytes=10**9,
            free_bytes=80 * 10**9,
            reserve_bytes=0,
        )
        == 4096
    )
    # default is the model context, capped to what fits
    got = plan_ctx(
        requested=None,
        n_ctx_train=32768,
        per_token=per,
        fixed_bytes=10**9,
        free_bytes=10**9 + 1000 * per,
        reserve_bytes=0,
    )
    assert got == 1000
    assert (
        plan_ctx(
            requested=None,
            n_ctx_train=8,
            per_token=per,
            fixed_bytes=10,
            free_bytes=5,
            reserve_bytes=0,
        )
        == 0
    )
    assert align_up(1) == 256 and align_up(256) == 256 and align_up(257) == 512


def test_chunk_plan_covers_every_byte_once() -> None:
    sizes = [0, 1, 1 << 20, (1 << 20) + 7, 3 * (1 << 20) - 1, 12345]
    chunk = 1 << 20
    plan = plan_chunks(sizes, chunk)
    covered: dict[int, int] = {}
    for item, off, n in plan:
        assert 0 < n <= chunk
        assert off == covered.get(item, 0)
        covered[item] = off + n
    assert [covered.get(i, 0) for i in range(len(sizes))] == sizes
    with pytest.raises(ValueError):
        plan_chunks([1], 0)


def test_progress_marks_fire_once_each() -> None:
    total = 1000
    seen: list[float] = []
    done = 0
    for step in [100, 100, 100, 300, 1, 399]:
        seen += progress_marks(total, done, done + step)
        done += step
    assert seen == [0.25, 0.5, 0.75]


def test_launch_checks_refuse_out_of_range() -> None:
    b = DevBuf(0x10000, 4096, "x")
    need("k", b, 4096, "x")
    with pytest.raises(LaunchRefused) as ei:
        need("rmsnorm_f32", b, 4100, "x")
    assert "rmsnorm_f32" in str(ei.value)
    assert isinstance(ei.value, CudaError) and ei.value.code is ErrorCode.CUDA_ERROR
    with pytest.raises(LaunchRefused):
        need("k", DevBuf(0x10004, 4096, "y"), 16, "y", align=16)
    with pytest.raises(LaunchRefused):
        need("k", None, 4, "missing")
    assert strided_extent(3, 10, 4) == (2 * 10 + 4) * 4
    AttnShape(1, 14, 2, 64, 16, 128).check("attn")
    AttnShape(1, 14, 2, 64, 16, 100000).check("attn")  # any chunk: the tiles stream it
    AttnShape(1, 32, 2, 128, 16, 128).check("attn")  # 16 heads x 128 dims: the most
    for bad in (
        AttnShape(1, 14, 3, 64, 16, 128),  # heads not a multiple of kv heads
        AttnShape(1, 14, 2, 60, 16, 128),  # head_dim % 8
        AttnShape(1, 14, 2, 256, 16, 128),  # head_dim > 128
        AttnShape(1, 14, 2, 64, 33, 128),  # more chunks than the merge holds
        AttnShape(1, 64, 2, 128, 16, 128),  # 32 query heads x 128 dims a block
        AttnShape(0, 14, 2, 64, 16, 128),
    ):
        with pytest.raises(LaunchRefused):
            bad.check("attn")


@pytest.mark.parametrize("f", [0.0, 0.1, 0.5, 0.9, 0.999999, 1e-300, 5e-324, 0.3333333333333333])
def test_exact_fraction_round_trips(f: float) -> None:
    m, sh = exact_fraction(f)
    assert m < 2**53 and sh >= 0
    assert Fraction(m, 2**sh) == Fraction(f)


@pytest.mark.parametrize("f", [0.0, 0.05, 0.1, 0.5, 1e-20, 0.7777])
def test_ceil_mul_pow2_is_exact(f: float) -> None:
    fr = Fraction(f) * 2**40
    want = -((-fr.numerator) // fr.denominator)
    assert ceil_mul_pow2(f, 40) == want


@pytest.mark.parametrize(
    "rope",
    [
        RopeParams(type="neox", theta=1e6, n_dims=64),
        RopeParams(type="normal", theta=1e4, n_dims=64, scaling="linear", factor=4.0),
        RopeParams(
            type="neox",
            theta=150000.0,
            n_dims=64,
            scaling="yarn",
            factor=32.0,
            orig_ctx=4096,
            yarn_ext_factor=1.0,
        ),
        RopeParams(type="neox", theta=1e4, n_dims=32),
    ],
)
def test_rope_table_matches_reference_angles(rope: RopeParams) -> None:
    factors = np.linspace(1.0, 3.0, rope.n_dims // 2).astype(np.float32)
    for fac in (None, factors):
        inv, mscale = rope_inv_freq(rope, fac)
        pos = np.array([0, 1, 7, 1000, 131071], dtype=np.int64)
        cos_ref, sin_ref = rope_angles(rope, pos, fac)
        theta = pos.astype(np.float64)[:, None] * inv[None, :]
        np.testing.assert_allclose(np.cos(theta) * mscale, cos_ref, atol=2e-6, rtol=0)
        np.testing.assert_allclose(np.sin(theta) * mscale, sin_ref, atol=2e-6, rtol=0)


def test_arena_order_puts_fusable_projections_side_by_side() -> None:
    from worker.backends.cuda.backend import arena_order

    names = [
        "token_embd.weight",
        "blk.0.attn_k.bias",
        "blk.0.attn_k.weight",
        "blk.0.attn_norm.weight",
        "blk.0.attn_output.weight",
        "blk.0.attn_q.bias",
        "blk.0.attn_q.weight",
        "blk.0.attn_v.bias",
        "blk.0.attn_v.weight",
        "blk.0.ffn_down.weight",
        "blk.0.ffn_gate.weight",
        "blk.0.ffn_norm.weight",
        "blk.0.ffn_up.weight",
        "blk.1.attn_qkv.weight",
        "output_norm.weight",
    ]
    order = arena_order(names)
    assert sorted(order) == sorted(names)
    i = order.index
    assert i("blk.0.attn_k.weight") == i("blk.0.attn_q.weight") + 1
    assert i("blk.0.attn_v.weight") == i("blk.0.attn_k.weight") + 1
    assert i("blk.0.attn_k.bias") == i("blk.0.attn_q.bias") + 1
    assert i("blk.0.attn_v.bias") == i("blk.0.attn_k.bias") + 1
    assert i("blk.0.ffn_up.weight") == i("blk.0.ffn_gate.weight") + 1
    assert order[0] == "token_embd.weight" and order[-1] == "output_norm.weight"


def test_step_check_refuses_ids_and_blocks_out_of_range() -> None:
    """CudaBackend._check (host only): a token id or block id outside the model's vocabulary
    or the KV pool is refused before anything reaches the device, for one-token decode
    chunks and prompt chunks alike (lists, tuples or arrays)."""
    import types

    from worker.backends.cuda.backend import CudaBackend
    from worker.engine.batch import Chunk

    be = types.SimpleNamespace(
        max_batch=4, context_length=256, vocab_size=100, n_blocks=10, max_step_tokens=64
    )

    def check(tokens: object, blocks: list[int], prefill: bool = False) -> None:
        chunk = Chunk(slot=0, tokens=tokens, start=0, blocks=blocks, prefill=prefill)  # type: ignore[arg-type]
        CudaBackend._check(be, [chunk])  # type: ignore[arg-type]

    check((99,), [9])
    check([0, 5, 99], [0, 9], prefill=True)
    check(np.array([3, 4], np.int32), [2], prefill=True)
    for tokens, blocks in (
        ((100,), [0]),
        ((-1,), [0]),
        ([1, 100], [0]),
        ((1,), [10]),
        ((1,), [-1]),
    ):
        with pytest.raises(ValueError, match=r"out of range|outside"):
            check(tokens, blocks, prefill=len(tokens) > 1)
    with pytest.raises(ValueError, match="outside"):
        check(np.array([1, 2]), [3, 10], prefill=True)
