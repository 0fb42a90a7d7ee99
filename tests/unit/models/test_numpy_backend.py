"""NumpyBackend over tiny synthetic models: the batched-backend contract and the invariants
of the forward pass (chunking, paged cache reuse, dequant budget) that parity tests do not
cover."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tools.synth import preset, write_synthetic
from worker.backends.numpy_ref import GGUFWeights, NumpyBackend
from worker.engine.batch import BatchBackend, Chunk, SampleSpec
from worker.engine.params import SamplingParams
from worker.engine.sampling import sample
from worker.engine.single import SingleSequence
from worker.errors import ContextLengthExceeded, ModelLoadError
from worker.gguf.hparams import load_hparams
from worker.gguf.reader import open_gguf
from worker.models.base import build_model, model_class


@pytest.fixture(scope="module", params=["qwen2", "gpt-oss", "gpt2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = request.param
    mix = "mxfp4" if arch == "gpt-oss" else "q4_k_m"
    path = tmp_path_factory.mktemp("tiny") / f"{arch}.gguf"
    write_synthetic(path, replace(preset(arch, "tiny", mix=mix, seed=3), std=0.15))
    return path


@pytest.fixture
def backend(tiny: Path) -> Iterator[NumpyBackend]:
    b = NumpyBackend(tiny, ctx_size=40)
    yield b
    b.close()


IDS = [5, 17, 3, 99, 42, 7, 250, 1, 64, 128, 33, 2, 9, 77, 300, 11, 18, 21, 400, 6]


def test_contract_and_info(backend: NumpyBackend) -> None:
    b: BatchBackend = backend
    assert b.info.device == "cpu" and b.info.resident is False
    assert b.context_length == 40 and b.n_blocks * b.block_size >= 40
    assert b.vocab_size == backend.hp.n_vocab
    assert b.check_residency().ok


def test_a_step_of_several_chunks_equals_each_alone(backend: NumpyBackend) -> None:
    """Two sequences in one step, over their own blocks, give what each gives alone; the
    block table decides where the KV lives (a copied block reads back the same)."""
    bs = backend.block_size
    a = Chunk(slot=0, tokens=IDS[:9], start=0, blocks=[0], prefill=True, logits=True)
    b = Chunk(slot=1, tokens=IDS[5:], start=0, blocks=[2], prefill=True, logits=True)
    both = backend.step([a, b])
    alone_b = backend.step([Chunk(1, IDS[5:], 0, [3], True, logits=True)])
    assert both.ids == [-1, -1]
    assert both.logits[1] is not None and alone_b.logits[0] is not None
    np.testing.assert_array_equal(both.logits[1], alone_b.logits[0])
    # decode on top of block 0, then the same after copying block 0 to block 1
    p = SamplingParams(temperature=0.0)
    nxt = Chunk(0, [IDS[9]], 9, [0], False, sample=SampleSpec(p, 0.5, []), logits=True)
    one = backend.step([nxt])
    backend.copy_blocks([(0, 1)])
    two = backend.step([Chunk(0, [IDS[9]], 9, [1], False, sample=SampleSpec(p, 0.5, []))])
    assert one.ids == two.ids and one.ids[0] >= 0
    assert one.logits[0] is not None
    assert one.ids[0] == int(np.argmax(one.logits[0][-1]))
    assert bs > 9


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Same math, different BLAS blocking (gemm vs gemv) and summation order: float32
    rounding only (u = 2^-24 ~ 6e-8 a step). Through the tiny models' two layers, attention
    and the LM head the relative difference has been seen up to 1.1e-5 (it varies with the
    BLAS thread count and blocking); 5e-5 leaves that 4x, while a real error (a wrong
    position, a missing chunk, a stale KV row) moves the logits by 1e-2 or more."""
    a2, b2 = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    err = np.linalg.norm(a2 - b2, axis=-1) / np.linalg.norm(b2, axis=-1)
    assert err.max() <= 5e-5, err


def test_chunked_prefill_and_decode_equal_one_pass(tiny: Path, backend: NumpyBackend) -> None:
    seq = SingleSequence(backend)
    full = seq.forward(IDS, all_logits=True)
    assert full.shape == (len(IDS), backend.vocab_size) and full.dtype == np.float32
    assert seq.n_past == len(IDS)
    chunked = NumpyBackend(tiny, ctx_size=40, prefill_chunk=7)
    try:
        cs = SingleSequence(chunked)
        _close(cs.forward(IDS, all_logits=True), full)
        cs.reset()
        last = cs.forward(IDS[:12])
        _close(last, full[11])
        for i in range(12, len(IDS)):
            _close(cs.forward([IDS[i]]), full[i])
    finally:
        chunked.close()


def test_reset_reuses_cache_and_repeats_exactly(backend: NumpyBackend) -> None:
    seq = SingleSequence(backend)
    a = seq.forward(IDS[:10], all_logits=True)
    seq.forward(IDS[10:])
    seq.reset()
    assert seq.n_past == 0
    b = seq.forward(IDS[:10], all_logits=True)
    np.testing.assert_array_equal(a, b)  # same machine, same inputs: bit-identical


def test_context_length_exceeded(backend: NumpyBackend) -> None:
    seq = SingleSequence(backend)
    seq.forward(IDS * 2)  # exactly 40
    with pytest.raises(ContextLengthExceeded):
        seq.forward([1])
    seq.reset()
    with pytest.raises(ContextLengthExceeded):
        seq.forward(list(range(41)))
    assert seq.n_past == 0
    # the backend itself refuses positions past the chunk's blocks or the context
    with pytest.raises(ContextLengthExceeded):
        backend.step([Chunk(0, list(range(41)), 0, [0], True)])


