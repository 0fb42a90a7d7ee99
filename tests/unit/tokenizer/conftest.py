"""Vocabularies for the tokenizer tests: the real Qwen2.5 file's metadata and the committed
SentencePiece and o200k-style vocabularies (scripts/gen_tokenizer_goldens.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from worker.gguf.reader import open_gguf
from worker.tokenizer.gguf_bpe import GGUFTokenizer

DATA = Path(__file__).resolve().parents[2] / "data" / "tokenizer"


def load_json(name: str) -> Any:
    raw = (DATA / name).read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return json.loads(raw)


@pytest.fixture(scope="session")
def golden() -> Any:
    """golden(family) -> the committed vectors of that family."""
    return lambda family: load_json(f"golden_{family}.json")


@pytest.fixture(scope="session")
def qwen_metadata(real_qwen: Path) -> dict[str, Any]:
    with open_gguf(real_qwen) as f:
        return {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def qwen_tok(qwen_metadata: dict[str, Any], real_qwen: Path) -> GGUFTokenizer:
    return GGUFTokenizer(qwen_metadata, source=real_qwen)


@pytest.fixture(scope="session")
def spm_metadata() -> dict[str, Any]:
    return dict(load_json("spm_vocab.json.gz"))


@pytest.fixture(scope="session")
def spm_tok(spm_metadata: dict[str, Any]) -> GGUFTokenizer:
    return GGUFTokenizer(spm_metadata)


@pytest.fixture(scope="session")
def o200k_metadata() -> dict[str, Any]:
    return dict(load_json("o200k_style_vocab.json.gz"))


@pytest.fixture(scope="session")
def o200k_tok(o200k_metadata: dict[str, Any]) -> GGUFTokenizer:
    return GGUFTokenizer(o200k_metadata)
