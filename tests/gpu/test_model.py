"""Whole-model checks of CudaBackend: against the NumPy reference, and batch invariance.

On a synthetic full-size Qwen2.5-0.5B Q4_K_M file generated on the device (tools.synth;
set WORKER_ORCD_SYNTH_DIR to share it between runs) and tiny real-layout files of every
architecture:

* Teacher-forced: both backends get the same prompt (prompt tokens) and then the same 32
  further tokens one at a time (generated tokens fed back). At every position the relative
  error of the logits vector must be within REL_BOUND, and the top-1 token must agree
  wherever the reference's top-2 gap exceeds twice that position's largest absolute error.
* Batch invariance: jobs with their own prompts and sampling settings, run through the
  scheduler alone and in random batches of 2-64 (graph-replayed decode steps, prompt chunks
  mixed in): the same ids and bit-identical logits at every step; a shared prompt prefix
  served from the prefix cache changes no bit either; steps with prompt chunks replayed
  from their buckets' graphs give the ids of eager launches.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from logits_check import compare_logits, teacher_forced, token_sequence

from worker.engine.params import SamplingParams
from worker.engine.sampling import sample
from worker.engine.scheduler import Admitted, EngineEvent, Finished, Request, Scheduler
from worker.engine.single import SingleSequence
from worker.errors import ContextLengthExceeded

pytestmark = pytest.mark.gpu

# The tensor-core matrix products round their operands to fp16 (2^-11 each), the KV cache
# is FP16: 24 layers of that against the float32 reference.
REL_BOUND = 2e-2
CTX = 2048


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.synth import preset, write_synthetic

    d = os.environ.get("WORKER_ORCD_SYNTH_DIR")
    base = Path(d) if d else tmp_path_factory.mktemp("synth")
    p = base / "qwen2-full-q4_k_m.gguf"
    if not p.exists():
        write_synthetic(p, preset("qwen2", "full", mix="q4_k_m", seed=1))
    return p


@pytest.fixture(scope="module")
def cuda_be(qwen_path: Path) -> Iterator[Any]:
    from worker.backends.cuda import CudaBackend

    be = CudaBackend(qwen_path, ctx_size=CTX, max_batch=64, kv_cache_size_mb=2048)
    yield be
    be.close()


def _sequence(vocab: int, n_prompt: int = 24, n_more: int = 32) -> tuple[list[int], list[int]]:
    return token_sequence(vocab, n_prompt, n_more, seed=42)


def test_qwen2_logits_match_numpy_reference(qwen_path: Path, cuda_be: Any) -> None:
    from worker.backends.numpy_ref import NumpyBackend

    prompt, more = _sequence(cuda_be.vocab_size)
    got = teacher_forced(cuda_be, prompt, more)
    ref_be = NumpyBackend(qwen_path, ctx_size=256, max_batch=1)
    try:
        ref = teacher_forced(ref_be, prompt, more)
    finally:
        ref_be.close()
    assert got.shape == (len(prompt) + len(more), cuda_be.vocab_size)
    diff = compare_logits(got, ref)
    print("\n" + diff.summary("qwen2 teacher-forced", len(prompt)))
    assert max(diff.rels) < REL_BOUND, diff.rels


def _greedy_ids(be: Any, prompt: list[int], n: int) -> list[int]:
    seq = SingleSequence(be)
    g = SamplingParams(temperature=0.0)
    tok = seq.forward_sample(prompt, g, 0.0, [])
    out = [tok]
    for _ in range(n - 1):
        tok = seq.forward_sample([tok], g, 0.0, out)
        out.append(tok)
    return out


def test_deterministic_graph_equals_eager_pdl_changes_no_bit(qwen_path: Path, cuda_be: Any) -> None:
    """Repeated runs, graph replay against eager launches, and programmatic dependent
    launch on and off: the same logits and the same greedy ids."""
    from worker.backends.cuda import CudaBackend

    prompt, more = _sequence(cuda_be.vocab_size, 40, 12)
    a = teacher_forced(cuda_be, prompt, more)
    assert np.array_equal(a, teacher_forced(cuda_be, prompt, more)), "runs differ"
    ids = _greedy_ids(cuda_be, prompt, 40)  # decode steps replay the bucket-1 graph
    eager = CudaBackend(qwen_path, ctx_size=CTX, max_batch=4, graphs=False)
    try:
        assert np.array_equal(a, teacher_forced(eager, prompt, more))
        assert _greedy_ids(eager, prompt, 40) == ids, "graph replay differs from eager"
    finally:
        eager.close()
    for on in (True, False):
        cuda_be.set_pdl(on)
        try:
            assert _greedy_ids(cuda_be, prompt, 40) == ids
            edges = cuda_be.pdl_edges
        finally:
            cuda_be.set_pdl(None)
        print(f"\nPDL {on}: edges converted {edges[0]} of {edges[1]}")
        if on:
            assert edges[0] > 0, "step-graph edges should be programmatic"
        else:
            assert edges[0] == 0


def test_sampled_ids_match_reference_sampler(cuda_be: Any) -> None:
    """The step's sampler picks, from the logits the same step computed, the reference
    sampler's id, with the repetition-penalty history kept on the device."""
    prompt, _ = _sequence(cuda_be.vocab_size, 10, 6)
    configs = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=40),
        SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=1.1),
        SamplingParams(temperature=1.5),
    ]
    for params in configs:
        sched = Scheduler(cuda_be, _tok(), keep_logits=True, prefix_cache=False)
        sched.add(Request("s", prompt, max_tokens=12, params=params, seed=9))
        fin = _drain(sched)["s"][-1]
        assert isinstance(fin, Finished)
        gen: list[int] = []
        from worker.engine.rng import uniform

        for i, (tok, logits) in enumerate(zip(fin.token_ids, fin.logits, strict=False)):
            assert tok == sample(logits, params, uniform(9, i), gen), (params, i)
            gen.append(tok)


