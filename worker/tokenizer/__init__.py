"""Tokenizers (docs/design.md): gguf-bpe and hf-json behind one interface, chat templates and a
streaming UTF-8-safe detokenizer."""

from worker.tokenizer.base import Tokenizer
from worker.tokenizer.loader import load_tokenizer
from worker.tokenizer.stream import StreamDecoder

__all__ = ["StreamDecoder", "Tokenizer", "load_tokenizer"]
