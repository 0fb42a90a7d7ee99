"""Pre-tokenizer regexes of the byte-level BPE vocabularies we serve, by the name GGUF
files carry in `tokenizer.ggml.pre`.

Each entry is a list of regexes applied one after the other (every match and every gap
between matches becomes a piece for the next regex), written in the Oniguruma syntax the
`tokenizers` library uses. `ignore_merges`: a piece that is itself a vocabulary entry is
taken whole before any merge (the Llama 3 rule)."""

from __future__ import annotations

from dataclasses import dataclass

_CONTRACTIONS_CI = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Llama 3 (and the cl100k family): digits in runs of at most three.
LLAMA3 = (
    _CONTRACTIONS_CI
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2: as Llama 3 but every digit on its own.
QWEN2 = (
    _CONTRACTIONS_CI
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GPT-4o / o200k (GPT-OSS): case-aware words with their contraction suffix attached.
_UPPERISH = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWERISH = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
GPT4O = "|".join(
    [
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}*{_LOWERISH}+{_CONTRACTIONS_CI}?",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}+{_LOWERISH}*{_CONTRACTIONS_CI}?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)


@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False


PRETOKENIZERS: dict[str, PreTokenizer] = {
    "gpt2": PreTokenizer((GPT2,)),
    "gpt-2": PreTokenizer((GPT2,)),
    "qwen2": PreTokenizer((QWEN2,)),
    "deepseek-r1-qwen": PreTokenizer((QWEN2,)),
    "llama-bpe": PreTokenizer((LLAMA3,), ignore_merges=True),
    "llama3": PreTokenizer((LLAMA3,), ignore_merges=True),
    "llama-v3": PreTokenizer((LLAMA3,), ignore_merges=True),
    "falcon3": PreTokenizer((LLAMA3,), ignore_merges=True),
    "gpt-4o": PreTokenizer((GPT4O,)),
}