def test_context_limit_residency_and_vram_baseline(cuda_be: Any) -> None:
    rep = cuda_be.check_residency()
    assert rep.ok and rep.checked > 100 and not rep.failures
    used = cuda_be.vram_bytes_used()
    free_before = cuda_be.ctx.mem_info()[0]
    seq = SingleSequence(cuda_be)
    with pytest.raises(ContextLengthExceeded):
        seq.forward(list(range(CTX + 1)))
    for _ in range(5):  # a few "jobs": nothing is allocated per job
        _greedy_ids(cuda_be, list(range(30)), 6)
    assert cuda_be.vram_bytes_used() == used
    assert cuda_be.ctx.mem_info()[0] == free_before
    with pytest.raises(ValueError):
        SingleSequence(cuda_be).forward([cuda_be.vocab_size])
    SingleSequence(cuda_be).forward([1, 2, 3])  # still healthy


# ---------------------------------------------------------------------- batch invariance


_TOK: Any = None


def _tok() -> Any:
    """A tokenizer for the scheduler: the synthetic files carry the real vocabularies."""
    return _TOK


@pytest.fixture(scope="module", autouse=True)
def _tokenizer(qwen_path: Path) -> None:
    from worker.gguf.reader import open_gguf
    from worker.tokenizer.loader import load_tokenizer

    global _TOK
    with open_gguf(qwen_path) as gf:
        _TOK = load_tokenizer(gf.metadata)


def _drain(sched: Scheduler) -> dict[str, list[EngineEvent]]:
    out: dict[str, list[EngineEvent]] = {}
    for _ in range(100000):
        if sched.idle:
            return out
        for ev in sched.step():
            out.setdefault(ev.job_id, []).append(ev)
    raise AssertionError("the scheduler did not finish")


