"""Choosing the tokenizer at load (docs/design.md): `hf-json` when a tokenizer.json is given or
lies beside the model, else `gguf-bpe` from the GGUF metadata."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.errors import ModelLoadError
from worker.tokenizer.base import Tokenizer
from worker.tokenizer.gguf_bpe import GGUFTokenizer
from worker.tokenizer.hf_json import HFJsonTokenizer


def load_tokenizer(
    metadata: Mapping[str, Any],
    *,
    model_path: Path | None = None,
    tokenizer_json: Path | None = None,
) -> Tokenizer:
    if tokenizer_json is not None:
        path = Path(tokenizer_json)
        if not path.is_file():
            raise ModelLoadError(path, "tokenizer file not found")
        return HFJsonTokenizer(path, metadata=metadata)
    if model_path is not None:
        beside = Path(model_path).parent / "tokenizer.json"
        if beside.is_file():
            return HFJsonTokenizer(beside, metadata=metadata)
    source = model_path if model_path is not None else "<metadata>"
    try:
        return GGUFTokenizer(metadata, source=source)
    except ModelLoadError:
        raise
    except Exception as exc:  # metadata of the wrong kind (a corrupt file): say so clearly
        raise ModelLoadError(
            source, f"bad tokenizer metadata: {type(exc).__name__}: {exc}"
        ) from exc
