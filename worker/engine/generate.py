"""One job, start to finish, on the calling thread: the `generate` command, tests and tools.

`generate()` runs a single request through the same `Scheduler` the worker serves jobs
with (worker.engine.scheduler), alone, and returns the `End` summary; the text streams out
through `on_token(i, text, id)` as each token is sampled. Failures are raised as
WorkerError: `Cancelled` (`should_cancel` is checked before every step),
`INFERENCE_TIMEOUT` (the `deadline`, a `time.monotonic()` value, checked before every
step), and, before any work, `ContextLengthExceeded` (the prompt is longer than the
context) and `VramOom` (the job may need more KV positions than the cache holds).

Token semantics (every job has them, batched or not):
- The prompt is prefilled in chunks of up to `prefill_chunk` tokens; its last chunk yields
  generated token 0. Token i (i >= 1) is sampled from the forward of token i - 1.
- Token i is drawn with `draw = rng.uniform(seed, i)`; the repetition-penalty history is
  the generated ids so far (not the prompt).
- EOS / EOT (`tokenizer.is_eog`) ends generation with `stop_reason="eos"`; that token is
  not streamed and not counted in `tokens_out`.
- Context and KV capacity (`plan_job`): the *context* is the job-facing limit (the worker's
  --ctx-size, else the model's training context); a prompt longer than it is refused. The
  last generated token is sampled but never fed back, so up to `context - n + 1` tokens can
  be generated: `max_tokens` is capped to that, and hitting the cap reports
  `stop_reason="max_tokens"`. A job that may need more KV positions than the cache could
  ever give it is refused with VramOom (retriable: another worker may hold more).
- Stop strings match the decoded text (worker.engine.stop); text before the match is
  streamed, the stop string and whatever follows are not; the tokens that produced them are
  still reported (with the text they may release, possibly empty) and counted.
- Text is valid UTF-8 only (worker.tokenizer.stream.StreamDecoder). Text that is held back
  (a split code point or a possible start of a stop string) delays that token's event by one
  step, so when generation then ends (EOS) the flushed tail can ride on it: nothing is lost
  and no event is invented for the EOS token.
- Timing: `ttft_ms` from receipt to the first sampled token; `decode_time_ms` from then to
  the end; `tokens_per_s` = decode steps / decode time (each step feeds one token back).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from worker.engine.batch import BatchBackend
from worker.engine.params import SamplingParams
from worker.engine.scheduler import Failed, Finished, JobPlan, Request, Scheduler, plan_job
from worker.engine.scheduler import TokenOut as _EngineToken
from worker.errors import Cancelled, ErrorCode, WorkerError
from worker.tokenizer.base import Tokenizer

__all__ = [
    "End",
    "GenerateRequest",
    "GenerationRequest",
    "JobPlan",
    "StopReason",
    "TokenOut",
    "generate",
    "plan_job",
    "prepare_prompt",
]

StopReason = Literal["eos", "max_tokens", "stop"]
DEFAULT_PREFILL_CHUNK = 512
GENERATE_JOB_ID = "generate"


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    stop: list[str] = field(default_factory=list)


def GenerateRequest(  # a constructor with the job's flat field names
    *,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    seed: int = 0,
) -> GenerationRequest:
    """A GenerationRequest from a job's flat fields (the job payload's names)."""
    return GenerationRequest(
        prompt_ids=list(prompt_ids),
        max_tokens=max_tokens,
        params=SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
        ),
        seed=seed,
        stop=list(stop),
    )


@dataclass(frozen=True, slots=True)
class TokenOut:
    i: int  # 0-based index of the generated token
    text: str  # valid UTF-8, possibly empty
    id: int


@dataclass(frozen=True, slots=True)
class End:
    tokens_out: int
    stop_reason: StopReason
    prompt_tokens: int
    ttft_ms: float
    decode_time_ms: float
    tokens_per_s: float
    text: str = ""  # everything streamed, joined (for the CLI and tests)
    token_ids: tuple[int, ...] = ()  # the generated ids (EOS excluded)


OnToken = Callable[[int, str, int], None]


def _never() -> bool:
    return False


def prepare_prompt(
    tokenizer: Tokenizer,
    prompt: str | None = None,
    messages: Sequence[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of a raw prompt, or of chat messages rendered with the model's template.

    Exactly one of `prompt` / `messages`. Special tokens written in the text are parsed
    (the chat template writes them); BOS is added as the model's metadata says, unless the
    rendered text already starts with it.
    """
    if (prompt is None) == (messages is None):
        raise WorkerError(ErrorCode.INVALID_REQUEST, "give exactly one of prompt or messages")
    if messages is not None:
        if not messages:
            raise WorkerError(ErrorCode.INVALID_REQUEST, "messages is empty")
        text = tokenizer.render_chat(messages, add_generation_prompt=True)
    else:
        assert prompt is not None
        text = prompt
    ids = tokenizer.encode(text, add_special=True, parse_special=True)
    bos = tokenizer.bos_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]  # the template wrote BOS itself
    if not ids:
        raise WorkerError(ErrorCode.INVALID_REQUEST, "the prompt encodes to no tokens")
    return ids


def generate(
    backend: BatchBackend,
    tokenizer: Tokenizer,
    req: GenerationRequest,
    *,
    should_cancel: Callable[[], bool] = _never,
    deadline: float | None = None,
    on_token: OnToken | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    context_length: int | None = None,
) -> End:
    """Run one generation to its end on the calling thread (see the module docstring).

    The job runs alone through a `Scheduler` over `backend`, so it follows exactly the rules
    and the computation of a job the worker serves among others. `context_length`: the
    job-facing context (default: the backend's). Raises the job's WorkerError."""
    t0 = time.perf_counter()
    sched = Scheduler(
        backend,
        tokenizer,
        max_batch=1,
        prefill_chunk=prefill_chunk,
        context_length=context_length,
        prefix_cache=False,
    )
    failed = sched.add(
        Request(
            job_id=GENERATE_JOB_ID,
            prompt_ids=list(req.prompt_ids),
            max_tokens=req.max_tokens,
            params=req.params,
            seed=req.seed,
            stop=list(req.stop),
            deadline=deadline,
            received=t0,
        )
    )
    if failed is not None:
        raise failed.error
    pieces: list[str] = []
    try:
        return _run(sched, should_cancel, on_token, pieces)
    finally:
        sched.drain()


def _run(
    sched: Scheduler,
    should_cancel: Callable[[], bool],
    on_token: OnToken | None,
    pieces: list[str],
) -> End:
    while True:
        if should_cancel():
            sched.cancel(GENERATE_JOB_ID)
            raise Cancelled()
        for ev in sched.step():
            if isinstance(ev, _EngineToken):
                pieces.append(ev.text)
                if on_token is not None:
                    on_token(ev.i, ev.text, ev.id)
            elif isinstance(ev, Failed):
                raise ev.error
            elif isinstance(ev, Finished):
                return End(
                    tokens_out=ev.tokens_out,
                    stop_reason=ev.stop_reason,
                    prompt_tokens=ev.prompt_tokens,
                    ttft_ms=ev.ttft_ms,
                    decode_time_ms=ev.decode_time_ms,
                    tokens_per_s=ev.tokens_per_s,
                    text="".join(pieces),
                    token_ids=ev.token_ids,
                )