def _jobs(vocab: int, n: int, seed: int, prefix: list[int] | None = None) -> list[Request]:
    rnd = random.Random(seed)
    reqs = []
    for k in range(n):
        sampled = k % 2 == 1
        body = [rnd.randrange(100, vocab) for _ in range(rnd.randrange(1, 300))]
        reqs.append(
            Request(
                job_id=f"j{k}",
                prompt_ids=(prefix or []) + body,
                max_tokens=rnd.randrange(4, 40),
                params=SamplingParams(
                    temperature=rnd.choice([0.7, 1.0, 1.3]) if sampled else 0.0,
                    top_k=rnd.choice([0, 40]),
                    top_p=rnd.choice([1.0, 0.9]),
                    min_p=rnd.choice([0.0, 0.05]),
                    repetition_penalty=rnd.choice([1.0, 1.2]),
                ),
                seed=rnd.randrange(1 << 62),
            )
        )
    return reqs


def _copy(r: Request) -> Request:
    return Request(r.job_id, list(r.prompt_ids), r.max_tokens, r.params, r.seed, list(r.stop))


def _run(be: Any, reqs: list[Request], **kw: Any) -> dict[str, list[EngineEvent]]:
    sched = Scheduler(be, _tok(), keep_logits=True, **kw)
    for r in reqs:
        assert sched.add(_copy(r)) is None
    out = _drain(sched)
    sched.blocks.check()
    assert sched.blocks.used == 0
    return out


def _same(a: Finished, b: Finished, what: str) -> None:
    assert a.token_ids == b.token_ids, what
    assert len(a.logits) == len(b.logits)
    for i, (x, y) in enumerate(zip(a.logits, b.logits, strict=True)):
        assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), f"{what}: step {i}"


def _check_batch_invariance(
    be: Any, reqs: list[Request], alone: list[Request], sizes: tuple[int, ...], seed: int
) -> None:
    """The jobs `alone` one at a time, then all of `reqs` together (prefill chunks of 64
    tokens mixed with the decode rows, so prompts are cut differently), then random groups
    of each of `sizes` (random prefill chunks): every job's ids and every step's logits
    bit-identical."""
    first = {}
    for r in alone:
        fin = _run(be, [r], max_batch=1, prefill_chunk=512)[r.job_id][-1]
        assert isinstance(fin, Finished)
        first[r.job_id] = fin
    together = _run(be, reqs, max_batch=len(reqs), prefill_chunk=64)
    for job_id, fin in first.items():
        got = together[job_id][-1]
        assert isinstance(got, Finished)
        _same(fin, got, f"{job_id} among {len(reqs)}")
    rnd = random.Random(seed)
    for size in sizes:
        group = rnd.sample(reqs, size)
        some = _run(be, group, max_batch=size, prefill_chunk=rnd.choice([1, 37, 512]))
        for r in group:
            want, got = together[r.job_id][-1], some[r.job_id][-1]
            assert isinstance(want, Finished) and isinstance(got, Finished)
            _same(want, got, f"{r.job_id} among {size}")


def test_batch_invariance_full_size(cuda_be: Any) -> None:
    """64 jobs alone, then together (prefill chunks of 64 tokens mixed with the decode
    rows, so prompts are cut differently), then in random batches of 2-63: every job's ids
    and every step's logits bit-identical."""
    reqs = _jobs(cuda_be.vocab_size, 64, seed=1)
    _check_batch_invariance(cuda_be, reqs, reqs[:16] + reqs[-4:], (2, 7, 33, 63), seed=5)


