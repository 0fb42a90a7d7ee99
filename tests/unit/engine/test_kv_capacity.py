"""Context vs KV capacity: a prompt longer than the context gets CONTEXT_LENGTH_EXCEEDED (not
retriable); a job within the context that may need more KV positions than the cache could
ever give it gets VRAM_OOM (retriable) before any work, and the next job runs. The rule
itself (plan_job), generate() over the real NumPy backend, and the worker's job preparation
and scheduler over a real loaded tiny model (no NATS)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.inference import prepare_request
from actors.loader import LoadedModel, load_model_blocking
from tools.synth import preset, write_synthetic
from worker.backends.numpy_ref import NumpyBackend
from worker.config import WorkerConfig
from worker.engine.generate import GenerationRequest, JobPlan, generate, plan_job, prepare_prompt
from worker.engine.params import SamplingParams
from worker.engine.scheduler import Admitted, EngineEvent, Failed, Finished, Scheduler
from worker.errors import ContextLengthExceeded, ErrorCode, VramOom, WorkerError
from worker.gguf.reader import GGUFFile, open_gguf
from worker.protocol import Job
from worker.tokenizer.base import Tokenizer
from worker.tokenizer.loader import load_tokenizer

GREEDY = SamplingParams(temperature=0.0)


# ------------------------------------------------------------------ the rule (plan_job)


@pytest.mark.parametrize(
    ("n_prompt", "max_tokens", "context", "kv", "limit", "kv_tokens"),
    [
        (24, 100, 32, 32, 9, 32),  # max_tokens capped by the context: 32 - 24 + 1
        (23, 5, 32, 32, 5, 27),
        (32, 5, 32, 32, 1, 32),  # prompt fills the context: one token, never fed back
        (1, 2048, 64, 64, 64, 64),
        (10, 4, 2048, 1024, 4, 13),  # KV smaller than the context, job fits
        (1000, 25, 2048, 1024, 25, 1024),  # exactly fills the KV
        (1024, 1, 2048, 1024, 1, 1024),
    ],
)
def test_plan_job_caps_and_counts_kv_slots(
    n_prompt: int,
    max_tokens: int,
    context: int,
    kv: int,
    limit: int,
    kv_tokens: int,
) -> None:
    plan = plan_job(n_prompt, max_tokens, context_length=context, kv_capacity=kv)
    assert plan == JobPlan(limit=limit, kv_tokens=kv_tokens)


@pytest.mark.parametrize(
    ("n_prompt", "max_tokens", "needed"),
    [
        (1000, 26, 1025),  # one slot too many
        (1025, 1, 1025),  # the prompt alone is within the context, not within the KV
        (1500, 1, 1500),
        (10, 2000, 2009),  # a short prompt asking for many tokens
        (10, 2048, 2048),  # max_tokens capped by the context first: 10 + 2039 - 1
        (2048, 1, 2048),
    ],
)
def test_plan_job_vram_oom_when_the_kv_cannot_hold_the_job(
    n_prompt: int, max_tokens: int, needed: int
) -> None:
    with pytest.raises(VramOom) as info:
        plan_job(n_prompt, max_tokens, context_length=2048, kv_capacity=1024)
    err = info.value
    assert err.code is ErrorCode.VRAM_OOM and err.retriable
    assert f"needs {needed} KV cache tokens" in err.message
    assert "holds 1024 tokens" in err.message


@pytest.mark.parametrize(
    ("n_prompt", "context", "kv"),
    [(33, 32, 32), (2049, 2048, 1024), (5000, 2048, 4096)],
)
def test_plan_job_prompt_longer_than_the_context(n_prompt: int, context: int, kv: int) -> None:
    """CONTEXT_LENGTH_EXCEEDED wins over VRAM_OOM, and is not retriable."""
    with pytest.raises(ContextLengthExceeded) as info:
        plan_job(n_prompt, 1, context_length=context, kv_capacity=kv)
    assert info.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED and not info.value.retriable
    assert f"prompt is {n_prompt} tokens" in info.value.message
    assert f"context is {context} tokens" in info.value.message


def test_plan_job_never_oom_when_the_kv_holds_the_context() -> None:
    """With KV capacity == context every prompt within the context plans, whatever
    max_tokens asks: the cap by the context keeps the job inside the cache."""
    for n in range(1, 65):
        for m in (1, 2, 63, 64, 65, 2048):
            plan = plan_job(n, m, context_length=64, kv_capacity=64)
            assert plan.limit == min(m, 64 - n + 1) and plan.kv_tokens <= 64


def test_plan_job_bad_requests() -> None:
    for n, m in ((0, 5), (5, 0)):
        with pytest.raises(WorkerError) as info:
            plan_job(n, m, context_length=64, kv_capacity=64)
        assert info.value.code is ErrorCode.INVALID_REQUEST


# ------------------------------------------------------------------ generate() on NumPy


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-qwen2.gguf"
    write_synthetic(path, preset("qwen2", "tiny", seed=3).scaled(n_ctx=2048))
    return path


@pytest.fixture(scope="module")
def tiny_file(tiny_path: Path) -> Iterator[GGUFFile]:
    gf = open_gguf(tiny_path)
    yield gf
    gf.close()


@pytest.fixture(scope="module")
def tok(tiny_file: GGUFFile) -> Tokenizer:
    return load_tokenizer(tiny_file.metadata)


def test_generate_context_beyond_the_kv(tiny_file: GGUFFile, tok: Tokenizer) -> None:
    """Context 64 over a 32-token KV cache: what fits runs, what may not fit is VRAM_OOM
    before any forward, and the backend serves the next job."""
    small = NumpyBackend(tiny_file, ctx_size=32)
    assert small.context_length == 32
    prompt = (prepare_prompt(tok, prompt="Hello world, this is a test") * 8)[:24]

    end = generate(small, tok, GenerationRequest(prompt, 9, GREEDY), context_length=64)
    assert end.tokens_out == 9 or end.stop_reason == "eos"

    # 24 + 10 - 1 = 33 slots > 32: refused before the first forward
    with pytest.raises(VramOom) as info:
        generate(small, tok, GenerationRequest(prompt, 10, GREEDY), context_length=64)
    assert info.value.retriable and "needs 33 KV cache tokens" in info.value.message
    # a prompt within the context but longer than the KV
    long_prompt = (prompt * 3)[:40]
    with pytest.raises(VramOom):
        generate(small, tok, GenerationRequest(long_prompt, 1, GREEDY), context_length=64)
    # longer than the context: not retriable
    with pytest.raises(ContextLengthExceeded):
        generate(small, tok, GenerationRequest((prompt * 3)[:65], 1, GREEDY), context_length=64)

    # the same backend serves the next job, identical to a fresh run
    again = generate(small, tok, GenerationRequest(prompt, 9, GREEDY), context_length=64)
    assert again.token_ids == end.token_ids
    # without context_length the KV capacity is the context: max_tokens is capped, not OOM
    capped = generate(small, tok, GenerationRequest(prompt, 100, GREEDY))
    assert capped.tokens_out == 9 or capped.stop_reason == "eos"


# ------------------------------------------------------------------ the worker's job path


@pytest.fixture(scope="module")
def loaded(tiny_path: Path) -> Iterator[LoadedModel]:
    """The worker's real load path: --ctx-size 2048 --kv-cache-size-mb 1 on a model whose
    KV costs 1 KiB per token (2 layers x 2 KV heads x (32 + 32) x float32): 1024 KV slots."""
    cfg = WorkerConfig(model=tiny_path, device="cpu", ctx_size=2048, kv_cache_size_mb=1)
    model = load_model_blocking(cfg)
    yield model
    model.backend.close()


def run_job(model: LoadedModel, job: Job, max_tokens_out: int = 2048) -> list[EngineEvent]:
    """A job as the inference actor runs it: prepared, then through a scheduler."""
    cfg = WorkerConfig(
        model=Path("tiny.gguf"), device="cpu", max_tokens_out=max_tokens_out, ctx_size=2048
    )
    sched = Scheduler(model.backend, model.tokenizer, context_length=model.context_length)
    failed = sched.add(prepare_request(model.tokenizer, job, time.perf_counter(), cfg))
    if failed is not None:
        return [failed]
    events: list[EngineEvent] = []
    while not sched.idle:
        events += sched.step()
    assert sched.blocks.used == 0
    return events


def test_loader_context_is_ctx_size_and_kv_capacity_is_what_was_allocated(
    loaded: LoadedModel,
) -> None:
    assert loaded.context_length == 2048
    assert loaded.backend.context_length == 1024


def test_loader_context_defaults_to_the_model_context(tiny_path: Path) -> None:
    cfg = WorkerConfig(model=tiny_path, device="cpu", kv_cache_size_mb=1)
    model = load_model_blocking(cfg)
    try:
        assert model.context_length == 2048  # the file's qwen2.context_length
        assert model.backend.n_blocks * model.backend.block_size == 1024
    finally:
        model.backend.close()


def _error(events: list[EngineEvent]) -> WorkerError:
    assert len(events) == 1 and isinstance(events[0], Failed), events  # nothing ran
    return events[0].error


def test_vram_oom_before_started_then_serves_the_next_job(loaded: LoadedModel) -> None:
    # "word " is 5 tokens in this vocabulary: 300 -> ~1500 tokens, inside 2048, over 1024
    err = _error(run_job(loaded, Job(job_id="big", prompt="word " * 300, max_tokens=1)))
    assert err.code is ErrorCode.VRAM_OOM
    assert err.retriable and "holds 1024 tokens" in err.message

    # a short prompt whose max_tokens (capped by the 2048 context) may overflow the KV
    err = _error(run_job(loaded, Job(job_id="long-out", prompt="hi", max_tokens=2000)))
    assert err.code is ErrorCode.VRAM_OOM and err.retriable
    # --max-tokens-out caps max_tokens before the KV is counted: the same job then fits
    events = run_job(loaded, Job(job_id="capped", prompt="hi", max_tokens=2000, temperature=0), 8)
    assert isinstance(events[0], Admitted) and isinstance(events[-1], Finished)
    assert events[-1].tokens_out <= 8

    err = _error(run_job(loaded, Job(job_id="too-long", prompt="word " * 500)))
    assert err.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED and not err.retriable

    events = run_job(loaded, Job(job_id="small", prompt="hello", max_tokens=6, temperature=0))
    assert isinstance(events[0], Admitted) and isinstance(events[-1], Finished)
    assert events[-1].tokens_out == 6 or events[-1].stop_reason == "eos"
