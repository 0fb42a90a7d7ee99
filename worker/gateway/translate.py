"""OpenAI request bodies -> worker Jobs (docs/protocol.md), validated on the way.

Requests decode with msgspec into structs that name every parameter of OpenAI's chat and
(legacy) completions APIs. Unknown fields are refused, as OpenAI does ("Unrecognized request
argument"). Parameters the worker implements are mapped; the others are accepted only at
their neutral value (``n`` 1, ``logprobs`` false, ``response_format`` text, no tools, ...) and
otherwise refused with a 400 naming the parameter, never silently ignored. The Job is then
built through msgspec's validation of `worker.protocol.Job`, so the gateway refuses what the
worker would refuse, with the same limits.
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

import msgspec

from worker.gateway.errors import APIError, invalid
from worker.protocol import Job, validate_model_ref


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # no effect here: nothing to obfuscate


class _Common(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    # beyond OpenAI (llama.cpp / vLLM spell them the same)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    # accepted at their neutral value only
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # identifiers that change nothing in the output
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class ChatRequest(_Common, kw_only=True):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None


class CompletionRequest(_Common, kw_only=True):
    prompt: Any = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


_chat_decoder: Final = msgspec.json.Decoder(ChatRequest)
_completion_decoder: Final = msgspec.json.Decoder(CompletionRequest)

_UNKNOWN_RE: Final = re.compile(r"unknown field `([^`]*)`")
_PATH_RE: Final = re.compile(r"at `\$\.?([^`]*)`")


def _decode_error(exc: Exception) -> APIError:
    text = str(exc)
    unknown = _UNKNOWN_RE.search(text)
    if unknown:
        name = unknown.group(1)
        return invalid(f"Unrecognized request argument supplied: {name}", param=name)
    path = _PATH_RE.search(text)
    param = path.group(1) if path and path.group(1) else None
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return invalid(f"The request body is not valid JSON: {text}")
    return invalid(f"Invalid request: {text}", param=param)


def decode_chat(body: bytes) -> ChatRequest:
    try:
        return _chat_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _decode_error(exc) from None


def decode_completion(body: bytes) -> CompletionRequest:
    try:
        return _completion_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _decode_error(exc) from None


def _unsupported(param: str, what: str) -> APIError:
    return invalid(f"`{param}` is not supported by this server: {what}", param=param)


def _check_common(req: _Common) -> None:
    if req.n not in (None, 1):
        raise _unsupported("n", "one choice per request (n = 1)")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise _unsupported(name, "use `repetition_penalty` (1 = off)")
    if req.logit_bias:
        raise _unsupported("logit_bias", "no logit bias")
    if req.stream_options is not None and not req.stream:
        raise invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )


def model_ref(req: _Common) -> str:
    """The model reference the job goes to (``orcd.jobs.<ref>``); 404 for a name that can
    never be one (it would not even be a subject token)."""
    try:
        return validate_model_ref(req.model)
    except ValueError:
        raise APIError(
            404,
            f"The model `{req.model[:100]}` does not exist",
            param="model",
            code="model_not_found",
        ) from None


def _sampling(req: _Common, max_tokens: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            out[name] = value
    if req.stop is not None:
        out["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    return out


# The gateway renews each job's lease while it relays the job (OrcdClient.run_job); if the
# gateway process dies, the worker ends the job (client_gone) instead of decoding for nobody.
JOB_LEASE_S: Final = 30.0


def _job(fields: dict[str, Any]) -> Job:
    try:
        return msgspec.convert({"lease_s": JOB_LEASE_S, **fields}, Job)
    except msgspec.ValidationError as exc:
        raise _decode_error(exc) from None


_ROLES: Final = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}
_MESSAGE_KEYS: Final = frozenset({"role", "content", "name", "refusal", "tool_calls"})


def _message(k: int, m: Any) -> dict[str, str]:
    where = f"messages.[{k}]"
    if not isinstance(m, dict):
        raise invalid(f"{where} must be an object", param=where)
    role = m.get("role")
    if role in ("tool", "function"):
        raise _unsupported(
            f"{where}.role", f"`{role}` messages need tools, which are not supported"
        )
    if role not in _ROLES:
        raise invalid(
            f"{where}.role must be one of system, developer, user, assistant", param=f"{where}.role"
        )
    for key in m:
        if key not in _MESSAGE_KEYS:
            raise invalid(f"Unrecognized argument supplied: {where}.{key}", param=f"{where}.{key}")
    for key in ("name", "tool_calls"):
        if m.get(key) is not None:
            raise _unsupported(f"{where}.{key}", "the chat template has no place for it")
    if m.get("refusal") is not None and role != "assistant":
        raise invalid(f"{where}.refusal is only for assistant messages", param=f"{where}.refusal")
    content = m.get("content")
    if isinstance(content, list):
        parts: list[str] = []
        for j, part in enumerate(content):
            at = f"{where}.content.[{j}]"
            if not isinstance(part, dict):
                raise invalid(f"{at} must be an object", param=at)
            if part.get("type") != "text":
                raise _unsupported(at, "only text content parts")
            if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
                raise invalid(f"{at} must be {{'type': 'text', 'text': <string>}}", param=at)
            parts.append(part["text"])
        content = "\n".join(parts)
    if not isinstance(content, str):
        raise invalid(f"{where}.content must be a string or a list of text parts", param=where)
    return {"role": _ROLES[role], "content": content}


def chat_job(req: ChatRequest, job_id: str) -> Job:
    _check_common(req)
    if req.logprobs:
        raise _unsupported("logprobs", "no log probabilities yet")
    if req.top_logprobs not in (None, 0):
        raise _unsupported("top_logprobs", "no log probabilities yet")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise _unsupported("response_format", "plain text only ({'type': 'text'})")
    if req.tools or req.functions:
        raise _unsupported("tools" if req.tools else "functions", "no tool calling")
    if req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
        raise _unsupported(
            "tool_choice" if req.tool_choice is not None else "function_call", "no tool calling"
        )
    if req.store:
        raise _unsupported("store", "completions are not stored")
    if req.modalities not in (None, ["text"]):
        raise _unsupported("modalities", "text only")
    for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
        if getattr(req, name) is not None:
            raise _unsupported(name, "not available for these models")
    if req.service_tier not in (None, "auto", "default"):
        raise _unsupported("service_tier", "one tier")
    max_tokens = req.max_tokens
    if req.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != req.max_completion_tokens:
            raise invalid(
                "`max_tokens` and `max_completion_tokens` disagree; give one",
                param="max_completion_tokens",
            )
        max_tokens = req.max_completion_tokens
    if not req.messages:
        raise invalid("`messages` must hold at least one message", param="messages")
    messages = [_message(k, m) for k, m in enumerate(req.messages)]
    return _job({"job_id": job_id, "messages": messages, **_sampling(req, max_tokens)})


def completion_job(req: CompletionRequest, job_id: str) -> Job:
    _check_common(req)
    if req.logprobs is not None:
        raise _unsupported("logprobs", "no log probabilities yet")
    if req.echo:
        raise _unsupported("echo", "the prompt is not echoed")
    if req.suffix is not None:
        raise _unsupported("suffix", "no fill-in-the-middle suffix")
    if req.best_of not in (None, 1):
        raise _unsupported("best_of", "one candidate per request")
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise _unsupported("prompt", "one text prompt per request (no batches, no token ids)")
    if not isinstance(prompt, str):
        raise invalid("`prompt` must be a string", param="prompt")
    return _job({"job_id": job_id, "prompt": prompt, **_sampling(req, req.max_tokens)})


FinishReason = Literal["stop", "length"]


def finish_reason(stop_reason: str) -> FinishReason:
    """The worker's stop_reason (eos | stop | max_tokens) in OpenAI's words."""
    return "length" if stop_reason == "max_tokens" else "stop"