def test_dequant_budget_zero_gives_identical_logits(tiny: Path, backend: NumpyBackend) -> None:
    want = SingleSequence(backend).forward(IDS, all_logits=True)
    lean = NumpyBackend(tiny, ctx_size=40, dequant_cache_mb=0)
    try:
        assert lean.weights.cached_bytes == 0
        np.testing.assert_array_equal(SingleSequence(lean).forward(IDS, all_logits=True), want)
        assert lean.weights.cached_bytes == 0
    finally:
        lean.close()


def test_forward_sample_matches_reference_sampler(backend: NumpyBackend) -> None:
    seq = SingleSequence(backend)
    logits = seq.forward(IDS[:8])
    seq.reset()
    p = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    got = seq.forward_sample(IDS[:8], p, 0.37, [3, 4])
    assert got == sample(logits, p, 0.37, [3, 4])
    seq.reset()
    assert seq.forward_sample(IDS[:8], SamplingParams(temperature=0.0), 0.5, []) == int(
        np.argmax(logits)
    )


def test_row_and_expert_access_equal_full_dequantization(tiny: Path) -> None:
    with open_gguf(tiny) as gf:
        w = GGUFWeights(gf, cache_mb=0)
        idx = np.array([0, 7, 3, 7])
        full = gf.dequantize("token_embd.weight")
        np.testing.assert_array_equal(w.rows("token_embd.weight", idx), full[idx])
        name = "blk.0.ffn_gate_exps.weight"
        if name in gf.tensors:
            whole = gf.dequantize(name)
            for e in range(whole.shape[0]):
                np.testing.assert_array_equal(w.expert(name, e), whole[e])


def test_missing_tensor_and_unknown_arch_are_load_errors(tiny: Path) -> None:
    with open_gguf(tiny) as gf:
        hp = load_hparams(gf)

        class Without(GGUFWeights):
            def has(self, name: str) -> bool:
                return name != "blk.1.attn_output.weight" and super().has(name)

        with pytest.raises(ModelLoadError, match=r"blk\.1\.attn_output\.weight") as err:
            build_model(hp, Without(gf), path=tiny)
        assert str(tiny) in str(err.value)
    with pytest.raises(ModelLoadError, match="unsupported architecture 'mamba'"):
        model_class("mamba")


def test_kv_budget_caps_context_and_progress_reaches_one(tiny: Path) -> None:
    seen: list[float] = []
    b = NumpyBackend(tiny, kv_cache_size_mb=1, progress=seen.append)
    try:
        hp = b.hp
        per_token = hp.n_layer * hp.n_head_kv * (hp.head_dim + hp.head_dim_v) * 4
        pool = (1 << 20) // per_token // b.block_size * b.block_size
        assert b.n_blocks * b.block_size == pool
        assert b.context_length == min(hp.n_ctx_train, 4096, pool)
        assert b.kv.nbytes <= 1 << 20
        assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    finally:
        b.close()


def test_float16_kv_cache_stays_close(tiny: Path, backend: NumpyBackend) -> None:
    want = SingleSequence(backend).forward(IDS, all_logits=True)
    half = NumpyBackend(tiny, ctx_size=40, kv_dtype=np.float16)
    try:
        assert half.kv.k[0].dtype == np.float16
        hs = SingleSequence(half)
        got = hs.forward(IDS[:10], all_logits=True)
        got = np.concatenate([got, hs.forward(IDS[10:], all_logits=True)])
        err = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
        assert err.max() < 5e-3  # fp16 K/V rounding (2^-11 relative) only
    finally:
        half.close()


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-moe") / "gpt-oss.gguf"
    write_synthetic(path, replace(preset("gpt-oss", "tiny", mix="mxfp4", seed=3), std=0.15))
    return path


def test_preloaded_experts_and_forced_routing(tiny_moe: Path) -> None:
    """The two hooks the full-size GPU test relies on (tests/gpu/test_model_full.py):
    experts dequantized in threads give the same logits as on first use, and feeding the
    model its own routing through route_hook reproduces the unhooked logits exactly, while
    another routing changes them."""
    from worker.models.common import moe_route

    plain = NumpyBackend(tiny_moe, ctx_size=40)
    try:
        want = SingleSequence(plain).forward(IDS, all_logits=True)
        hp = plain.hp
    finally:
        plain.close()
    seen: list[tuple[int, np.ndarray]] = []

    def record(il: int, router: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx, w = moe_route(router, hp.n_expert_used)
        seen.append((il, idx))
        return idx, w

    other = NumpyBackend(tiny_moe, ctx_size=40)
    try:
        other.weights.preload_experts(threads=3)
        n_exp = sum(1 for k in other.weights._cache if isinstance(k, tuple))
        assert n_exp == 3 * hp.n_layer * hp.n_expert
        other.model.route_hook = record  # type: ignore[attr-defined]
        seq = SingleSequence(other)
        np.testing.assert_array_equal(seq.forward(IDS, all_logits=True), want)
        assert [il for il, _ in seen] == list(range(hp.n_layer))
        assert all(idx.shape == (len(IDS), hp.n_expert_used) for _, idx in seen)

        def shifted(il: int, router: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            idx, w = moe_route(router, hp.n_expert_used)
            return (idx + 1) % hp.n_expert, w

        seq.reset()
        other.model.route_hook = shifted  # type: ignore[attr-defined]
        assert not np.allclose(seq.forward(IDS, all_logits=True), want, rtol=1e-3)
    finally:
        other.close()
