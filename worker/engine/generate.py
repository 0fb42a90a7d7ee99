"""The decode loop: prompt ids in, a stream of text pieces out, over any Backend.

Threading design: `generate()` is a plain blocking function meant to run, start to finish,
on the one OS thread that owns the backend (for CUDA, the thread holding the context).
Events leave through a callback, `on_token(i, text, id)`, called on that thread right after
each token is sampled; the caller hands them to its event loop without waiting (the
inference actor uses `loop.call_soon_threadsafe`). A callback keeps every backend call on
the owning thread and adds no per-token thread hop, which an iterator driven from the event
loop would. `generate()` returns the `End` summary; failures are raised as WorkerError:
`Cancelled` (checked before every forward), `INFERENCE_TIMEOUT` (the `deadline`, a
`time.monotonic()` value, checked before every forward), `ContextLengthExceeded`
(the prompt is longer than the context) and `VramOom` (the job may need more KV slots than
the cache holds), both before any forward.

Semantics (docs/protocol.md, docs/design.md):
- The prompt is prefilled in chunks of `prefill_chunk` tokens (cancel and deadline are
  checked between chunks); the last chunk goes through `forward_sample`, which yields
  generated token 0. Token i (i >= 1) is sampled from the forward of token i - 1.
- Token i is drawn with `draw = rng.uniform(seed, i)`; the repetition-penalty history is
  the generated ids so far (not the prompt).
- EOS / EOT (`tokenizer.is_eog`) ends generation with `stop_reason="eos"`; that token is
  not streamed and not counted in `tokens_out`.
- Context and KV capacity (docs/design.md, `plan_job`): the *context* is the job-facing limit
  (the worker's --ctx-size, else the model's training context; `generate(context_length=)`,
  default the backend's KV capacity); the *KV capacity* is `backend.context_length`, the
  tokens the KV cache could be allocated for. A prompt of `n` tokens longer than the context
  (`n > context`) raises ContextLengthExceeded (not retriable). The last generated token is
  sampled but never fed back, so up to `context - n + 1` tokens can be generated;
  `max_tokens` is capped to that (max_tokens is capped by the context), and hitting the
  cap reports `stop_reason="max_tokens"`. The job then fills up to
  `n + limit - 1 = min(n + max_tokens - 1, context)` KV slots; if that is more than the KV
  capacity it raises VramOom (retriable: another worker may hold more) before any forward.
- Stop strings match the decoded text (worker.engine.stop); text before the match is
  streamed, the stop string and whatever follows are not; the tokens that produced them are
  still reported (with the text they may release, possibly empty) and counted.
- Text is valid UTF-8 only (worker.tokenizer.stream.StreamDecoder). Text that is held back
  (a split code point or a possible start of a stop string) delays that token's event by one
  step, so when generation then ends (EOS) the flushed tail can ride on it: nothing is lost
  and no event is invented for the EOS token. Events otherwise go out as soon as the token is
  sampled.
- Timing: `ttft_ms` from the call to the first sampled token; `decode_time_ms` from then to
  the end; `tokens_per_s` = decode forward steps / decode time (each step feeds one token).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from worker.backends.base import Backend
from worker.engine import rng
from worker.engine.params import SamplingParams
from worker.engine.stop import StopMatcher
from worker.errors import Cancelled, ContextLengthExceeded, ErrorCode, VramOom, WorkerError
from worker.tokenizer.base import Tokenizer
from worker.tokenizer.stream import StreamDecoder

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


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    stop: list[str] = field(default_factory=list)


def GenerateRequest(  # a constructor with the job's flat field names (docs/protocol.md)
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
    """A GenerationRequest from a job's flat fields (docs/protocol.md names)."""
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


def _next(seed: int, i: int, limit: int) -> float | None:
    """The draw of token i when the job may still produce it (i < limit), else None."""
    return rng.uniform(seed, i) if i < limit else None


def _never() -> bool:
    return False


@dataclass(frozen=True, slots=True)
class JobPlan:
    """What a job may do, decided before any work (see `plan_job`)."""

    limit: int  # tokens it may generate: max_tokens capped by the context
    kv_tokens: int  # KV slots it fills at most (n_past + prompt + limit - 1)


