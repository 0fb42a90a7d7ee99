"""Inference actor: one job at a time on the backend thread.

For each `Ticket` from the frontend it prepares the prompt, publishes `started`, runs the
engine's decode loop (worker.engine.generate) on the backend thread with the job's cancel
flag (checked every decode step), a deadline (--inference-timeout-sec) and a token callback,
and finishes with exactly one terminal event (`end` or `error`). A job whose prompt is
longer than the context (CONTEXT_LENGTH_EXCEEDED) or that may need more KV cache than this
worker holds (VRAM_OOM, retriable) gets its `error` before `started` and before any work
(worker.engine.generate.plan_job). Events leave the backend
thread through ``loop.call_soon_threadsafe`` into a bounded channel the frontend drains, so
the decode loop never waits on NATS. Any exception of a job becomes that job's `error`
event (``INTERNAL`` if it is not a WorkerError): a job never takes the process down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.backend_thread import BackendThread
from actors.cancellation import ActiveJob
from actors.loader import LoadedModel
from worker.engine.rng import new_seed
from worker.errors import ErrorCode, WorkerError
from worker.metrics import WorkerMetrics
from worker.narration import narrate, text_fields
from worker.protocol import (
    MAX_STOP_TOKENS,
    End,
    Error,
    Event,
    Job,
    Metrics,
    Started,
    Token,
    rfc3339_now,
)

METRICS_EVENT_INTERVAL_S = 1.0


@dataclass
class Ticket:
    """A validated job handed from the frontend to the inference actor."""

    job: Job
    attempt: int
    active: ActiveJob
    received_at: float = field(default_factory=time.perf_counter)


@dataclass
class JobLimits:
    max_tokens_out: int
    inference_timeout_s: float


def _emitter(
    loop: asyncio.AbstractEventLoop, events: MemoryObjectSendStream[Event]
) -> Callable[[Event], None]:
    def emit(ev: Event) -> None:
        loop.call_soon_threadsafe(events.send_nowait, ev)

    return emit


def run_job_blocking(
    model: LoadedModel,
    ticket: Ticket,
    limits: JobLimits,
    worker_id: str,
    emit: Callable[[Event], None],
    metrics: WorkerMetrics,
) -> End | Error:
    """Everything of one job that touches the backend; runs on the backend thread."""
    from worker.engine.generate import GenerateRequest, generate, plan_job, prepare_prompt

    job = ticket.job
    tok = model.tokenizer
    backend = model.backend
    t_start = time.perf_counter()
    try:
        prompt_ids = prepare_prompt(
            tok,
            prompt=job.prompt,
            messages=None
            if job.messages is None
            else [{"role": m.role, "content": m.content} for m in job.messages],
        )
        for s in job.stop:
            n = len(tok.encode(s, add_special=False, parse_special=False))
            if n > MAX_STOP_TOKENS:
                raise WorkerError(
                    ErrorCode.INVALID_REQUEST,
                    f"stop string {s[:40]!r} is {n} tokens long, at most {MAX_STOP_TOKENS} allowed",
                )
        max_tokens = min(job.max_tokens, limits.max_tokens_out)
        # a prompt longer than the context -> CONTEXT_LENGTH_EXCEEDED; a job that may need
        # more KV slots than the cache holds -> VRAM_OOM (docs/design.md). Decided here, before
        # `started` and any work (generate() applies the same plan_job again before its first
        # forward).
        plan_job(
            len(prompt_ids),
            max_tokens,
            context_length=model.context_length,
            kv_capacity=backend.context_length,
        )
        seed = job.seed if job.seed is not None else new_seed()
        emit(
            Started(
                job_id=job.job_id,
                model=model.model_name,
                started_at=rfc3339_now(),
                seed=seed,
                prompt_tokens=len(prompt_ids),
                attempt=ticket.attempt,
                worker_id=worker_id,
            )
        )
        request = GenerateRequest(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=job.temperature,
            top_p=job.top_p,
            top_k=job.top_k,
            min_p=job.min_p,
            repetition_penalty=job.repetition_penalty,
            stop=list(job.stop),
            seed=seed,
        )
        output: list[str] = []
        last_t = [t_start, t_start]  # [previous token time, last metrics event time]
        count = [0]

        def on_token(i: int, text: str, token_id: int) -> None:
            now = time.perf_counter()
            if count[0] == 0:
                metrics.ttft.observe(now - t_start)
            else:
                metrics.inter_token.observe(now - last_t[0])
            last_t[0] = now
            count[0] += 1
            output.append(text)
            if ticket.active.cancel.is_set():
                ticket.active.tokens_after_cancel += 1
            emit(Token(job_id=job.job_id, i=i, t=text, id=token_id))
            if now - last_t[1] >= METRICS_EVENT_INTERVAL_S:
                last_t[1] = now
                emit(
                    Metrics(
                        job_id=job.job_id,
                        tokens=count[0],
                        tokens_per_s=round(count[0] / max(now - t_start, 1e-9), 3),
                    )
                )

        result = generate(
            backend,
            tok,
            request,
            should_cancel=ticket.active.cancel.is_set,
            deadline=time.monotonic() + limits.inference_timeout_s,
            on_token=on_token,
            context_length=model.context_length,
        )
        metrics.tokens.inc(result.tokens_out)
        narrate(
            "execute_end",
            f"{result.tokens_out} tokens, {result.stop_reason}",
            job_id=job.job_id,
            tokens_out=result.tokens_out,
            stop_reason=result.stop_reason,
            ttft_ms=round(result.ttft_ms, 3),
            tokens_per_s=round(result.tokens_per_s, 2),
            **text_fields("output", "".join(output)),
        )
        return End(
            job_id=job.job_id,
            tokens_out=result.tokens_out,
            stop_reason=result.stop_reason,
            prompt_tokens=len(prompt_ids),
            ttft_ms=round(result.ttft_ms, 3),
            decode_time_ms=round(result.decode_time_ms, 3),
            tokens_per_s=round(result.tokens_per_s, 3),
        )
    except WorkerError as exc:
        if exc.code is ErrorCode.CANCELLED and ticket.active.cancel_requested_at is not None:
            latency = (time.perf_counter() - ticket.active.cancel_requested_at) * 1000
            narrate(
                "cancelled",
                f"stopped {latency:.2f} ms after the cancel",
                job_id=job.job_id,
                cancel_latency_ms=round(latency, 3),
                tokens_after_cancel=ticket.active.tokens_after_cancel,
            )
        return Error(job_id=job.job_id, code=exc.code, message=exc.message, retriable=exc.retriable)
    except Exception as exc:  # a bug or backend failure in one job: report it, keep serving
        narrate(
            "error",
            f"job failed: {type(exc).__name__}: {exc}",
            level="ERROR",
            job_id=job.job_id,
            exc_info=True,
        )
        return Error(
            job_id=job.job_id,
            code=ErrorCode.INTERNAL,
            message=f"{type(exc).__name__}: {exc}",
            retriable=True,
        )
    finally:
        try:
            backend.reset()
        except Exception as exc:  # pragma: no cover
            narrate("error", f"backend reset failed: {exc}", level="ERROR", job_id=job.job_id)


async def inference_actor(
    tickets: MemoryObjectReceiveStream[Ticket],
    events: MemoryObjectSendStream[Event],
    thread: BackendThread,
    model: LoadedModel,
    limits: JobLimits,
    worker_id: str,
    metrics: WorkerMetrics,
    on_busy: Callable[[bool], Any],
) -> None:
    loop = asyncio.get_running_loop()
    async with tickets, events:
        async for ticket in tickets:
            job = ticket.job
            narrate(
                "execute_start",
                f"attempt {ticket.attempt}",
                job_id=job.job_id,
                attempt=ticket.attempt,
                max_tokens=job.max_tokens,
                temperature=job.temperature,
                **(
                    text_fields("prompt", job.prompt)
                    if job.prompt is not None
                    else text_fields("prompt", "".join(m.content for m in job.messages or []))
                ),
            )
            on_busy(True)
            emit = _emitter(loop, events)
            try:
                terminal = await thread.call(
                    run_job_blocking, model, ticket, limits, worker_id, emit, metrics
                )
            finally:
                on_busy(False)
            # The terminal event follows every event the thread emitted (FIFO callbacks).
            await anyio.lowlevel.checkpoint()
            await events.send(terminal)
