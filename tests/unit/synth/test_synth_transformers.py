"""An independent reader of the tokenizer metadata: Hugging Face transformers converts the
synthetic files' GGUF vocabularies (BPE merges, SPM scores and byte fallback) into its own
tokenizers, which must agree with ours token for token and decode back to the text."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.synth import preset, write_synthetic
from worker.gguf.reader import open_gguf
from worker.tokenizer.gguf_bpe import GGUFTokenizer


@pytest.mark.parity
def test_transformers_reads_the_synthetic_tokenizers(tmp_path: Path) -> None:
    import transformers  # the parity extra; scripts/dev-setup.sh installs it

    text = "Hello world, the quick brown fox 123 éà\n  x"
    for arch in ("qwen2", "llama", "phi3", "gpt2"):  # transformers' gguf has no gpt-oss vocab
        path = tmp_path / f"{arch}.gguf"
        write_synthetic(path, preset(arch, "tiny", mix="q8_0"))
        hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        with open_gguf(path) as gf:
            ours = GGUFTokenizer(dict(gf.metadata), source=path)
        ids = hf(text, add_special_tokens=False).input_ids
        assert ids == ours.encode(text, add_special=False), arch
        assert hf.decode(ids) == text, arch
