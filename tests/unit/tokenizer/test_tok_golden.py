"""Conformance: our gguf-bpe tokenizer against ids from independent implementations
(transformers for the real Qwen2.5 vocabulary, sentencepiece for an SPM vocabulary, tiktoken
for an o200k-style vocabulary under the gpt-4o, llama-bpe and gpt2 split patterns)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.tokenizer.gguf_bpe import GGUFTokenizer

FAMILIES = ["qwen2", "spm", "gpt4o", "llama-bpe", "gpt2"]
PRE = {"gpt4o": "gpt-4o", "llama-bpe": "llama-bpe", "gpt2": "gpt2"}


@pytest.fixture(scope="module")
def tokenizers_by_family(
    qwen_tok: GGUFTokenizer, spm_tok: GGUFTokenizer, o200k_metadata: dict[str, Any]
) -> dict[str, GGUFTokenizer]:
    out = {"qwen2": qwen_tok, "spm": spm_tok}
    for fam, pre in PRE.items():
        out[fam] = GGUFTokenizer({**o200k_metadata, "tokenizer.ggml.pre": pre})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_vectors(
    family: str, golden: Any, tokenizers_by_family: dict[str, GGUFTokenizer]
) -> None:
    tok = tokenizers_by_family[family]
    vectors = golden(family)["vectors"]
    assert len(vectors) >= 30
    texts = [v["text"] for v in vectors]
    # The set covers what the issue asks for.
    assert "" in texts
    assert any(len(t) > 5000 for t in texts)
    assert any("\n\n" in t for t in texts) and any("   " in t for t in texts)
    assert any(any("\u4e00" <= c <= "\u9fff" for c in t) for t in texts)
    assert any(any(ord(c) >= 0x1F300 for c in t) for t in texts)
    assert any("<|" in t for t in texts)
    mismatches = []
    for v in vectors:
        got = tok.encode(v["text"], add_special=False)
        if got != v["ids"]:
            mismatches.append((v["text"][:40], got[:12], v["ids"][:12]))
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(
    family: str, golden: Any, tokenizers_by_family: dict[str, GGUFTokenizer]
) -> None:
    tok = tokenizers_by_family[family]
    for v in golden(family)["vectors"]:
        assert tok.decode(v["ids"]) == v["text"]
        assert tok.decode(tok.encode(v["text"], add_special=False)) == v["text"]


def test_special_vectors_use_single_ids(qwen_tok: GGUFTokenizer) -> None:
    ids = qwen_tok.encode("<|im_start|>user\nhi<|im_end|>", add_special=False)
    assert ids[0] == 151644 and ids[-1] == 151645
    plain = qwen_tok.encode("<|im_start|>user", add_special=False, parse_special=False)
    assert 151644 not in plain
    assert qwen_tok.decode(plain) == "<|im_start|>user"


def test_add_special_flags(
    qwen_tok: GGUFTokenizer, spm_tok: GGUFTokenizer, tokenizers_by_family: dict[str, Any]
) -> None:
    # Qwen's file says add_bos_token = false.
    assert qwen_tok.add_bos is False
    assert qwen_tok.encode("hi") == qwen_tok.encode("hi", add_special=False)
    # SentencePiece: BOS by default, as llama.cpp does.
    assert spm_tok.add_bos is True and spm_tok.bos_id == 1
    assert spm_tok.encode("hi") == [1, *spm_tok.encode("hi", add_special=False)]
    assert spm_tok.encode("") == [1] and spm_tok.encode("", add_special=False) == []
    # Llama 3 (llama-bpe) adds BOS when the file does not say; gpt-4o does not.
    llama = tokenizers_by_family["llama-bpe"]
    assert llama.add_bos is True and llama.encode("x")[0] == llama.bos_id
    assert tokenizers_by_family["gpt4o"].add_bos is False


def test_add_eos_flag(spm_metadata: dict[str, Any]) -> None:
    tok = GGUFTokenizer(
        {
            **spm_metadata,
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.add_eos_token": True,
        }
    )
    ids = tok.encode("hello")
    assert ids[-1] == tok.eos_id and ids[0] != tok.bos_id
