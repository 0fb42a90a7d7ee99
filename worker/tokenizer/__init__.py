"""Tokenizers (SPEC §2): gguf-bpe and hf-json behind one interface, chat templates and a
streaming UTF-8-safe detokenizer."""
