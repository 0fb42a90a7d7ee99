"""Integration with the synthetic models: every architecture's tiny file (written by
tools.synth, read by worker.gguf.reader) gives a working gguf-bpe tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.synth import ARCHS, preset, write_synthetic
from worker.gguf.reader import open_gguf
from worker.tokenizer import StreamDecoder, load_tokenizer

TEXTS = ["", "Hello world", "  spaces\n\nand tabs\t!", "你好, мир 🦊 café 12345", "x" * 300]


@pytest.mark.parametrize("arch", ARCHS)
def test_synthetic_vocabulary(arch: str, tmp_path: Path) -> None:
    path = tmp_path / f"{arch}.gguf"
    write_synthetic(path, preset(arch, "tiny"))
    with open_gguf(path) as f:
        metadata = dict(f.metadata)
    tok = load_tokenizer(metadata, model_path=path)
    assert tok.kind == "gguf-bpe"
    assert tok.vocab_size == len(metadata["tokenizer.ggml.tokens"])
    assert tok.eos_id is not None and tok.is_eog(tok.eos_id)
    for text in TEXTS:
        ids = tok.encode(text, add_special=False)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        dec = StreamDecoder(tok, at_start=True)
        assert "".join(dec.push(i) for i in ids) + dec.flush() == text
    with_special = tok.encode("hi")
    assert (with_special[0] == tok.bos_id) == tok.add_bos
    if "tokenizer.chat_template" in metadata:
        prompt = tok.render_chat([{"role": "user", "content": "hi"}])
        assert "hi" in prompt
        ids = tok.encode(prompt, add_special=False)
        spelled = tok.encode(prompt, add_special=False, parse_special=False)
        # The template's markers are single special tokens, not spelled out.
        assert len(ids) < len(spelled)
        assert tok.decode(ids) == tok.decode(spelled) == prompt
