"""Continuous batching: the set of running sequences, and one step for all of them at a time.

`Scheduler` owns every job the engine holds, from `add()` to its terminal event:

- Admission (start of every step, first come first served): a waiting job starts when a slot
  is free (`max_batch`) and the KV blocks it may ever need can be reserved
  (worker.engine.block_manager); its cached prompt prefix is mapped instead of computed. A
  job that could never fit (more KV than the whole cache, or a prompt longer than the
  context) is refused at `add()` with the error it gets.
- The step: every sequence past its prompt feeds back the token it sampled last step (one
  row each); sequences still in their prompt get prefill chunks, first come first served,
  up to `prefill_chunk` prompt tokens in the step. So a long prompt is spread over several
  steps and never stalls the running streams for its whole prefill. A step with prompt
  tokens costs far more than a decode-only one (the backend replays a captured graph only
  for decode-only steps), so while jobs decode, the prompts of newly admitted jobs wait to
  start until they fill the step's prompt budget or the oldest of them has waited
  `prefill_wait` seconds since it was received: several arriving jobs share one such step
  instead of taking one each.
- Overlap (the default; off with keep_logits): step k+1 is launched before step k is
  collected, its decode rows `pending` (worker.engine.batch): the backend feeds each such
  row the id its sequence drew in step k on the device, so the device never idles while the
  host collects a step, turns it into events and plans the next. The cost: what ends a
  sequence is known one step late, so its row in the step after is computed and dropped
  (never past its KV reservation: a sequence whose pending token is its last gets no row),
  and a freed slot is refilled one step later.
- After the step: each sampled token goes through the sequence's UTF-8 stream decoder and
  stop strings; a sequence ends on EOS, a stop string or its token limit, and frees its slot
  and blocks at once. Cancels and deadlines are applied at step boundaries.

Token semantics are those of a single job (worker.engine.generate documents them): EOS is
not streamed or counted, text held back for a split code point or a possible stop string
rides on the next token's event, the draw for generated token i is `uniform(seed, i)`.

Nothing here knows about NATS, threads or devices; the inference actor drives `step()` on
the backend's thread and turns the returned events into protocol events.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from worker.engine import rng
from worker.engine.batch import BatchBackend, Chunk, SampleSpec
from worker.engine.block_manager import Allocation, BlockManager
from worker.engine.params import SamplingParams
from worker.engine.stop import StopMatcher
from worker.errors import (
    Cancelled,
    ContextLengthExceeded,
    ErrorCode,
    VramOom,
    WorkerError,
)
from worker.tokenizer.base import Tokenizer
from worker.tokenizer.stream import StreamDecoder

__all__ = [
    "Admitted",
    "Failed",
    "Finished",
    "JobPlan",
    "Request",
    "Scheduler",
    "StopReason",
    "TokenOut",
    "plan_job",
]

StopReason = Literal["eos", "max_tokens", "stop"]
CancelStatus = Literal["running", "queued", "unknown"]


@dataclass(frozen=True, slots=True)
class JobPlan:
    """What a job may do, decided before any work (see `plan_job`)."""

    limit: int  # tokens it may generate: max_tokens capped by the context
    kv_tokens: int  # KV positions it fills at most (prompt + limit - 1)


def plan_job(n_prompt: int, max_tokens: int, *, context_length: int, kv_capacity: int) -> JobPlan:
    """The context / KV-capacity rule, the one place it is decided.

    `context_length` is the job-facing context, `kv_capacity` the most positions the KV cache
    could ever give one job. A prompt longer than the context -> ContextLengthExceeded (not
    retriable). The last generated token is sampled but never fed back, so up to
    `context - n + 1` tokens can be generated; max_tokens is capped to that (hitting the cap
    reports `max_tokens`). The job then fills `n + limit - 1` positions; more than the KV
    capacity -> VramOom (retriable: another worker may hold more).
    """
    if n_prompt < 1:
        raise WorkerError(ErrorCode.INVALID_REQUEST, "the prompt has no tokens")
    if max_tokens < 1:
        raise WorkerError(ErrorCode.INVALID_REQUEST, f"max_tokens must be >= 1, got {max_tokens}")
    if n_prompt > context_length:
        raise ContextLengthExceeded(
            f"prompt is {n_prompt} tokens; the context is {context_length} tokens"
        )
    limit = min(max_tokens, context_length - n_prompt + 1)
    kv_tokens = n_prompt + limit - 1
    if kv_tokens > kv_capacity:
        raise VramOom(
            f"job needs {kv_tokens} KV cache tokens (prompt {n_prompt} + up to {limit - 1} "
            f"generated tokens fed back; max_tokens {max_tokens} capped by the context of "
            f"{context_length}), this worker's KV cache holds {kv_capacity} tokens"
        )
    return JobPlan(limit=limit, kv_tokens=kv_tokens)


@dataclass(slots=True)
class Request:
    """One job as the engine sees it (prompt already tokenized)."""

    job_id: str
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    stop: Sequence[str] = ()
    deadline: float | None = None  # time.monotonic() after which it fails INFERENCE_TIMEOUT
    received: float = field(default_factory=time.perf_counter)
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens (EOS is a token)


# ---------------------------------------------------------------- events out of a step


@dataclass(frozen=True, slots=True)
class Admitted:
    job_id: str
    prompt_tokens: int
    cached_tokens: int  # prompt positions served by the prefix cache


@dataclass(frozen=True, slots=True)
class TokenOut:
    job_id: str
    i: int  # 0-based index of the generated token
    text: str  # valid UTF-8, possibly empty
    id: int


@dataclass(frozen=True, slots=True)
class Finished:
    job_id: str
    tokens_out: int
    stop_reason: StopReason
    prompt_tokens: int
    ttft_ms: float
    decode_time_ms: float
    tokens_per_s: float
    token_ids: tuple[int, ...]
    # with Scheduler(keep_logits=True): the logits each token was drawn from (tests)
    logits: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True, slots=True)
class Failed:
    job_id: str
    error: WorkerError


EngineEvent = Admitted | TokenOut | Finished | Failed


class _Seq:
    __slots__ = (
        "alloc",
        "computed",
        "decoder",
        "ending",
        "generated",
        "held",
        "limit",
        "logits",
        "matcher",
        "n_prompt",
        "next_draw",
        "planned",
        "req",
        "seed_state",
        "slot",
        "started",
        "steps",
        "t_first",
        "t_start",
    )

    def __init__(self, req: Request, plan: JobPlan, tokenizer: Tokenizer) -> None:
        self.req = req
        self.n_prompt = len(req.prompt_ids)
        self.limit = plan.limit
        self.alloc: Allocation | None = None
        self.slot = -1
        self.computed = 0  # positions whose KV is written
        self.planned = 0  # positions whose KV is written or queued in a launched step
        self.started = False  # a prompt chunk of it has been planned
        self.generated: list[int] = []
        self.decoder = StreamDecoder(tokenizer, after_token=req.prompt_ids[-1])
        self.matcher = StopMatcher(req.stop)
        self.held: TokenOut | None = None  # a token whose text waits on the next step
        self.steps = 0  # decode steps (each feeds one generated token back)
        self.t_start = req.received
        self.t_first = 0.0
        self.logits: list[np.ndarray] = []
        self.ending: StopReason | None = None  # known from the id alone (EOS, the limit)
        self.seed_state = rng.seed_state(req.seed)
        self.next_draw: tuple[int, float | None] = (-1, None)  # (i, uniform(seed, i))

    @property
    def prefilling(self) -> bool:
        """Prompt positions are left to plan."""
        return self.planned < self.n_prompt

    @property
    def pending(self) -> bool:
        """Past its prompt: a launched, uncollected step draws its next token (every row
        queued for it past the prompt, its last prompt chunk included, is sampled)."""
        return self.planned > self.computed


class Scheduler:
    """See the module docstring. Single-threaded: the backend's thread drives it."""

    def __init__(
        self,
        backend: BatchBackend,
        tokenizer: Tokenizer,
        *,
        max_batch: int | None = None,
        prefill_chunk: int = 512,
        prefill_wait: float = 0.0,
        context_length: int | None = None,
        prefix_cache: bool = True,
        keep_logits: bool = False,
        overlap: bool = True,
    ) -> None:
        self.backend = backend
        self.keep_logits = keep_logits
        self.overlap = overlap and not keep_logits
        self.tok = tokenizer
        self.max_batch = min(max_batch or backend.max_batch, backend.max_batch)
        self.prefill_chunk = max(1, min(prefill_chunk, backend.max_step_tokens))
        self.prefill_wait = max(0.0, prefill_wait)
        self.align = max(1, backend.chunk_align)
        # the job-facing context; what one job can be given is kv_capacity (plan_job)
        self.context_length = context_length or backend.context_length
        self.blocks = BlockManager(backend.n_blocks, backend.block_size, prefix_cache=prefix_cache)
        self.kv_capacity = min(backend.context_length, backend.n_blocks * backend.block_size)
        self.waiting: deque[_Seq] = deque()
        self.running: dict[str, _Seq] = {}
        # steps launched and not yet collected, oldest first: (chunks, sequences, handle)
        self._inflight: deque[tuple[list[Chunk], list[_Seq], Any]] = deque()
        self._free_slots = list(range(self.max_batch - 1, -1, -1))
        self.steps = 0
        self.step_tokens = 0  # tokens and sequences of the last step launched
        self.step_sequences = 0

    # ------------------------------------------------------------------ inputs

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and not self._inflight

    @property
    def jobs(self) -> int:
        return len(self.waiting) + len(self.running)

    def holds(self, job_id: str) -> bool:
        return job_id in self.running or any(s.req.job_id == job_id for s in self.waiting)

    def add(self, req: Request) -> Failed | None:
        """Queue a job; a job that can never run is refused here (its Failed event)."""
        try:
            if self.holds(req.job_id):
                raise WorkerError(
                    ErrorCode.INVALID_REQUEST, f"job {req.job_id} is already running here"
                )
            plan = plan_job(
                len(req.prompt_ids),
                req.max_tokens,
                context_length=self.context_length,
                kv_capacity=self.kv_capacity,
            )
            if max(req.prompt_ids) >= self.backend.vocab_size or min(req.prompt_ids) < 0:
                raise WorkerError(ErrorCode.INVALID_REQUEST, "prompt token id out of range")
        except WorkerError as exc:
            return Failed(req.job_id, exc)
        self.waiting.append(_Seq(req, plan, self.tok))
        return None

    def cancel(
        self, job_id: str, error: WorkerError | None = None
    ) -> tuple[CancelStatus, Failed | None]:
        """End a job now (between steps) with `error` (default CANCELLED)."""
        err = error or Cancelled()
        seq = self.running.pop(job_id, None)
        if seq is not None:
            self._free(seq)
            return "running", Failed(job_id, err)
        for s in self.waiting:
            if s.req.job_id == job_id:
                self.waiting.remove(s)
                return "queued", Failed(job_id, err)
        return "unknown", None

    def fail_all(self, error: WorkerError) -> list[EngineEvent]:
        """End every job held (a device failure): each gets `error`."""
        out: list[EngineEvent] = []
        for job_id in list(self.running) + [s.req.job_id for s in self.waiting]:
            _, ev = self.cancel(job_id, error)
            if ev is not None:
                out.append(ev)
        return out

    # ------------------------------------------------------------------ the step

    def step(self) -> list[EngineEvent]:
        """One turn: launch the next step for every running sequence and collect the oldest
        step in flight, then turn its tokens into text and events while the device runs.

        Overlapped: expire, admit, launch step k+1, collect step k (so the device has
        step k+1 queued while the host works). Serial (keep_logits, or overlap=False):
        collect step k, expire, admit, launch step k+1. Either way the host's per-token
        work (text, stop strings, events) runs while the device computes. A stop string is
        found only after the next launch, so such a sequence's row there is dropped."""
        events: list[EngineEvent] = []
        if self.overlap:
            self._expire(events)
            self._admit(events)
            launched = self._launch()
            sampled = self._collect(events) if len(self._inflight) > launched else []
        else:
            sampled = self._collect(events)
            self._expire(events)
            self._admit(events)
            self._launch()
        for seq, tok, now in sampled:
            self._on_text(seq, tok, now, events)
        return events

    def _launch(self) -> int:
        """Plan and launch the next step, if any sequence has work for it (1), else 0."""
        if not self.running:
            return 0
        chunks, seqs = self._plan()
        if not chunks:  # every sequence waits on the step in flight
            return 0
        self._inflight.append((chunks, seqs, self.backend.launch(chunks)))
        for ch, seq in zip(chunks, seqs, strict=True):
            seq.planned = ch.start + len(ch.tokens)
        self.steps += 1
        return 1

    def drain(self) -> None:
        """Wait for the steps in flight and drop their results (closing the scheduler)."""
        while self._inflight:
            self.backend.collect(self._inflight.popleft()[2])

    def _collect(self, events: list[EngineEvent]) -> list[tuple[_Seq, int, float]]:
        """The results of the oldest step in flight: positions computed, prompt blocks
        published, each sampled id recorded (what it ends, from the id alone, ends now)."""
        if not self._inflight:
            return []
        chunks, seqs, handle = self._inflight.popleft()
        out = self.backend.collect(handle)
        now = time.perf_counter()
        sampled: list[tuple[_Seq, int, float]] = []
        for k, (ch, seq, tok) in enumerate(zip(chunks, seqs, out.ids, strict=True)):
            if self.running.get(seq.req.job_id) is not seq:
                continue  # ended after this step was launched: its row is dropped
            seq.computed = ch.start + len(ch.tokens)
            if ch.prefill:
                assert seq.alloc is not None
                self.blocks.publish(seq.alloc, seq.computed)
            if ch.sample is None:
                continue
            if self.keep_logits:
                rows = out.logits[k]
                assert rows is not None
                seq.logits.append(rows[-1].copy())
            if not seq.generated and seq.t_first == 0.0:
                seq.t_first = now
            else:
                seq.steps += 1
            if tok < 0:  # the backend found NaN in this row's logits
                del self.running[seq.req.job_id]
                self._free(seq)
                events.append(
                    Failed(seq.req.job_id, WorkerError(ErrorCode.INTERNAL, "NaN in logits"))
                )
                continue
            if self.tok.is_eog(tok) and not seq.req.ignore_eos:
                seq.ending = "eos"
            else:
                seq.generated.append(tok)
                if len(seq.generated) >= seq.limit:
                    seq.ending = "max_tokens"
            if seq.ending is not None:
                del self.running[seq.req.job_id]  # no row in the next step
            sampled.append((seq, tok, now))
        return sampled

    def _expire(self, events: list[EngineEvent]) -> None:
        now = time.monotonic()
        late = [
            s.req.job_id
            for s in (*self.running.values(), *self.waiting)
            if s.req.deadline is not None and now > s.req.deadline
        ]
        for job_id in late:
            _, ev = self.cancel(
                job_id, WorkerError(ErrorCode.INFERENCE_TIMEOUT, "inference deadline exceeded")
            )
            if ev is not None:
                events.append(ev)

    def _admit(self, events: list[EngineEvent]) -> None:
        while self.waiting and self._free_slots:
            seq = self.waiting[0]
            kv_tokens = seq.n_prompt + seq.limit - 1
            alloc = self.blocks.admit(seq.req.prompt_ids, kv_tokens, self.align)
            if alloc is None:
                return  # first come first served: the head waits for blocks
            self.waiting.popleft()
            if alloc.copies:
                self.backend.copy_blocks(alloc.copies)
                alloc.copies.clear()
            seq.alloc = alloc
            seq.computed = seq.planned = alloc.cached_tokens
            seq.slot = self._free_slots.pop()
            self.running[seq.req.job_id] = seq
            events.append(Admitted(seq.req.job_id, seq.n_prompt, alloc.cached_tokens))

    def _plan(self) -> tuple[list[Chunk], list[_Seq]]:
        chunks: list[Chunk] = []
        seqs: list[_Seq] = []
        budget = self.prefill_chunk
        room = self.backend.max_step_tokens
        # decode rows first: every sequence past its prompt advances one token each step
        for seq in self.running.values():
            if seq.prefilling:
                continue
            assert seq.alloc is not None
            # the token fed back: the last one recorded, or the one the step in flight draws
            # (its index i - 1); a pending token that is the sequence's last is never fed
            pending = seq.pending
            i = len(seq.generated) + pending
            if i >= seq.limit:
                continue
            pos = seq.planned
            self.blocks.grow(seq.alloc, pos + 1)
            chunks.append(
                Chunk(
                    slot=seq.slot,
                    tokens=(0,) if pending else (seq.generated[-1],),
                    start=pos,
                    blocks=seq.alloc.table,
                    prefill=False,
                    sample=self._sample_spec(seq, i),
                    logits=self.keep_logits,
                    pending=pending,
                )
            )
            seqs.append(seq)
            room -= 1
        hold_new = bool(chunks) and self._hold_new_prompts()
        first = True
        for seq in self.running.values():
            if not seq.prefilling or budget <= 0 or room <= 0 or (hold_new and not seq.started):
                continue
            assert seq.alloc is not None
            pos = seq.planned
            n = seq.n_prompt - pos
            if self.align > 1:
                n = min(n, self.align - pos % self.align)
                if n > min(budget, room) and not first:
                    continue  # cut only at multiples of align: wait for a later step
            else:
                n = min(n, budget, room)
            first = False
            seq.started = True
            budget -= n
            room -= n
            end = pos + n
            self.blocks.grow(seq.alloc, end)
            chunks.append(
                Chunk(
                    slot=seq.slot,
                    tokens=seq.req.prompt_ids[pos:end],
                    start=pos,
                    blocks=seq.alloc.table,
                    prefill=True,
                    sample=self._sample_spec(seq, 0) if end == seq.n_prompt else None,
                    logits=self.keep_logits and end == seq.n_prompt,
                )
            )
            seqs.append(seq)
        self.step_tokens = sum(len(c.tokens) for c in chunks)
        self.step_sequences = len(chunks)
        return chunks, seqs

    def _hold_new_prompts(self) -> bool:
        """In a step that decodes: whether the prompts not yet started wait for more company
        (see the module docstring). A prompt already under way never waits."""
        if self.prefill_wait <= 0.0:
            return False
        new = [s for s in self.running.values() if s.prefilling and not s.started]
        if not new or any(s.prefilling and s.started for s in self.running.values()):
            return False  # nothing to hold, or this step carries prompt tokens anyway
        if sum(s.n_prompt - s.planned for s in new) >= self.prefill_chunk:
            return False
        return time.perf_counter() - min(s.t_start for s in new) < self.prefill_wait

    def _sample_spec(self, seq: _Seq, i: int) -> SampleSpec:
        st = seq.seed_state
        k, draw = seq.next_draw  # the last step named this one's draw
        if k != i or draw is None:
            draw = rng.uniform_at(st, i)
        nxt = rng.uniform_at(st, i + 1) if i + 1 < seq.limit else None
        seq.next_draw = (i + 1, nxt)
        return SampleSpec(params=seq.req.params, draw=draw, history=seq.generated, next_draw=nxt)

    # ------------------------------------------------------------------ after the step

    def _on_text(self, seq: _Seq, tok: int, now: float, events: list[EngineEvent]) -> None:
        """A recorded token through the stream decoder and the stop strings: its event (or
        held text), and the end of the sequence when it ends here."""
        job_id = seq.req.job_id
        if seq.ending == "eos":
            tail = seq.matcher.push(seq.decoder.flush())
            tail += seq.matcher.flush()
            if seq.held is not None:
                h = seq.held
                events.append(TokenOut(job_id, h.i, h.text + tail, h.id))
                seq.held = None
            self._finish(seq, "eos", now, events)
            return
        i = len(seq.generated) - 1
        if seq.held is not None:
            events.append(seq.held)
            seq.held = None
        text = seq.matcher.push(seq.decoder.push(tok))
        if seq.matcher.stopped:
            events.append(TokenOut(job_id, i, text, tok))
            self._finish(seq, "stop", now, events)
            return
        if seq.ending == "max_tokens":
            text += seq.matcher.push(seq.decoder.flush())
            if not seq.matcher.stopped:
                text += seq.matcher.flush()
            events.append(TokenOut(job_id, i, text, tok))
            self._finish(seq, "stop" if seq.matcher.stopped else "max_tokens", now, events)
            return
        ev = TokenOut(job_id, i, text, tok)
        if seq.decoder.pending or seq.matcher.held:
            seq.held = ev
        else:
            events.append(ev)

    def _finish(self, seq: _Seq, reason: StopReason, now: float, events: list[EngineEvent]) -> None:
        if self.running.get(seq.req.job_id) is seq:
            del self.running[seq.req.job_id]
        self._free(seq)
        decode_s = now - seq.t_first
        events.append(
            Finished(
                job_id=seq.req.job_id,
                tokens_out=len(seq.generated),
                stop_reason=reason,
                prompt_tokens=seq.n_prompt,
                ttft_ms=(seq.t_first - seq.t_start) * 1000.0,
                decode_time_ms=decode_s * 1000.0,
                tokens_per_s=seq.steps / decode_s if seq.steps and decode_s > 0 else 0.0,
                token_ids=tuple(seq.generated),
                logits=tuple(seq.logits),
            )
        )

    def _free(self, seq: _Seq) -> None:
        if seq.alloc is not None:
            self.blocks.release(seq.alloc)
            seq.alloc = None
        if seq.slot >= 0:
            self.backend.release_slot(seq.slot)
            self._free_slots.append(seq.slot)
            seq.slot = -1
