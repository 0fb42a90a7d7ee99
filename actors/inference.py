"""Inference actor: the jobs this worker holds, run together in one batch on the engine thread.

Two halves joined by anyio's thread bridge:

- the async half (`inference_actor`) takes `NewJob`, `CancelJob` and `ResidencyCheck` messages,
  turns each job into an engine `Request` (chat template, tokenization, checks that need
  the tokenizer) and hands it to the engine thread; a job that is invalid here gets its
  `error` event at once;
- the engine thread (`EngineLoop.run`, started with `anyio.to_thread.run_sync` so it lives
  on one OS thread for the worker's whole life, as a CUDA context must) loads the model,
  then loops: take what arrived (between two steps), run one `Scheduler` step for every
  running job, send the step's protocol events to the frontend. Cancels take effect at the
  next step boundary, so a running job stops within one step.

Every job ends with exactly one terminal event (`end` or `error`). A failure of one job
(e.g. NaN logits) is that job's `error`; a failed step is a device failure: every job it held
gets CUDA_ERROR, health turns unhealthy and the worker drains and exits non-zero, so its
supervisor restarts it and JetStream redelivers the jobs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.loader import LoadedModel, load_model_blocking
from actors.messages import (
    Admit,
    CancelJob,
    DeviceStatus,
    EngineIn,
    InferenceIn,
    JobEvents,
    NewJob,
    Outgoing,
    Reply,
)
from worker.config import WorkerConfig
from worker.engine.generate import prepare_prompt
from worker.engine.params import SamplingParams
from worker.engine.rng import new_seed
from worker.engine.scheduler import Admitted, Failed, Finished, Request, Scheduler, TokenOut
from worker.errors import Cancelled, CudaError, ErrorCode, WorkerError
from worker.metrics import WorkerMetrics
from worker.narration import TextDigest, narrate, text_fields
from worker.protocol import (
    MAX_STOP_TOKENS,
    CancelReply,
    CancelStatus,
    End,
    Error,
    Event,
    Job,
    Metrics,
    Started,
    Token,
    encode,
    rfc3339_now,
)

METRICS_EVENT_INTERVAL_S = 1.0
RECENT_JOBS = 10000  # job ids remembered for idempotent cancel replies
PENDING_CANCEL_TTL_S = 3600.0


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """What the rest of the worker needs to know about the loaded model."""

    model_name: str
    quant_kind: str
    tokenizer_kind: str
    vocab_size: int
    context_length: int
    kv_capacity_tokens: int
    max_batch: int
    info: Any  # BackendInfo
    has_chat_template: bool


@dataclass
class _Job:
    job: Job
    attempt: int
    seed: int
    t0: float  # receipt (perf_counter)
    last: float = 0.0  # last token (for the inter-token histogram)
    last_metrics: float = 0.0
    tokens: int = 0
    output: TextDigest = field(default_factory=TextDigest)
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=8))  # token times


class _Recent:
    """Bounded, expiring set of job ids."""

    def __init__(self, max_items: int, ttl_s: float = float("inf")) -> None:
        self.max_items, self.ttl_s = max_items, ttl_s
        self._d: OrderedDict[str, float] = OrderedDict()

    def add(self, key: str) -> bool:
        """Add; False when it was already there."""
        fresh = key not in self
        self._d[key] = time.monotonic() + self.ttl_s
        self._d.move_to_end(key)
        while len(self._d) > self.max_items:
            self._d.popitem(last=False)
        return fresh

    def __contains__(self, key: object) -> bool:
        exp = self._d.get(key) if isinstance(key, str) else None
        return exp is not None and exp > time.monotonic()

    def discard(self, key: str) -> None:
        self._d.pop(key, None)


class EngineLoop:
    """The engine thread's loop (see the module docstring). Only `run` runs on that thread;
    it talks to the event loop through anyio.from_thread."""

    def __init__(
        self,
        cfg: WorkerConfig,
        inbox: MemoryObjectReceiveStream[EngineIn],
        outbox: MemoryObjectSendStream[Outgoing],
        loaded: MemoryObjectSendStream[ModelSummary],
        metrics: WorkerMetrics,
    ) -> None:
        self.cfg = cfg
        self.inbox = inbox
        self.outbox = outbox
        self.loaded = loaded
        self.metrics = metrics
        self.jobs: dict[str, _Job] = {}
        self.finished = _Recent(RECENT_JOBS)
        self.pending_cancels = _Recent(RECENT_JOBS, PENDING_CANCEL_TTL_S)
        self.model: LoadedModel | None = None
        self.sched: Scheduler | None = None
        self._out: list[Event] = []
        self._replies: list[Reply] = []
        # Fault drill: WORKER_ORCD_FAIL_STEP=N makes engine step N fail the way a device error
        # does (every held job CUDA_ERROR and handed back, health unhealthy, drain, exit 3).
        self._fail_step = int(os.environ.get("WORKER_ORCD_FAIL_STEP", "0") or 0)

    # ------------------------------------------------------------------ thread side

    def run(self) -> None:
        cfg = self.cfg
        self.model = model = load_model_blocking(cfg)
        try:
            backend = model.backend
            self.sched = Scheduler(
                backend,
                model.tokenizer,
                max_batch=cfg.max_batch,
                prefill_chunk=cfg.prefill_chunk,
                prefill_wait=cfg.prefill_wait_ms / 1000.0,
                context_length=model.context_length,
                prefix_cache=cfg.prefix_cache,
            )
            summary = ModelSummary(
                model_name=model.model_name,
                quant_kind=model.quant_kind,
                tokenizer_kind=model.tokenizer.kind,
                vocab_size=backend.vocab_size,
                context_length=model.context_length,
                kv_capacity_tokens=self.sched.kv_capacity,
                max_batch=self.sched.max_batch,
                info=backend.info,
                has_chat_template=_has_chat_template(model.tokenizer),
            )
            anyio.from_thread.run(self.loaded.send, summary)
            self._loop()
        finally:
            model.backend.close()

    def _loop(self) -> None:
        sched = self.sched
        assert sched is not None
        msgs: list[EngineIn | None] = []
        while True:
            if sched.idle and not msgs:
                try:
                    first = anyio.from_thread.run(self.inbox.receive)
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return
                msgs = [first, *anyio.from_thread.run_sync(self._take)]
            stop = False
            for m in msgs:
                if m is None:
                    stop = True
                else:
                    self._handle(m)
            if not sched.idle:
                self._step()
            # one trip to the event loop a step: this step's events out, what arrived in
            msgs = self._flush(take=not stop)
            if stop:
                for ev in sched.fail_all(Cancelled("the worker is shutting down")):
                    self._emit_engine(ev)
                if self._out:
                    self._flush()
                return

    def _take(self) -> list[EngineIn | None]:
        """Everything waiting in the inbox (runs on the event loop); None marks its end."""
        out: list[EngineIn | None] = []
        while True:
            try:
                out.append(self.inbox.receive_nowait())
            except anyio.WouldBlock:
                return out
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                out.append(None)
                return out

    def _flush(self, take: bool = False) -> list[EngineIn | None]:
        """Hand the events and replies gathered so far to the frontend and, with `take`,
        return what waits in the inbox: one call into the event loop for both (the thread
        waits for the loop on every such call, and under load the loop is busy)."""
        batch: list[Outgoing] = []
        if self._out:
            batch.append(JobEvents(self._out))
        batch.extend(self._replies)
        self._out, self._replies = [], []
        if not batch and not take:
            return []
        try:
            # a plain callback when the outbox has room (the common case: no task for
            # the loop to create); a full outbox (frontend behind) is waited on
            left, got = anyio.from_thread.run_sync(self._send_and_take_now, batch, take)
            if not left:
                return got
            return anyio.from_thread.run(self._send_and_take, left, take)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return [None] if take else []  # the frontend is gone: shutting down

    def _send_and_take_now(
        self, batch: list[Outgoing], take: bool
    ) -> tuple[list[Outgoing], list[EngineIn | None]]:
        """(event loop) Send what fits in the outbox now: the rest is returned, or else
        (with `take`) what waits in the inbox."""
        for k, item in enumerate(batch):
            try:
                self.outbox.send_nowait(item)
            except anyio.WouldBlock:
                return batch[k:], []
        return [], self._take() if take else []

    async def _send_and_take(self, batch: list[Outgoing], take: bool) -> list[EngineIn | None]:
        for item in batch:
            await self.outbox.send(item)
        return self._take() if take else []

    def _handle(self, m: EngineIn) -> None:
        if isinstance(m, Admit):
            self._admit(m)
        elif isinstance(m, CancelJob):
            self._cancel(m)
        else:
            result: Any
            try:
                backend = self.model.backend if self.model is not None else None
                assert backend is not None
                result = (backend.check_residency(), backend.info)
            except Exception as exc:
                result = exc
            anyio.from_thread.run_sync(m.reply.send_nowait, result)

    def _admit(self, m: Admit) -> None:
        sched = self.sched
        assert sched is not None
        job_id = m.job.job_id
        self.finished.discard(job_id)
        self.jobs[job_id] = _Job(m.job, m.attempt, m.request.seed, m.request.received)
        if job_id in self.pending_cancels:
            self.pending_cancels.discard(job_id)
            narrate("cancelled", "job cancelled before it started", job_id=job_id)
            self._emit_engine(Failed(job_id, Cancelled("job cancelled before it started")))
            return
        failed = sched.add(m.request)
        if failed is not None:
            self._emit_engine(failed)

    def _cancel(self, m: CancelJob) -> None:
        sched = self.sched
        assert sched is not None
        status: CancelStatus
        where, ev = sched.cancel(m.job_id, Cancelled(m.reason, m.code))
        if ev is not None:
            status = "cancelling"
            info = self.jobs.get(m.job_id)
            if info is not None:
                latency = (time.perf_counter() - m.requested) * 1000
                narrate(
                    "cancelled",
                    f"stopped {latency:.2f} ms after the cancel ({where})",
                    job_id=m.job_id,
                    cancel_latency_ms=round(latency, 3),
                    reason=m.reason,
                    # tokens that went out after the cancel was asked for (the step in flight)
                    tokens_after_cancel=sum(t > m.requested for t in info.recent),
                )
            self._emit_engine(ev)
        elif m.job_id in self.finished:
            status = "already_finished"
        else:
            status = "recorded" if self.pending_cancels.add(m.job_id) else "already_recorded"
        narrate("cancel", f"cancel request: {status}", job_id=m.job_id, status=status)
        if m.reply_to:
            payload = encode(
                CancelReply(job_id=m.job_id, status=status, worker_id=self.cfg.worker_id)
            )
            self._replies.append(Reply(m.reply_to, payload))

    def _step(self) -> None:
        sched = self.sched
        assert sched is not None
        try:
            steps = sched.steps
            if self._fail_step and steps + 1 >= self._fail_step:
                self._fail_step = 0
                raise CudaError(
                    f"injected device fault at step {steps + 1} (WORKER_ORCD_FAIL_STEP)"
                )
            events = sched.step()
        except Exception as exc:
            self._device_failed(exc)
            return
        if sched.steps != steps:
            self.metrics.step_sequences.observe(sched.step_sequences)
        for ev in events:
            self._emit_engine(ev)

    def _device_failed(self, exc: Exception) -> None:
        """A step failed: every job held ends with the error; on a CUDA error the device is
        suspect, so the worker reports unhealthy and drains (the supervisor exits non-zero)."""
        sched = self.sched
        assert sched is not None
        fatal = isinstance(exc, CudaError) or self.cfg.device == "cuda"
        err = (
            exc
            if isinstance(exc, WorkerError) and exc.code is ErrorCode.CUDA_ERROR
            else WorkerError(
                ErrorCode.CUDA_ERROR if fatal else ErrorCode.INTERNAL,
                f"{type(exc).__name__}: {exc}",
                retriable=True,
            )
        )
        narrate(
            "error",
            f"step failed: {type(exc).__name__}: {exc}",
            level="CRITICAL" if fatal else "ERROR",
            exc_info=True,
            code=err.code.value,
        )
        for ev in sched.fail_all(err):
            self._emit_engine(ev)
        if fatal:
            self._out_status(DeviceStatus(unhealthy_reason=f"device failure: {exc}", fatal=True))

    def _out_status(self, st: DeviceStatus) -> None:
        if self._out:
            self._flush()
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            anyio.from_thread.run(self.outbox.send, st)

    # ------------------------------------------------------------------ engine -> protocol

    def _emit_engine(self, ev: Admitted | TokenOut | Finished | Failed) -> None:
        info = self.jobs.get(ev.job_id)
        if info is None:  # pragma: no cover - every event belongs to a job we registered
            return
        out = self._out
        now = time.perf_counter()
        m = self.metrics
        if isinstance(ev, TokenOut):
            if info.tokens == 0:
                m.ttft.observe(now - info.t0)
            else:
                m.inter_token.observe(now - info.last)
            info.last = now
            info.recent.append(now)
            info.tokens += 1
            info.output.add(ev.text)
            out.append(Token(job_id=ev.job_id, i=ev.i, t=ev.text, id=ev.id))
            if now - info.last_metrics >= METRICS_EVENT_INTERVAL_S:
                info.last_metrics = now
                out.append(
                    Metrics(
                        job_id=ev.job_id,
                        tokens=info.tokens,
                        tokens_per_s=round(info.tokens / max(now - info.t0, 1e-9), 3),
                    )
                )
            return
        if isinstance(ev, Admitted):
            info.last_metrics = now
            job = info.job
            narrate(
                "execute_start",
                f"attempt {info.attempt}",
                job_id=ev.job_id,
                attempt=info.attempt,
                max_tokens=job.max_tokens,
                temperature=job.temperature,
                prompt_tokens=ev.prompt_tokens,
                cached_tokens=ev.cached_tokens,
                running_jobs=len(self.jobs),
                **(
                    text_fields("prompt", job.prompt)
                    if job.prompt is not None
                    else text_fields("prompt", "".join(x.content for x in job.messages or []))
                ),
            )
            model = self.model
            assert model is not None
            out.append(
                Started(
                    job_id=ev.job_id,
                    model=model.model_name,
                    started_at=rfc3339_now(),
                    seed=info.seed,
                    prompt_tokens=ev.prompt_tokens,
                    attempt=info.attempt,
                    worker_id=self.cfg.worker_id,
                )
            )
            return
        del self.jobs[ev.job_id]
        self.finished.add(ev.job_id)
        if isinstance(ev, Finished):
            m.tokens.inc(ev.tokens_out)
            narrate(
                "execute_end",
                f"{ev.tokens_out} tokens, {ev.stop_reason}",
                job_id=ev.job_id,
                tokens_out=ev.tokens_out,
                stop_reason=ev.stop_reason,
                ttft_ms=round(ev.ttft_ms, 3),
                tokens_per_s=round(ev.tokens_per_s, 2),
                **info.output.fields("output"),
            )
            out.append(
                End(
                    job_id=ev.job_id,
                    tokens_out=ev.tokens_out,
                    stop_reason=ev.stop_reason,
                    prompt_tokens=ev.prompt_tokens,
                    ttft_ms=round(ev.ttft_ms, 3),
                    decode_time_ms=round(ev.decode_time_ms, 3),
                    tokens_per_s=round(ev.tokens_per_s, 3),
                )
            )
        else:
            e = ev.error
            out.append(
                Error(
                    job_id=ev.job_id,
                    code=e.code,
                    message=e.message,
                    retriable=e.retriable,
                    reason=e.reason if isinstance(e, Cancelled) else None,
                )
            )


# ---------------------------------------------------------------- the async half


def prepare_request(model_tok: Any, job: Job, received: float, cfg: WorkerConfig) -> Request:
    """The engine request of a job: prompt ids (chat template applied), limits, seed.
    Raises WorkerError(INVALID_REQUEST) for what only the tokenizer can check."""
    ids = prepare_prompt(
        model_tok,
        prompt=job.prompt,
        messages=None
        if job.messages is None
        else [{"role": m.role, "content": m.content} for m in job.messages],
    )
    for s in job.stop:
        n = len(model_tok.encode(s, add_special=False, parse_special=False))
        if n > MAX_STOP_TOKENS:
            raise WorkerError(
                ErrorCode.INVALID_REQUEST,
                f"stop string {s[:40]!r} is {n} tokens long, at most {MAX_STOP_TOKENS} allowed",
            )
    return Request(
        job_id=job.job_id,
        prompt_ids=ids,
        max_tokens=min(job.max_tokens, cfg.max_tokens_out),
        params=SamplingParams(
            temperature=job.temperature,
            top_p=job.top_p,
            top_k=job.top_k,
            min_p=job.min_p,
            repetition_penalty=job.repetition_penalty,
        ),
        seed=job.seed if job.seed is not None else new_seed(),
        stop=list(job.stop),
        deadline=time.monotonic() + cfg.inference_timeout_sec,
        received=received,
    )


async def inference_actor(
    cfg: WorkerConfig,
    inbox: MemoryObjectReceiveStream[InferenceIn],
    engine_tx: MemoryObjectSendStream[EngineIn],
    engine_rx: MemoryObjectReceiveStream[EngineIn],
    outbox: MemoryObjectSendStream[Outgoing],
    loaded: MemoryObjectSendStream[ModelSummary],
    metrics: WorkerMetrics,
) -> None:
    """Load the model on the engine thread, then serve (see the module docstring)."""
    loop = EngineLoop(cfg, engine_rx, outbox.clone(), loaded, metrics)
    limiter = anyio.CapacityLimiter(1)

    async def forward() -> None:
        async with inbox, engine_tx:
            async for m in inbox:
                if isinstance(m, NewJob):
                    model = loop.model
                    assert model is not None, "jobs arrive only after the model is loaded"
                    try:
                        req = prepare_request(model.tokenizer, m.job, m.received, cfg)
                    except WorkerError as exc:
                        await outbox.send(
                            JobEvents(
                                [
                                    Error(
                                        job_id=m.job.job_id,
                                        code=exc.code,
                                        message=exc.message,
                                        retriable=exc.retriable,
                                    )
                                ]
                            )
                        )
                        continue
                    await engine_tx.send(Admit(req, m.job, m.attempt))
                else:
                    await engine_tx.send(m)

    async with outbox, anyio.create_task_group() as tg:
        tg.start_soon(forward)
        await anyio.to_thread.run_sync(loop.run, limiter=limiter)
        tg.cancel_scope.cancel()


def _has_chat_template(tokenizer: Any) -> bool:
    try:
        tokenizer.render_chat([{"role": "user", "content": "hi"}])
    except Exception:
        return False
    return True