def test_batch_invariance_full_size_integer_products(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Full-size Phi-3, whose dense products take the 15-bit integer cores by default
    (gemm15p8 up to 8 rows, gemm15pf folding its splits above): 24 jobs alone, together
    (prefill chunks of 64 tokens mixed with the decode rows) and in random batches of 2-17,
    every job's ids and every step's logits bit-identical."""
    from tools.synth import preset, write_synthetic
    from worker.backends.cuda import CudaBackend
    from worker.backends.cuda.plans.base import QWeight

    d = os.environ.get("WORKER_ORCD_SYNTH_DIR")
    base = Path(d) if d else tmp_path_factory.mktemp("synth")
    path = base / "phi3-full-q4_k_m.gguf"
    if not path.exists():
        write_synthetic(path, preset("phi3", "full", mix="q4_k_m", seed=1))
    be = CudaBackend(path, ctx_size=CTX, max_batch=24, kv_cache_size_mb=4096)
    try:
        gate_up = QWeight(1 << 20, 12, 16384, 3072, 0)  # Phi-3's (Q4_K)
        assert be.mm.takes_i15(gate_up), "the default no longer puts Phi-3 on the integer cores"
        reqs = _jobs(be.vocab_size, 24, seed=3)
        _check_batch_invariance(be, reqs, reqs[:6], (2, 9, 17), seed=7)
    finally:
        be.close()


def _graphs_equal_eager(
    graphs: Any, eager: Any, tok: Any, reqs: list[Request], prefill_chunk: int
) -> None:
    """The jobs together through the scheduler without keeping logits, so that steps with
    prompt chunks replay their buckets' graphs (padded rows and chunk records included):
    every job's ids as with eager launches of exactly the step's rows. Both overlapped
    (pending decode rows take their ids on the device) and serial, each against eager
    serial steps."""
    got: dict[tuple[Any, bool], Any] = {}
    for be, overlap in ((graphs, True), (graphs, False), (eager, False)):
        sched = Scheduler(
            be, tok, max_batch=len(reqs), prefill_chunk=prefill_chunk, overlap=overlap
        )
        for r in reqs:
            assert sched.add(_copy(r)) is None
        got[be, overlap] = {j: evs[-1] for j, evs in _drain(sched).items()}
    mixed = [b for b in graphs.graph_buckets if b.chunks and b.decode]
    assert mixed, f"no step with prompt chunks and decode rows replayed a graph: {mixed}"
    for r in reqs:
        want = got[eager, False][r.job_id]
        assert isinstance(want, Finished)
        for key, what in (((graphs, False), "graph replay"), ((graphs, True), "overlapped")):
            have = got[key][r.job_id]
            assert isinstance(have, Finished)
            assert have.token_ids == want.token_ids, f"{r.job_id}: {what} differs from eager"


def test_mixed_step_graphs_equal_eager(qwen_path: Path, cuda_be: Any) -> None:
    """Full size: 24 jobs with prompts of 1-300 tokens, cut into 96-token chunks mixed with
    the decode rows, replayed from bucket graphs give the ids of eager steps."""
    from worker.backends.cuda import CudaBackend

    reqs = _jobs(cuda_be.vocab_size, 24, seed=9)
    eager = CudaBackend(qwen_path, ctx_size=CTX, max_batch=24, graphs=False)
    try:
        _graphs_equal_eager(cuda_be, eager, _tok(), reqs, prefill_chunk=96)
    finally:
        eager.close()
    print(f"\ngraphs captured: {len(cuda_be.graph_buckets)}")


def test_prefix_cache_changes_no_bit(cuda_be: Any) -> None:
    """Eight jobs sharing a 1,000-token prefix: the later ones map the cached blocks
    (including a whole prompt that is one cached prefix: copy-on-write of its last block)
    and produce exactly what they produce computing everything."""
    rnd = random.Random(3)
    prefix = [rnd.randrange(100, cuda_be.vocab_size) for _ in range(1000)]
    reqs = _jobs(cuda_be.vocab_size, 7, seed=4, prefix=prefix)
    reqs.append(Request("whole", list(prefix[:960]), max_tokens=8, seed=1))  # 15 full blocks
    cold = {r.job_id: _run(cuda_be, [r], prefix_cache=False)[r.job_id][-1] for r in reqs}
    sched = Scheduler(cuda_be, _tok(), keep_logits=True)
    sched.add(_copy(reqs[0]))
    _drain(sched)
    for r in reqs[1:]:
        sched.add(_copy(r))
    events = _drain(sched)
    for r in reqs[1:]:
        adm = events[r.job_id][0]
        # all full prefix blocks (15 of 64 positions), but never the last prompt position
        assert isinstance(adm, Admitted) and adm.cached_tokens >= min(960, len(r.prompt_ids) - 1)
        got, want = events[r.job_id][-1], cold[r.job_id]
        assert isinstance(got, Finished) and isinstance(want, Finished)
        _same(want, got, f"{r.job_id} with the prefix cached")
    sched.blocks.check()


# ---------------------------------------------------------------------- every architecture

ARCH_MIX = {
    "qwen2": "q4_k_m",
    "phi3": "q4_k_m",
    "llama": "q4_k_m",
    "gpt2": "q4_k_m",
    "gpt-oss": "mxfp4",
}


@pytest.mark.parametrize("arch", sorted(ARCH_MIX))
def test_every_architecture_tiny(arch: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each layer recipe (tiny real-layout files: same tensor names, types and metadata as
    the full models): teacher-forced over a prompt and 32 decode steps against the NumPy
    reference; batch-invariant through the scheduler (alone vs 9 together)."""
    from tools.synth import preset, write_synthetic
    from worker.backends.cuda import CudaBackend
    from worker.backends.numpy_ref import NumpyBackend
    from worker.gguf.reader import open_gguf
    from worker.tokenizer.loader import load_tokenizer

    path = tmp_path_factory.mktemp("tiny") / f"{arch}.gguf"
    write_synthetic(path, preset(arch, "tiny", mix=ARCH_MIX[arch], seed=3))
    with open_gguf(path) as gf:
        tok = load_tokenizer(gf.metadata)
    be = CudaBackend(path, ctx_size=256, max_batch=16, kv_cache_size_mb=64)
    try:
        prompt, more = _sequence(be.vocab_size, 40, 32)  # > the gpt-oss tiny window (16)
        got = teacher_forced(be, prompt, more)
        again = teacher_forced(be, prompt, more)
        rnd = random.Random(7)
        reqs = [
            Request(
                f"t{k}",
                [rnd.randrange(be.vocab_size) for _ in range(rnd.randrange(1, 90))],
                max_tokens=rnd.randrange(3, 30),
                params=SamplingParams(temperature=0.0 if k % 2 else 0.9, top_k=20),
                seed=k,
            )
            for k in range(9)
        ]

        def run(rs: list[Request], mb: int) -> dict[str, list[EngineEvent]]:
            sched = Scheduler(be, tok, keep_logits=True, max_batch=mb, prefill_chunk=29)
            for r in rs:
                assert sched.add(_copy(r)) is None
            return _drain(sched)

        together = run(reqs, 9)
        for r in reqs:
            a, b = run([r], 1)[r.job_id][-1], together[r.job_id][-1]
            assert isinstance(a, Finished) and isinstance(b, Finished)
            _same(a, b, f"{arch} {r.job_id}")
        eager = CudaBackend(path, ctx_size=256, max_batch=16, kv_cache_size_mb=64, graphs=False)
        try:
            _graphs_equal_eager(be, eager, tok, reqs, prefill_chunk=29)
        finally:
            eager.close()
    finally:
        be.close()
    ref_be = NumpyBackend(path, ctx_size=256, max_batch=1)
    try:
        ref = teacher_forced(ref_be, prompt, more)
    finally:
        ref_be.close()
    assert np.array_equal(got, again)
    rels = [
        float(np.linalg.norm(got[i] - ref[i]) / np.linalg.norm(ref[i])) for i in range(len(got))
    ]
    print(f"\n{arch} tiny: max rel {max(rels):.3e}")
    assert max(rels) < REL_BOUND, rels
