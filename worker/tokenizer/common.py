"""Pieces shared by the tokenizer backends: GGUF token types, the GPT-2 byte<->char table,
end-of-generation token names, metadata value checks and the per-token queries both
backends answer from the same tables (`TokenTable`)."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from worker.errors import ModelLoadError
from worker.tokenizer.chat import ChatTemplate

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_UNDEFINED = 0
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6
VALID_TOKEN_TYPES = frozenset(range(7))

# Texts of tokens that end a generation when the vocabulary has them (besides the EOS, EOT
# and EOM ids the metadata names): chat-turn ends of the model families we serve.
# Control tokens of the gpt-oss "harmony" format that are always rendered in the output (as
# llama.cpp does), so a client can tell the analysis channel from the final answer.
ALWAYS_RENDERED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})

EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<end_of_turn>",
        "<end_of_utterance>",
        "<EOT>",
        "_<EOT>",
        "<｜end▁of▁sentence｜>",
        # FIM pad / repo / file-separator tokens end a generation too (Qwen2.5-Coder).
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|fim_repo|>",
        "<|file_sep|>",
    }
)


def _byte_level_table() -> list[str]:
    """byte value -> the printable character byte-level BPE vocabularies write it as.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are moved, in byte
    order, to the code points from U+0100 upwards (so a space is 'Ġ', a newline 'Ċ')."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    for b in keep:
        table[b] = chr(b)
    extra = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


BYTE_TO_CHAR: list[str] = _byte_level_table()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


TO_LATIN1 = {ord(c): b for b, c in enumerate(BYTE_TO_CHAR)}


def byte_level_to_bytes(token: str) -> bytes:
    """The bytes a byte-level BPE token stands for. A character outside the byte alphabet
    (only seen in hand-made vocabularies) stands for its own UTF-8."""
    try:
        return token.translate(TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        pass
    out = bytearray()
    for ch in token:
        b = CHAR_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def bytes_to_byte_level(data: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in data)


def eog_ids(tokens: Iterable[str], named: Iterable[int | None]) -> frozenset[int]:
    """End-of-generation ids: the ids the metadata names (EOS, EOT, EOM, FIM pad/rep/sep)
    plus every token whose text is a known turn end (as llama.cpp decides). In a gpt-oss
    (harmony) vocabulary, which has <|return|>, <|end|> only closes a message and is not an
    end."""
    found: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in EOG_TEXTS and t not in found:
            found[t] = i
    ids = {i for i in named if i is not None}
    if "<|return|>" in found and "<|end|>" in found:
        ids.discard(found.pop("<|end|>"))
    ids.update(found.values())
    return frozenset(ids)


# --- metadata value checks -------------------------------------------------------------


class MetadataReader:
    """Typed access to a metadata mapping that turns every malformation into a
    ModelLoadError naming the key."""

    def __init__(self, metadata: Mapping[str, Any], source: object) -> None:
        self.md = metadata
        self.source = source

    def fail(self, problem: str) -> ModelLoadError:
        return ModelLoadError(self.source, problem)

    def has(self, key: str) -> bool:
        return key in self.md and self.md[key] is not None

    def string(self, key: str, default: str | None = None) -> str | None:
        if not self.has(key):
            return default
        v = self.md[key]
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.fail(f"metadata {key} is not valid UTF-8") from exc
        if not isinstance(v, str):
            raise self.fail(f"metadata {key} must be a string, got {type(v).__name__}")
        return v

    def flag(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        v = self.md[key]
        try:
            iv = operator.index(v)
        except TypeError as exc:
            raise self.fail(f"metadata {key} must be a boolean, got {v!r}") from exc
        if iv not in (0, 1):
            raise self.fail(f"metadata {key} must be a boolean, got {v!r}")
        return bool(iv)

    def token_id(self, key: str, n_vocab: int) -> int | None:
        if not self.has(key):
            return None
        v = self.md[key]
        if isinstance(v, bool):
            raise self.fail(f"metadata {key} must be a token id, got {v!r}")
        try:
            iv = operator.index(v)
        except TypeError as exc:
            raise self.fail(f"metadata {key} must be a token id, got {v!r}") from exc
        if iv == -1 or iv == 0xFFFFFFFF:  # "none" as some converters write it
            return None
        if not 0 <= iv < n_vocab:
            raise self.fail(f"metadata {key} = {iv} is out of range (vocabulary of {n_vocab})")
        return iv

    def str_list(self, key: str) -> list[str] | None:
        if not self.has(key):
            return None
        v = self.md[key]
        if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
            raise self.fail(f"metadata {key} must be an array of strings")
        if isinstance(v, list) and all(type(x) is str for x in v):
            return v
        out: list[str] = []
        for i, item in enumerate(v):
            if isinstance(item, bytes):
                try:
                    item = item.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise self.fail(f"metadata {key}[{i}] is not valid UTF-8") from exc
            if not isinstance(item, str):
                raise self.fail(f"metadata {key}[{i}] must be a string, got {type(item).__name__}")
            out.append(item)
        return out

    def int_list(self, key: str) -> list[int] | None:
        if not self.has(key):
            return None
        v = self.md[key]
        if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
            raise self.fail(f"metadata {key} must be an array of integers")
        try:
            return [operator.index(x) for x in v]
        except TypeError as exc:
            raise self.fail(f"metadata {key} must be an array of integers") from exc

    def float_list(self, key: str) -> list[float] | None:
        if not self.has(key):
            return None
        v = self.md[key]
        if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
            raise self.fail(f"metadata {key} must be an array of numbers")
        try:
            out = [float(x) for x in v]
        except (TypeError, ValueError) as exc:
            raise self.fail(f"metadata {key} must be an array of numbers") from exc
        return out


# --- per-token queries -----------------------------------------------------------------


class TokenTable:
    """The `Tokenizer` queries that gguf-bpe and hf-json answer the same way, from the
    tables each fills in its constructor: `tokens` (text of each id), `_special` (special
    flag of each id), `_eog` (end-of-generation ids) and `chat_template`."""

    vocab_size: int
    tokens: list[str]
    chat_template: ChatTemplate | None
    _special: list[bool]
    _eog: frozenset[int]

    def check_id(self, token_id: int) -> None:
        """ValueError unless `token_id` is an id of this vocabulary."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(
                f"token id {token_id} is out of range (vocabulary of {self.vocab_size})"
            )

    def token_text(self, token_id: int) -> str:
        return self.tokens[token_id]

    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and self._special[token_id]

    def is_eog(self, token_id: int) -> bool:
        return token_id in self._eog

    @property
    def eog_ids(self) -> frozenset[int]:
        return self._eog

    def render_chat(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        return ChatTemplate.render_or_fail(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt
        )
