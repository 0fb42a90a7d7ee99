"""StreamDecoder: only complete UTF-8 out, held-back bytes of a split code point come with
the next token, nothing lost at the end, never U+FFFD from a split."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.tokenizer.common import bytes_to_byte_level
from worker.tokenizer.gguf_bpe import GGUFTokenizer
from worker.tokenizer.stream import StreamDecoder

# Mostly multibyte text: Latin-1 supplement, Cyrillic, CJK, emoji, ZWJ, plus ASCII.
_ALPHABET = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.characters(min_codepoint=0xA0, max_codepoint=0x4FF),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
    st.sampled_from(["\u200d", "\n", "\t", " ", "é", "ñ"]),
)
TEXT = st.text(alphabet=_ALPHABET, min_size=0, max_size=60)
_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _stream(tok: Any, ids: list[int]) -> tuple[list[str], str]:
    dec = StreamDecoder(tok, at_start=True)
    outs = [dec.push(i) for i in ids]
    tail = dec.flush()
    assert dec.text == "".join(outs) + tail
    return outs, tail


def _byte_split_ids(tok: GGUFTokenizer, text: str, cuts: list[int]) -> list[int]:
    """Token ids for `text` cut into byte chunks at arbitrary places (inside code points
    too): a chunk that is a vocabulary token becomes that token, else one token per byte."""
    data = text.encode("utf-8")
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    ids: list[int] = []
    for a, b in itertools.pairwise(points):
        chunk = data[a:b]
        whole = tok.token_to_id(bytes_to_byte_level(chunk))
        if whole is not None:
            ids.append(whole)
        else:
            ids += [tok.token_to_id(bytes_to_byte_level(bytes([x]))) or 0 for x in chunk]
    return ids


@_SETTINGS
@given(text=TEXT)
def test_stream_equals_decode_qwen(qwen_tok: GGUFTokenizer, text: str) -> None:
    ids = qwen_tok.encode(text, add_special=False, parse_special=False)
    outs, tail = _stream(qwen_tok, ids)
    assert "".join(outs) + tail == qwen_tok.decode(ids) == text
    assert tail == ""
    assert all("\ufffd" not in o for o in outs)


@_SETTINGS
@given(text=TEXT, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_random_byte_splits_qwen(qwen_tok: GGUFTokenizer, text: str, cuts: list[int]) -> None:
    ids = _byte_split_ids(qwen_tok, text, cuts)
    outs, tail = _stream(qwen_tok, ids)
    assert "".join(outs) + tail == qwen_tok.decode(ids) == text
    assert tail == "" and all("\ufffd" not in o for o in outs)


@_SETTINGS
@given(text=TEXT)
def test_stream_equals_decode_spm(spm_tok: GGUFTokenizer, text: str) -> None:
    # The small SPM vocabulary spells most CJK and emoji with <0xNN> byte tokens.
    ids = spm_tok.encode(text, parse_special=False)
    outs, tail = _stream(spm_tok, ids)
    assert "".join(outs) + tail == spm_tok.decode(ids, skip_special=True) == text
    assert tail == "" and all("\ufffd" not in o for o in outs)


@_SETTINGS
@given(text=TEXT)
def test_stream_equals_decode_o200k(o200k_tok: GGUFTokenizer, text: str) -> None:
    ids = o200k_tok.encode(text, parse_special=False)
    outs, tail = _stream(o200k_tok, ids)
    assert "".join(outs) + tail == o200k_tok.decode(ids) == text
    assert all("\ufffd" not in o for o in outs)


def _byte_token(tok: GGUFTokenizer, b: int) -> int:
    tid = tok.token_to_id(bytes_to_byte_level(bytes([b])))
    assert tid is not None
    return tid


def test_split_code_point_waits_for_next_token(qwen_tok: GGUFTokenizer) -> None:
    fox = "🦊".encode()
    dec = StreamDecoder(qwen_tok)
    assert dec.push(qwen_tok.encode("a", add_special=False)[0]) == "a"
    assert dec.push(_byte_token(qwen_tok, fox[0])) == ""
    assert dec.push(_byte_token(qwen_tok, fox[1])) == ""
    assert dec.pending == fox[:2]
    assert dec.push(_byte_token(qwen_tok, fox[2])) == ""
    assert dec.push(_byte_token(qwen_tok, fox[3])) == "🦊"
    assert dec.flush() == "" and dec.text == "a🦊" and dec.tokens_seen == 5


def test_incomplete_tail_becomes_replacement_only_at_flush(qwen_tok: GGUFTokenizer) -> None:
    dec = StreamDecoder(qwen_tok)
    assert dec.push(_byte_token(qwen_tok, "é".encode()[0])) == ""
    assert dec.flush() == "\ufffd"
    assert dec.text == "\ufffd"


def test_invalid_bytes_are_not_held_forever(qwen_tok: GGUFTokenizer) -> None:
    # A stray continuation byte can never complete: it is replaced at once, and the text
    # after it still streams.
    dec = StreamDecoder(qwen_tok)
    assert dec.push(_byte_token(qwen_tok, 0x80)) == "\ufffd"
    assert dec.push(qwen_tok.encode("ok", add_special=False)[0]) == "ok"


def test_control_tokens_add_no_text(qwen_tok: GGUFTokenizer, spm_tok: GGUFTokenizer) -> None:
    dec = StreamDecoder(qwen_tok)
    ids = qwen_tok.encode("hi<|im_end|>", add_special=False)
    assert "".join(dec.push(i) for i in ids) == "hi"
    assert qwen_tok.token_bytes(151645) == b""
    assert qwen_tok.token_bytes(151657) == b"<tool_call>"  # user-defined: rendered
    # SentencePiece: '▁' is a space; the space encode put in front of the text is dropped
    # at the start, as decode drops it.
    ids = spm_tok.encode("Hello world")
    assert ids[0] == spm_tok.bos_id
    sdec = StreamDecoder(spm_tok, at_start=True)
    assert [sdec.push(i) for i in ids] == ["", "Hello", " world"]
    assert spm_tok.token_bytes(ids[1]).startswith(b" ")


def test_generation_continues_the_prompt(spm_tok: GGUFTokenizer) -> None:
    """Generated tokens stream as decode(prompt + generated) minus decode(prompt): the
    space of a leading '▁' is real text after a plain prompt, and dropped after a special
    token (where encode would have put it)."""
    gen = spm_tok.encode("Paris is big", add_special=False)  # "▁Par", ...
    assert spm_tok.token_text(gen[0]).startswith("▁")
    for prompt_text in ["The capital of France is", "<|user|>\nQ<|end|><|assistant|>"]:
        prompt = spm_tok.encode(prompt_text)
        dec = StreamDecoder(spm_tok, after_token=prompt[-1], skip_special=False)
        streamed = "".join(dec.push(i) for i in gen) + dec.flush()
        whole = spm_tok.decode(prompt + gen)
        assert whole.startswith(spm_tok.decode(prompt))
        assert streamed == whole[len(spm_tok.decode(prompt)) :]
    # With no prompt token given, the stream is taken as a continuation: the space stays.
    dec = StreamDecoder(spm_tok)
    assert dec.push(gen[0]).startswith(" ")
