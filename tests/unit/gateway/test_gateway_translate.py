"""OpenAI request bodies -> Jobs: every mapped parameter, every refusal (400 naming the
parameter, never a silent ignore), the model-ref check, finish_reason, the error mapping."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.errors import ErrorCode
from worker.gateway.errors import APIError, from_worker
from worker.gateway.translate import (
    chat_job,
    completion_job,
    decode_chat,
    decode_completion,
    finish_reason,
    model_ref,
)
from worker.protocol import ChatMessage, Job

USER = [{"role": "user", "content": "hi"}]
TEXT_A = {"type": "text", "text": "a"}
TOOL_MSG = {"role": "tool", "content": "x", "tool_call_id": "1"}


def chat(**body: Any) -> Job:
    body.setdefault("model", "qwen")
    body.setdefault("messages", USER)
    return chat_job(decode_chat(json.dumps(body).encode()), "chatcmpl-1")


def completion(**body: Any) -> Job:
    body.setdefault("model", "qwen")
    body.setdefault("prompt", "hi")
    return completion_job(decode_completion(json.dumps(body).encode()), "cmpl-1")


def refused(fn: Any, **body: Any) -> APIError:
    with pytest.raises(APIError) as info:
        fn(**body)
    assert info.value.status == 400, info.value.message
    return info.value


def test_chat_parameters_map_onto_the_job() -> None:
    job = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": "really"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "ok", "refusal": None},
            {"role": "user", "content": "more"},
        ],
        max_tokens=17,
        temperature=0.5,
        top_p=0.9,
        stop="END",
        seed=7,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        n=1,
        logprobs=False,
        response_format={"type": "text"},
        frequency_penalty=0,
        presence_penalty=0.0,
        user="u-1",
        stream=True,
        stream_options={"include_usage": True},
    )
    assert job.job_id == "chatcmpl-1"
    assert job.prompt is None and job.messages == [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="system", content="really"),
        ChatMessage(role="user", content="a\nb"),
        ChatMessage(role="assistant", content="ok"),
        ChatMessage(role="user", content="more"),
    ]
    assert (job.max_tokens, job.temperature, job.top_p, job.stop, job.seed) == (
        17,
        0.5,
        0.9,
        ["END"],
        7,
    )
    assert (job.top_k, job.min_p, job.repetition_penalty) == (40, 0.05, 1.1)


def test_defaults_are_the_workers() -> None:
    job = chat()
    default = Job(job_id="x", prompt="p")
    assert (job.max_tokens, job.temperature, job.top_p, job.stop, job.seed) == (
        default.max_tokens,
        default.temperature,
        default.top_p,
        [],
        None,
    )


def test_max_completion_tokens() -> None:
    assert chat(max_completion_tokens=5).max_tokens == 5
    assert chat(max_completion_tokens=5, max_tokens=5).max_tokens == 5
    assert refused(chat, max_completion_tokens=5, max_tokens=6).param == "max_completion_tokens"


def test_completion_parameters_map_onto_the_job() -> None:
    job = completion(prompt=["one prompt"], max_tokens=3, stop=["a", "b"], temperature=0)
    assert job.prompt == "one prompt" and job.messages is None
    assert job.max_tokens == 3 and job.stop == ["a", "b"] and job.temperature == 0.0
    assert completion(echo=False, best_of=1, n=1).prompt == "hi"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"42": 3}}, "logit_bias"),
        ({"store": True}, "store"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"bogus": 1}, "bogus"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4096}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 3}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop[0]"),
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
            "messages.[0].role",
        ),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.[0].name"),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages.[0].extra"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages.[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.[0].content.[0]",
        ),
        ({"messages": [{"role": "user", "content": "x" * 40000}]}, None),
    ],
)
def test_chat_refusals_name_the_parameter(body: dict[str, Any], param: str | None) -> None:
    err = refused(chat, **body)
    assert err.param == param, err.message
    assert err.payload()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 2}, "logprobs"),
        ({"n": 3}, "n"),
        ({"messages": USER}, "messages"),
    ],
)
def test_completion_refusals_name_the_parameter(body: dict[str, Any], param: str) -> None:
    assert refused(completion, **body).param == param


def test_unknown_field_message_is_openais() -> None:
    err = refused(chat, frobnicate=True)
    assert err.message == "Unrecognized request argument supplied: frobnicate"


def test_not_json() -> None:
    with pytest.raises(APIError) as info:
        decode_chat(b"{not json")
    assert info.value.status == 400 and "not valid JSON" in info.value.message
    with pytest.raises(APIError) as info:
        decode_chat(b'{"messages": []}')  # no model
    assert info.value.status == 400 and "model" in info.value.message


def test_model_ref_that_cannot_exist_is_404() -> None:
    assert model_ref(decode_chat(b'{"model": "qwen-0_5b", "messages": []}')) == "qwen-0_5b"
    for bad in ("a.b", "orcd.jobs.>", "x y", "", "*", "m" * 65):
        body = json.dumps({"model": bad, "messages": []}).encode()
        with pytest.raises(APIError) as info:
            model_ref(decode_chat(body))
        assert info.value.status == 404 and info.value.code == "model_not_found"


def test_finish_reason() -> None:
    assert finish_reason("eos") == "stop"
    assert finish_reason("stop") == "stop"
    assert finish_reason("max_tokens") == "length"


def test_worker_error_codes_map_to_statuses() -> None:
    expected = {
        ErrorCode.INVALID_REQUEST: 400,
        ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
        ErrorCode.INTERNAL: 500,
        ErrorCode.CUDA_ERROR: 500,
        ErrorCode.VRAM_OOM: 500,
        ErrorCode.CANCELLED: 500,
        ErrorCode.MODEL_LOAD_FAILED: 503,
        ErrorCode.INSUFFICIENT_VRAM: 503,
        ErrorCode.INFERENCE_TIMEOUT: 504,
    }
    assert set(expected) == set(ErrorCode)
    for code, status in expected.items():
        err = from_worker(code, "m")
        assert err.status == status
        assert err.payload() == {
            "error": {
                "message": "m",
                "type": err.type,
                "param": None,
                "code": code.value.lower(),
            }
        }