def plan_job(
    n_prompt: int,
    max_tokens: int,
    *,
    context_length: int,
    kv_capacity: int,
    n_past: int = 0,
) -> JobPlan:
    """The context / KV-capacity rule (docs/design.md), the one place it is decided.

    `context_length` is the job-facing context, `kv_capacity` the tokens the KV cache holds,
    `n_past` tokens already in the sequence (0 for a fresh job). Raises
    ContextLengthExceeded when the prompt is longer than what is left of the context, and
    VramOom when the job, with max_tokens capped by the context, may need more KV slots than
    the cache holds. The last generated token is sampled but never fed back, so it takes no
    KV slot.
    """
    if n_prompt < 1:
        raise WorkerError(ErrorCode.INVALID_REQUEST, "the prompt has no tokens")
    if max_tokens < 1:
        raise WorkerError(ErrorCode.INVALID_REQUEST, f"max_tokens must be >= 1, got {max_tokens}")
    room = context_length - n_past
    if n_prompt > room:
        held = f" ({n_past} already in the sequence)" if n_past else ""
        raise ContextLengthExceeded(
            f"prompt is {n_prompt} tokens; the context is {context_length} tokens{held}"
        )
    limit = min(max_tokens, room - n_prompt + 1)
    kv_tokens = n_past + n_prompt + limit - 1
    if kv_tokens > kv_capacity:
        raise VramOom(
            f"job needs {kv_tokens} KV cache tokens (prompt {n_prompt} + up to {limit - 1} "
            f"generated tokens fed back; max_tokens {max_tokens} capped by the context of "
            f"{context_length}), this worker's KV cache holds {kv_capacity} tokens"
        )
    return JobPlan(limit=limit, kv_tokens=kv_tokens)


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
    backend: Backend,
    tokenizer: Tokenizer,
    req: GenerationRequest,
    *,
    should_cancel: Callable[[], bool] = _never,
    deadline: float | None = None,
    on_token: OnToken | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    reset: bool = True,
    context_length: int | None = None,
) -> End:
    """Run one generation to its end on the calling thread (see the module docstring).

    `reset=True` starts from an empty KV cache (backend.reset()). `context_length`: the
    job-facing context (default: the backend's KV capacity, so only the context rule
    applies); the context / KV-capacity rule (`plan_job`) is checked before any forward.
    """
    t0 = time.perf_counter()
    prompt = list(req.prompt_ids)
    n_prompt = len(prompt)
    if reset:
        backend.reset()
    kv_capacity = backend.context_length
    limit = plan_job(
        n_prompt,
        req.max_tokens,
        context_length=kv_capacity if context_length is None else context_length,
        kv_capacity=kv_capacity,
        n_past=backend.n_past,
    ).limit

    def check() -> None:
        if should_cancel():
            raise Cancelled()
        if deadline is not None and time.monotonic() > deadline:
            raise WorkerError(ErrorCode.INFERENCE_TIMEOUT, "inference deadline exceeded")

    params = req.params
    chunk = max(1, prefill_chunk)
    for s in range(0, n_prompt - chunk, chunk):  # all but the last chunk
        check()
        backend.forward(prompt[s : s + chunk])
    last = prompt[(n_prompt - 1) // chunk * chunk :]

    decoder = StreamDecoder(tokenizer, after_token=prompt[-1])  # spacing as decode(prompt + out)
    matcher = StopMatcher(req.stop)
    generated: list[int] = []
    pieces: list[str] = []
    held: TokenOut | None = None  # a token whose text is waiting on the next step

    def emit(ev: TokenOut) -> None:
        pieces.append(ev.text)
        if on_token is not None:
            on_token(ev.i, ev.text, ev.id)

    check()
    # next_draw: the draw of the following call, so a backend can queue that step early
    tok = backend.forward_sample(
        last, params, rng.uniform(req.seed, 0), generated, next_draw=_next(req.seed, 1, limit)
    )
    t_first = time.perf_counter()
    steps = 0
    reason: StopReason
    while True:
        if tokenizer.is_eog(tok):
            tail = matcher.push(decoder.flush())
            tail += matcher.flush()
            if held is not None:
                emit(TokenOut(held.i, held.text + tail, held.id))
                held = None
            # (text is only ever held together with an event, so no tail is left here)
            reason = "eos"
            break
        i = len(generated)
        generated.append(tok)
        if held is not None:
            emit(held)
            held = None
        text = matcher.push(decoder.push(tok))
        if matcher.stopped:
            emit(TokenOut(i, text, tok))
            reason = "stop"
            break
        if len(generated) >= limit:
            text += matcher.push(decoder.flush())
            if not matcher.stopped:
                text += matcher.flush()
            emit(TokenOut(i, text, tok))
            reason = "stop" if matcher.stopped else "max_tokens"
            break
        if decoder.pending or matcher.held:
            held = TokenOut(i, text, tok)
        else:
            emit(TokenOut(i, text, tok))
        check()
        tok = backend.forward_sample(
            [tok],
            params,
            rng.uniform(req.seed, i + 1),
            generated,
            next_draw=_next(req.seed, i + 2, limit),
        )
        steps += 1
    t_end = time.perf_counter()
    decode_s = t_end - t_first
    return End(
        tokens_out=len(generated),
        stop_reason=reason,
        prompt_tokens=n_prompt,
        ttft_ms=(t_first - t0) * 1000.0,
        decode_time_ms=decode_s * 1000.0,
        tokens_per_s=steps / decode_s if steps and decode_s > 0 else 0.0,
        text="".join(pieces),
        token_ids=tuple(generated),
    )
