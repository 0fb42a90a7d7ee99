"""The continuous-batching scheduler over the real NumPy backend (tiny synthetic qwen2 and
gpt-oss models with real tokenizer metadata): batch invariance (ids and bitwise logits
alone vs together), admission and waiting for KV blocks, prefix caching, chunked prefill
interleaved with decode, cancel and deadlines, and that every block comes back."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tools.synth import preset, write_synthetic
from worker.backends.numpy_ref import NumpyBackend
from worker.engine.generate import GenerateRequest, generate, prepare_prompt
from worker.engine.params import SamplingParams
from worker.engine.scheduler import (
    Admitted,
    EngineEvent,
    Failed,
    Finished,
    Request,
    Scheduler,
    TokenOut,
)
from worker.errors import ErrorCode
from worker.tokenizer.base import Tokenizer
from worker.tokenizer.loader import load_tokenizer

WORDS = (
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"),
    *("while", "seven", "wizards", "quietly", "hum"),
)


@pytest.fixture(scope="module", params=["qwen2", "gpt-oss"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sched") / f"tiny-{request.param}.gguf"
    write_synthetic(path, preset(request.param, "tiny"))
    return path


@pytest.fixture(scope="module")
def backend(model: Path) -> Iterator[NumpyBackend]:
    # a small prompt-chunk alignment so that prompts span several chunks
    b = NumpyBackend(
        model, ctx_size=1024, kv_tokens=8192, max_batch=16, block_size=16, prefill_chunk=32
    )
    yield b
    b.close()


@pytest.fixture(scope="module")
def tok(backend: NumpyBackend) -> Tokenizer:
    return load_tokenizer(backend.gf.metadata)


def _prompt(tok: Tokenizer, rnd: random.Random, n_words: int, prefix: str = "") -> list[int]:
    text = prefix + " ".join(rnd.choice(WORDS) for _ in range(n_words))
    return prepare_prompt(tok, prompt=text)


def _requests(tok: Tokenizer, n: int, seed: int = 1) -> list[Request]:
    rnd = random.Random(seed)
    reqs = []
    for k in range(n):
        sampled = k % 2 == 1
        reqs.append(
            Request(
                job_id=f"job{k}",
                prompt_ids=_prompt(tok, rnd, rnd.randrange(1, 30)),
                max_tokens=rnd.randrange(4, 24),
                params=SamplingParams(
                    temperature=0.8 if sampled else 0.0,
                    top_k=rnd.choice([0, 20]),
                    top_p=rnd.choice([1.0, 0.9]),
                    repetition_penalty=rnd.choice([1.0, 1.3]),
                ),
                seed=rnd.randrange(1 << 63),
                stop=["wizards"] if k % 3 == 0 else [],
            )
        )
    return reqs


def _drain(sched: Scheduler, limit: int = 5000) -> list[EngineEvent]:
    events: list[EngineEvent] = []
    for _ in range(limit):
        if sched.idle:
            return events
        events += sched.step()
    raise AssertionError("scheduler did not finish")


def _by_job(events: list[EngineEvent]) -> dict[str, list[EngineEvent]]:
    out: dict[str, list[EngineEvent]] = {}
    for ev in events:
        out.setdefault(ev.job_id, []).append(ev)
    return out


def _run(
    backend: NumpyBackend, tok: Tokenizer, reqs: list[Request], **kw: object
) -> dict[str, list[EngineEvent]]:
    sched = Scheduler(backend, tok, keep_logits=True, **kw)  # type: ignore[arg-type]
    for r in reqs:
        assert sched.add(r) is None
    events = _by_job(_drain(sched))
    sched.blocks.check()
    assert sched.blocks.used == 0  # every block came back
    return events


def _copy(r: Request) -> Request:
    return Request(r.job_id, list(r.prompt_ids), r.max_tokens, r.params, r.seed, list(r.stop))


def test_each_job_alone_equals_all_together_bitwise(backend: NumpyBackend, tok: Tokenizer) -> None:
    reqs = _requests(tok, 12)
    together = _run(backend, tok, [_copy(r) for r in reqs], max_batch=12, prefill_chunk=48)
    for r in reqs:
        alone = _run(backend, tok, [_copy(r)], max_batch=1, prefill_chunk=1000)[r.job_id]
        both = together[r.job_id]
        assert isinstance(both[0], Admitted) and isinstance(both[-1], Finished)
        fa, fb = alone[-1], both[-1]
        assert isinstance(fa, Finished) and isinstance(fb, Finished)
        assert fa.token_ids == fb.token_ids and fa.stop_reason == fb.stop_reason
        assert len(fa.logits) == len(fb.logits) > 0
        for la, lb in zip(fa.logits, fb.logits, strict=True):
            assert np.array_equal(la.view(np.uint32), lb.view(np.uint32))
        text = lambda evs: "".join(e.text for e in evs if isinstance(e, TokenOut))  # noqa: E731
        assert text(alone) == text(both)


def test_generate_is_one_job_through_the_scheduler(backend: NumpyBackend, tok: Tokenizer) -> None:
    r = _requests(tok, 3, seed=5)[1]
    end = generate(
        backend,
        tok,
        GenerateRequest(
            prompt_ids=r.prompt_ids,
            max_tokens=r.max_tokens,
            temperature=r.params.temperature,
            top_k=r.params.top_k,
            top_p=r.params.top_p,
            repetition_penalty=r.params.repetition_penalty,
            seed=r.seed,
            stop=r.stop,
        ),
    )
    fin = _run(backend, tok, [_copy(r)])[r.job_id][-1]
    assert isinstance(fin, Finished) and fin.token_ids == end.token_ids


def test_every_running_job_gets_a_token_every_step(backend: NumpyBackend, tok: Tokenizer) -> None:
    """A long prompt is prefilled in chunks while the running jobs keep decoding."""
    rnd = random.Random(3)
    sched = Scheduler(backend, tok, max_batch=8, prefill_chunk=32)
    for k in range(3):
        sched.add(
            Request(
                f"run{k}",
                _prompt(tok, rnd, 5),
                max_tokens=40,
                params=SamplingParams(temperature=0.0),
            )
        )
    for _ in range(3):  # everyone past its prompt
        sched.step()
    long_prompt = _prompt(tok, rnd, 40)
    assert len(long_prompt) > 3 * 32
    sched.add(Request("long", long_prompt, max_tokens=4, params=SamplingParams(temperature=0.0)))
    steps_with_prefill = 0
    while "long" not in sched.running or sched.running["long"].prefilling:
        before = {j: len(sched.running[j].generated) for j in ("run0", "run1", "run2")}
        sched.step()
        for j, n in before.items():  # one token each step (none has ended yet)
            assert len(sched.running[j].generated) == n + 1
        steps_with_prefill += 1
        assert sched.step_tokens <= 3 + 32
    assert steps_with_prefill >= len(long_prompt) // 32
    _drain(sched)


def _greedy(job_id: str, ids: list[int], n: int) -> Request:
    return Request(
        job_id, ids, max_tokens=n, params=SamplingParams(temperature=0.0), ignore_eos=True
    )


def test_new_prompts_wait_to_share_a_prefill_step(backend: NumpyBackend, tok: Tokenizer) -> None:
    """While jobs decode, new prompts start only when they fill the step's prompt budget or
    the oldest has waited prefill_wait; with nothing decoding, or a prompt under way, at once."""
    rnd = random.Random(6)
    sched = Scheduler(backend, tok, max_batch=16, prefill_chunk=64, prefill_wait=3600.0)
    first = _greedy("alone", _prompt(tok, rnd, 5), 200)
    sched.add(first)
    sched.step()  # nothing decodes: its prompt starts at once
    assert sched.step_tokens == len(first.prompt_ids)
    sched.step()
    assert sched.step_tokens == 1  # decoding
    shorts = [_greedy(f"s{k}", _prompt(tok, rnd, 3, prefix=f"{k} "), 8) for k in range(12)]
    added = 0
    while sum(len(r.prompt_ids) for r in shorts[:added]) < 64:
        sched.add(shorts[added])
        added += 1
        sched.step()
        if sum(len(r.prompt_ids) for r in shorts[:added]) < 64:
            assert sched.step_tokens == 1, added  # the new prompts wait
    started = [r for r in shorts[:added] if sched.running[r.job_id].started]
    assert len(started) >= 2 and sched.step_sequences == 1 + len(started)  # one shared step
    _drain(sched)

    sched.prefill_wait = 0.3  # the oldest waiting prompt starts once it has waited that long
    sched.add(_greedy("long-runner", _prompt(tok, rnd, 5), 200))
    for _ in range(3):
        sched.step()
    late = _greedy("late", _prompt(tok, rnd, 3), 4)
    sched.add(late)
    sched.step()
    assert not sched.running["late"].started
    time.sleep(0.35)
    sched.step()
    assert sched.running["late"].started and sched.step_tokens == 1 + len(late.prompt_ids)
    _drain(sched)
    sched.blocks.check()


def test_jobs_wait_for_blocks_and_never_fitting_ones_fail(model: Path, tok: Tokenizer) -> None:
    small = NumpyBackend(
        model, ctx_size=128, kv_tokens=128, max_batch=4, block_size=16, prefill_chunk=32
    )
    try:
        rnd = random.Random(4)
        sched = Scheduler(small, tok, context_length=4096)
        a = Request("a", _prompt(tok, rnd, 5), max_tokens=60, params=SamplingParams(temperature=0))
        b = Request("b", _prompt(tok, rnd, 5), max_tokens=60, params=SamplingParams(temperature=0))
        assert sched.add(a) is None and sched.add(b) is None
        ev = sched.step()
        assert [e.job_id for e in ev if isinstance(e, Admitted)] == ["a"]  # b waits
        assert "b" not in sched.running and sched.jobs == 2
        events = _by_job(_drain(sched))
        assert isinstance(events["a"][-1], Finished) and isinstance(events["b"][-1], Finished)
        # ... and one that could never fit is refused at once, retriable
        huge = sched.add(Request("huge", _prompt(tok, rnd, 20), max_tokens=2000))
        assert huge is not None and huge.error.code is ErrorCode.VRAM_OOM and huge.error.retriable
        long = sched.add(Request("long", [1] * 5000, max_tokens=1))
        assert long is not None and long.error.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
        sched.blocks.check()
        assert sched.blocks.used == 0
    finally:
        small.close()


def test_shared_prefix_is_computed_once_and_changes_no_bit(
    backend: NumpyBackend, tok: Tokenizer
) -> None:
    rnd = random.Random(9)
    system = "You are a careful assistant. " + " ".join(rnd.choice(WORDS) for _ in range(100))
    reqs = [
        Request(
            f"p{k}",
            _prompt(tok, rnd, 6, prefix=system + " "),
            max_tokens=6,
            params=SamplingParams(temperature=0.0),
        )
        for k in range(4)
    ]
    cold = {
        r.job_id: _run(backend, tok, [_copy(r)], prefix_cache=False)[r.job_id][-1] for r in reqs
    }
    sched = Scheduler(backend, tok, keep_logits=True)
    sched.add(_copy(reqs[0]))
    first = _by_job(_drain(sched))["p0"]
    adm0 = first[0]
    assert isinstance(adm0, Admitted) and adm0.cached_tokens == 0
    for r in reqs[1:]:
        sched.add(_copy(r))
    events = _by_job(_drain(sched))
    for r in reqs[1:]:
        adm = events[r.job_id][0]
        assert isinstance(adm, Admitted) and adm.cached_tokens >= 96  # whole 32-token units
        fin = events[r.job_id][-1]
        want = cold[r.job_id]
        assert isinstance(fin, Finished) and isinstance(want, Finished)
        assert fin.token_ids == want.token_ids
        for la, lb in zip(fin.logits, want.logits, strict=True):
            assert np.array_equal(la, lb)
    assert sched.blocks.hits > 0
    sched.blocks.check()


def test_cancel_and_deadline(backend: NumpyBackend, tok: Tokenizer) -> None:
    rnd = random.Random(2)
    sched = Scheduler(backend, tok, max_batch=2)
    for k in range(3):
        sched.add(
            Request(
                f"c{k}", _prompt(tok, rnd, 8), max_tokens=50, params=SamplingParams(temperature=0.0)
            )
        )
    sched.add(Request("late", _prompt(tok, rnd, 8), max_tokens=50, deadline=time.monotonic() - 1))
    first = sched.step()
    assert set(sched.running) == {"c0", "c1"}
    status, ev = sched.cancel("c0")
    assert status == "running" and isinstance(ev, Failed) and ev.error.code is ErrorCode.CANCELLED
    status, ev = sched.cancel("c2")
    assert status == "queued" and ev is not None
    assert sched.cancel("nope") == ("unknown", None)
    events = _by_job(first + _drain(sched))
    late = events["late"][-1]
    assert isinstance(late, Failed) and late.error.code is ErrorCode.INFERENCE_TIMEOUT
    assert isinstance(events["c1"][-1], Finished)
    assert sched.blocks.used == 0


def test_overlapped_steps_give_what_serial_steps_give(
    backend: NumpyBackend, tok: Tokenizer
) -> None:
    """Launching step k+1 before collecting step k (pending decode rows, the default) changes
    no job's ids, text or stop reason, whether jobs arrive together or while others run, end
    on EOS, stop strings or their limit, or are cancelled; every block comes back."""
    reqs = _requests(tok, 14, seed=9)
    for r in reqs[2::4]:
        r.stop = ["o", "+"]  # stop strings these tiny models do produce

    def run(overlap: bool) -> dict[str, list[EngineEvent]]:
        sched = Scheduler(backend, tok, max_batch=6, prefill_chunk=40, overlap=overlap)
        assert sched.overlap is overlap
        events: list[EngineEvent] = []
        todo = [_copy(r) for r in reqs]
        for k in range(5000):
            if k % 3 == 0 and todo:  # arrivals while others decode
                assert sched.add(todo.pop(0)) is None
            if k == 12:  # a cancel with steps in flight
                status, ev = sched.cancel("job1")
                assert status == "running" and ev is not None
                events.append(ev)
            if sched.idle and not todo:
                break
            events += sched.step()
        sched.blocks.check()
        assert sched.blocks.used == 0
        return _by_job(events)

    serial, overlapped = run(False), run(True)
    assert serial.keys() == overlapped.keys() == {r.job_id for r in reqs}
    reasons = set()
    for job, evs in serial.items():
        a, b = evs[-1], overlapped[job][-1]
        if job == "job1":
            assert isinstance(b, Failed) and b.error.code == ErrorCode.CANCELLED
            continue
        assert isinstance(a, Finished) and isinstance(b, Finished), job
        assert (a.token_ids, a.stop_reason) == (b.token_ids, b.stop_reason), job
        text = lambda evs: "".join(e.text for e in evs if isinstance(e, TokenOut))  # noqa: E731
        assert text(evs) == text(overlapped[job])
        idx = [e.i for e in overlapped[job] if isinstance(e, TokenOut)]
        assert idx == sorted(idx)  # in order
        reasons.add(a.stop_reason)
    assert reasons >= {"max_tokens", "stop"}
