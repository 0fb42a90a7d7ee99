"""Special tokens, end-of-generation ids and token rendering."""

from __future__ import annotations

from typing import Any

import pytest

from worker.tokenizer.gguf_bpe import GGUFTokenizer


def test_qwen_eog(qwen_tok: GGUFTokenizer) -> None:
    t = qwen_tok.token_to_id
    eog = {t(x) for x in ("<|im_end|>", "<|endoftext|>", "<|fim_pad|>", "<|repo_name|>")}
    eog.add(t("<|file_sep|>"))
    assert qwen_tok.eog_ids == eog
    assert all(qwen_tok.is_eog(i) for i in eog if i is not None)
    assert not qwen_tok.is_eog(t("<|im_start|>") or -1)
    assert not qwen_tok.is_eog(qwen_tok.encode("end", add_special=False)[0])


def test_harmony_eog(o200k_tok: GGUFTokenizer) -> None:
    t = o200k_tok.token_to_id
    assert o200k_tok.is_eog(t("<|return|>") or -1) and o200k_tok.is_eog(t("<|call|>") or -1)
    assert o200k_tok.is_eog(t("<|endoftext|>") or -1)
    assert not o200k_tok.is_eog(t("<|end|>") or -1)  # ends a message, not the generation
    # The harmony structure tokens are rendered in the stream (the client needs the channel),
    # <|end|> and the ends are not.
    for text in ("<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"):
        assert o200k_tok.token_bytes(t(text) or -1) == text.encode()
    for text in ("<|end|>", "<|return|>", "<|endoftext|>"):
        assert o200k_tok.token_bytes(t(text) or -1) == b""
    ids = o200k_tok.encode("<|channel|>final<|message|>Hi<|end|>", add_special=False)
    assert o200k_tok.decode(ids, skip_special=True) == "<|channel|>final<|message|>Hi"


def test_eot_and_eom_from_metadata(spm_metadata: dict[str, Any]) -> None:
    tok = GGUFTokenizer(
        {**spm_metadata, "tokenizer.ggml.eot_token_id": 100, "tokenizer.ggml.eom_token_id": 101}
    )
    assert tok.is_eog(100) and tok.is_eog(101) and tok.is_eog(tok.eos_id or -1)
    assert not tok.is_eog(102)
    # Phi-3 style: <|end|> ends a turn.
    assert tok.is_eog(tok.token_to_id("<|end|>") or -1)


def test_spm_special_tokens_and_space_prefix(spm_tok: GGUFTokenizer) -> None:
    end = spm_tok.token_to_id("<|end|>")
    ids = spm_tok.encode("<|user|>\nHi<|end|>", add_special=False)
    assert ids[0] == spm_tok.token_to_id("<|user|>") and ids[-1] == end
    # The text after a special token gets its own '▁' in front, as in llama.cpp.
    assert spm_tok.encode("<|end|>Hi", add_special=False) == [
        end,
        *spm_tok.encode("Hi", add_special=False),
    ]
    assert spm_tok.decode(ids) == "<|user|>\nHi<|end|>"
    assert spm_tok.decode(ids, skip_special=True) == "\nHi"
    plain = spm_tok.encode("<|end|>", add_special=False, parse_special=False)
    assert end not in plain and spm_tok.decode(plain) == "<|end|>"


def test_byte_fallback(spm_tok: GGUFTokenizer) -> None:
    ids = spm_tok.encode("𝔘", add_special=False)  # surely not a piece of the small vocab
    pieces = [spm_tok.token_text(i) for i in ids]
    assert pieces[0] == "▁" and all(p.startswith("<0x") for p in pieces[1:])
    assert b"".join(spm_tok.token_bytes(i) for i in ids) == " 𝔘".encode()


@pytest.mark.parametrize("bad", [-1, 10**7])
def test_out_of_range_ids(qwen_tok: GGUFTokenizer, bad: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        qwen_tok.decode([bad])
    with pytest.raises(ValueError, match="out of range"):
        qwen_tok.token_bytes(bad)
    assert not qwen_tok.is_eog(bad)


def test_unused_tokens_render_nothing(qwen_tok: GGUFTokenizer) -> None:
    pad = qwen_tok.token_to_id("[PAD151665]")
    assert pad == 151665 and qwen_tok.token_bytes(pad) == b""


def test_spm_drops_only_the_one_prefix_space(spm_tok: GGUFTokenizer) -> None:
    from worker.tokenizer.stream import StreamDecoder

    space = spm_tok.token_to_id("▁")
    word = spm_tok.token_to_id("▁the")
    assert space is not None and word is not None
    bos, end = spm_tok.bos_id or 1, spm_tok.token_to_id("<|end|>") or -1
    for ids, text, skip in [
        ([space, space, word], "  the", False),
        ([bos, space, word], " the", True),
        ([bos, space, word], "<s> the", False),
        ([word, end, word], "the<|end|>the", False),
        ([word, end, word], "thethe", True),
    ]:
        assert spm_tok.decode(ids, skip_special=skip) == text
        dec = StreamDecoder(spm_tok, skip_special=skip, at_start=True)
        assert "".join(dec.push(i) for i in ids) + dec.flush() == text
