"""Chat templates: the real Qwen template renders as transformers renders it; the sandbox
holds; bad messages and template failures are INVALID_REQUEST."""

from __future__ import annotations

from typing import Any

import pytest

from worker.errors import ErrorCode, WorkerError
from worker.tokenizer.chat import ChatTemplate
from worker.tokenizer.gguf_bpe import GGUFTokenizer

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Write a haiku about GPUs.\nPlease."},
    ],
    [
        {"role": "user", "content": "你好 😀"},
        {"role": "assistant", "content": 'Hello! <b>bold</b> & "quotes"'},
        {"role": "user", "content": "again"},
    ],
    [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris", "u": "°C"}}}
            ],
        },
        {"role": "tool", "content": '{"t": 21}'},
        {"role": "tool", "content": '{"rain": false}'},
    ],
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.mark.parity  # transformers renders the reference (installed by scripts/dev-setup.sh)
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_qwen_template_matches_transformers(qwen_tok: GGUFTokenizer, conv: int, gen: bool) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    assert qwen_tok.chat_template is not None
    messages = CONVERSATIONS[conv]
    ours = qwen_tok.render_chat(messages, add_generation_prompt=gen)
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=qwen_tok.chat_template.source,
        add_generation_prompt=gen,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    assert ours == rendered[0]
    assert ours.endswith("<|im_start|>assistant\n") == gen
    with_tools = qwen_tok.chat_template.render(messages, add_generation_prompt=gen, tools=TOOLS)
    rendered, _ = render_jinja_template(
        conversations=[messages],
        tools=TOOLS,
        chat_template=qwen_tok.chat_template.source,
        add_generation_prompt=gen,
    )
    assert with_tools == rendered[0]


def test_rendered_chat_tokenizes_with_special_ids(qwen_tok: GGUFTokenizer) -> None:
    text = qwen_tok.render_chat([{"role": "user", "content": "hi"}])
    ids = qwen_tok.encode(text)
    assert ids.count(151644) == 3 and ids.count(151645) == 2


def _invalid(fn: Any) -> WorkerError:
    with pytest.raises(WorkerError) as info:
        fn()
    assert info.value.code == ErrorCode.INVALID_REQUEST
    return info.value


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "must not be empty"),
        ("hello", "must be a list"),
        ([{"role": "user"}], "content must be a string"),
        ([{"role": "user", "content": 5}], "content must be a string"),
        ([{"content": "x"}], "role must be a non-empty string"),
        ([{"role": "", "content": "x"}], "role must be a non-empty string"),
        (["user: hi"], "must be an object"),
    ],
)
def test_bad_messages(qwen_tok: GGUFTokenizer, messages: Any, fragment: str) -> None:
    err = _invalid(lambda: qwen_tok.render_chat(messages))
    assert fragment in err.message


def test_raise_exception_is_invalid_request() -> None:
    t = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}"
        "{% endif %}{{ messages[0].content }}"
    )
    assert t.render([{"role": "user", "content": "ok"}]) == "ok"
    err = _invalid(lambda: t.render([{"role": "system", "content": "x"}]))
    assert "first must be user" in err.message


def test_sandbox_blocks_python_internals() -> None:
    t = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    _invalid(lambda: t.render([{"role": "user", "content": "x"}]))
    t = ChatTemplate("{% set _ = messages.append({'role': 'x'}) %}{{ messages|length }}")
    _invalid(lambda: t.render([{"role": "user", "content": "x"}]))


def test_broken_or_missing_template() -> None:
    broken = ChatTemplate("{% for m in messages %}{{ m.content }")
    assert broken.error is not None
    err = _invalid(lambda: broken.render([{"role": "user", "content": "x"}]))
    assert "does not compile" in err.message
    err = _invalid(
        lambda: ChatTemplate.render_or_fail(
            None, [{"role": "user", "content": "x"}], add_generation_prompt=True
        )
    )
    assert "no chat template" in err.message


def test_hf_template_helpers() -> None:
    t = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}[{{ m.role }}:{{ m.content }}]{% endgeneration %}{% endfor %}"
        "{{ {'k': 'é'} | tojson }}|{{ strftime_now('%Y') | length }}"
        "{% if add_generation_prompt %}>{% endif %}{{ eos_token }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
    assert t.render(msgs) == '<s>[user:a][assistant:b]{"k": "é"}|4></s>'
    assert t.render(msgs, add_generation_prompt=False).endswith("|4</s>")
