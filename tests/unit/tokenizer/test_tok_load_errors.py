"""A malformed vocabulary is a clear ModelLoadError, never a crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from worker.errors import ErrorCode, ModelLoadError
from worker.gguf.reader import open_gguf
from worker.tokenizer import load_tokenizer
from worker.tokenizer.gguf_bpe import GGUFTokenizer


def _tiny_bpe() -> dict[str, Any]:
    """A complete byte-level vocabulary: 256 byte tokens, two merges, two specials."""
    from worker.tokenizer.common import BYTE_TO_CHAR

    tokens = [*BYTE_TO_CHAR, "ab", "abc", "<|endoftext|>", "<|im_end|>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 258 + [3, 3],
        "tokenizer.ggml.merges": ["a b", "ab c"],
        "tokenizer.ggml.eos_token_id": 259,
    }


def _load(md: dict[str, Any]) -> GGUFTokenizer:
    return GGUFTokenizer(md, source=Path("/models/x.gguf"))


def test_tiny_vocab_is_valid() -> None:
    tok = _load(_tiny_bpe())
    # Tokens are the 256 bytes in byte order, then "ab" (256), "abc" (257).
    assert tok.encode("abc ab", add_special=False) == [257, 32, 256]
    assert tok.encode("abab", add_special=False) == [256, 256]
    assert tok.decode(tok.encode("abcabc<|im_end|>")) == "abcabc<|im_end|>"
    assert tok.is_eog(259) and tok.is_eog(258)


def _break(key: str, value: Any) -> dict[str, Any]:
    md = _tiny_bpe()
    if value is _DELETE:
        del md[key]
    else:
        md[key] = value
    return md


_DELETE = object()

CASES = [
    ("tokenizer.ggml.model", "bert", "not supported"),
    ("tokenizer.ggml.model", _DELETE, "tokenizer.ggml.model is missing"),
    ("tokenizer.ggml.model", 7, "must be a string"),
    ("tokenizer.ggml.pre", "some-new-pre", "pre-tokenizer 'some-new-pre'"),
    ("tokenizer.ggml.tokens", _DELETE, "tokens is missing"),
    ("tokenizer.ggml.tokens", [], "tokens is missing or empty"),
    ("tokenizer.ggml.tokens", "abc", "array of strings"),
    ("tokenizer.ggml.tokens", [*_tiny_bpe()["tokenizer.ggml.tokens"][:-1], 5], "must be a string"),
    ("tokenizer.ggml.token_type", [1, 1, 1], "3 entries for 260 tokens"),
    ("tokenizer.ggml.token_type", [1] * 259 + [9], "not a token type"),
    ("tokenizer.ggml.token_type", ["x"] * 260, "array of integers"),
    ("tokenizer.ggml.scores", [0.0] * 5, "5 entries for 260 tokens"),
    ("tokenizer.ggml.merges", ["a b", "ab q"], "refers to 'abq'"),
    ("tokenizer.ggml.merges", ["a b", "ab zz"], "refers to 'zz'"),
    ("tokenizer.ggml.merges", ["ab"], "is not 'left right'"),
    ("tokenizer.ggml.merges", _DELETE, "without tokenizer.ggml.merges"),
    ("tokenizer.ggml.merges", [1, 2], "must be a string"),
    ("tokenizer.ggml.eos_token_id", 260, "out of range"),
    ("tokenizer.ggml.eos_token_id", "x", "must be a token id"),
    ("tokenizer.ggml.bos_token_id", 10**9, "out of range"),
    ("tokenizer.ggml.add_bos_token", 7, "must be a boolean"),
]


@pytest.mark.parametrize(("key", "value", "message"), CASES)
def test_malformed_metadata(key: str, value: Any, message: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        _load(_break(key, value))
    assert message in info.value.problem
    assert info.value.code == ErrorCode.MODEL_LOAD_FAILED
    assert "/models/x.gguf" in str(info.value)


def test_missing_byte_tokens() -> None:
    md = _tiny_bpe()
    tokens = list(md["tokenizer.ggml.tokens"])
    tokens[0x41 - 0x21] = "XX"  # 'A' gone
    md["tokenizer.ggml.tokens"] = tokens
    with pytest.raises(ModelLoadError, match="no token for 1 byte values"):
        _load(md)


def test_add_bos_without_bos() -> None:
    md = _tiny_bpe()
    md["tokenizer.ggml.add_bos_token"] = True
    with pytest.raises(ModelLoadError, match="no BOS"):
        _load(md)


def test_spm_errors(spm_metadata: dict[str, Any]) -> None:
    md = dict(spm_metadata)
    del md["tokenizer.ggml.scores"]
    with pytest.raises(ModelLoadError, match=r"without tokenizer\.ggml\.scores"):
        _load(md)
    md = dict(spm_metadata)
    tokens = list(md["tokenizer.ggml.tokens"])
    tokens[tokens.index("<0x41>")] = "<0xZZ>"
    md["tokenizer.ggml.tokens"] = tokens
    with pytest.raises(ModelLoadError, match="byte token"):
        _load(md)
    md = dict(spm_metadata)
    md["tokenizer.ggml.scores"] = ["high"] * len(md["tokenizer.ggml.tokens"])
    with pytest.raises(ModelLoadError, match="array of numbers"):
        _load(md)


def _write_gguf(path: Path, md: dict[str, Any]) -> None:
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_tokenizer_model(md["tokenizer.ggml.model"])
    w.add_tokenizer_pre(md["tokenizer.ggml.pre"])
    w.add_token_list(md["tokenizer.ggml.tokens"])
    w.add_token_types(md["tokenizer.ggml.token_type"])
    w.add_token_merges(md["tokenizer.ggml.merges"])
    w.add_eos_token_id(md["tokenizer.ggml.eos_token_id"])
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _file_metadata(path: Path) -> dict[str, Any]:
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items()}


def test_malformed_vocab_in_a_gguf_file(tmp_path: Path) -> None:
    good = tmp_path / "good.gguf"
    _write_gguf(good, _tiny_bpe())
    tok = load_tokenizer(_file_metadata(good), model_path=good)
    assert tok.kind == "gguf-bpe"
    assert tok.decode(tok.encode("abc")) == "abc"

    bad = tmp_path / "bad.gguf"
    _write_gguf(bad, _break("tokenizer.ggml.merges", ["a b", "ab nothere"]))
    with pytest.raises(ModelLoadError, match="not in the vocabulary") as info:
        load_tokenizer(_file_metadata(bad), model_path=bad)
    assert str(bad) in str(info.value)


def test_real_file_through_the_reader(real_qwen: Path) -> None:
    with open_gguf(real_qwen) as f:
        tok = load_tokenizer(f.metadata, model_path=real_qwen)
    assert tok.kind == "gguf-bpe" and tok.vocab_size == 151936
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (151643, 151645, False, False)
