"""Chat templates: the model's Jinja2 template rendered in a sandbox (docs/design.md).

The environment mirrors what Hugging Face chat templates expect: `trim_blocks` and
`lstrip_blocks`, loop controls, a `tojson` that keeps non-ASCII text, `raise_exception`,
`strftime_now`, and a pass-through `{% generation %}` block. Templates cannot reach Python
internals (ImmutableSandboxedEnvironment). Any failure while rendering a job's messages is
the job's fault: WorkerError(INVALID_REQUEST)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from worker.errors import ErrorCode, WorkerError

MAX_MESSAGES = 4096


class TemplateRaised(Exception):
    """raise_exception(...) called by the template."""


def _raise_exception(message: object) -> NoReturn:
    raise TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    HF templates; for rendering it is a plain block."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
        autoescape=False,
        keep_trailing_newline=False,
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _invalid(message: str) -> WorkerError:
    return WorkerError(ErrorCode.INVALID_REQUEST, message)


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Messages must be a non-empty list of objects with string `role` and `content`
    (other keys, such as tool_calls, pass through)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise _invalid("messages must be a list of {role, content} objects")
    if not messages:
        raise _invalid("messages must not be empty")
    if len(messages) > MAX_MESSAGES:
        raise _invalid(f"at most {MAX_MESSAGES} messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _invalid(f"messages[{i}] must be an object")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise _invalid(f"messages[{i}].role must be a non-empty string")
        if not isinstance(content, str):
            raise _invalid(f"messages[{i}].content must be a string")
        out.append(dict(m))
    return out


class ChatTemplate:
    """A compiled chat template. A template that does not compile is kept as an error and
    reported on use, so a model with a broken template still serves plain prompts."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.error: str | None = None
        self._template: jinja2.Template | None = None
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            self.error = f"chat template does not compile: {exc}"

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        checked = validate_messages(messages)
        if self._template is None:
            raise _invalid(self.error or "no chat template")
        context: dict[str, Any] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
            "messages": checked,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**context)
        except TemplateRaised as exc:
            raise _invalid(f"chat template rejected the messages: {exc}") from exc
        except jinja2.TemplateError as exc:  # includes SecurityError, UndefinedError
            raise _invalid(f"chat template failed: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise _invalid(f"chat template failed: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def render_or_fail(
        template: ChatTemplate | None,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool,
    ) -> str:
        if template is None:
            validate_messages(messages)
            raise _invalid("the model has no chat template; send a prompt instead of messages")
        return template.render(messages, add_generation_prompt=add_generation_prompt)
