#!/usr/bin/env python3
"""Regenerate the tokenizer conformance data in tests/data/tokenizer/ (docs/design.md).

The expected ids come from implementations independent of worker/tokenizer:
- qwen2:     transformers' GGUF tokenizer conversion of the real Qwen2.5-Coder-0.5B file
             (vocabulary, merges and pre-tokenizer as transformers reads them).
- spm:       the `sentencepiece` library, on a BPE model with byte fallback trained here on a
             small corpus with Llama 2's settings; its pieces, scores and types are written in
             GGUF form (what llama.cpp's converter stores) to spm_vocab.json.gz.
- gpt4o:     `tiktoken` with the o200k pattern it ships, on an o200k-style vocabulary
             (byte-level BPE ranks trained here with the `tokenizers` trainer, harmony special
             tokens on top) written in GGUF form (tokens, merges, types) to
             o200k_style_vocab.json.gz.
- llama-bpe, gpt2: tiktoken on the same ranks with the Llama 3 and GPT-2 split patterns.

Needs (not test dependencies): pip install sentencepiece tiktoken  (+ transformers, torch).
Run: .venv/bin/python scripts/gen_tokenizer_goldens.py
"""

from __future__ import annotations

import functools
import gzip
import inspect
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (not installed)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "tokenizer"

# --- the texts ---------------------------------------------------------------------------

_LONG = (
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\n"
    "El veloz murciélago hindú comía feliz cardillo y kiwi. 敏捷的棕色狐狸跳过了懒狗。"
    " Съешь же ещё этих мягких французских булок, да выпей чаю. 🦊🐶✨ 1234567890\n"
    "\tThe quick brown fox jumps over the lazy dog; it's 3.14159 o'clock!  \n"
)

COMMON_TEXTS: list[str] = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    " \n \n",
    "\r\n",
    "Hello",
    "Hello world",
    " Hello world",
    "Hello  world   !",
    "hello\nworld\n",
    "trailing spaces   ",
    "I'm sure it's what they'd've said, DON'T YOU'LL",
    "0",
    "42",
    "1234567890",
    "3.14159 + 2.71828 = 5.85987",
    "version 1.2.3-rc4, 10,000 items, 0x1F",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    "    indented\n\tTabbed\n        deeper();",
    'print("héllo, wörld")  # comment',
    "https://example.com/path?q=1&r=two#frag",
    "你好，世界！",
    "日本語のテキストと漢字。",
    "한국어 문장입니다.",
    "Привет, мир! Ёжик в тумане.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "😀",
    "🦊🐶✨ emoji 👍🏽 family 👨‍👩‍👧",
    "mixed: English, 中文, русский, العربية, 😀, and ñ",
    "ÀÉÎÕÜ àéîõü ß Æ œ",
    "\u00a0non-breaking\u2009thin\u3000ideographic",
    "<html><body>&nbsp;&amp;</body></html>",
    "ALL CAPS SENTENCE AND CamelCaseWord and snake_case_word",
    "a" * 50,
    "!!!???...---",
    (_LONG * 24),
]


def _special_texts(tokens: list[str]) -> list[str]:
    """Texts that use the family's special tokens (a, b, c are three of them)."""
    a, b, c = tokens[:3]
    return [
        f"{a}",
        f"{a}hello{b}",
        f"{a} spaced {b} out {c}",
        f"text before{c}\nafter",
        f"{a}{b}{c}",
        f"x{a}y{a}z",
    ]


# --- corpus for the vocabularies built here ------------------------------------------------

_MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! It's a beautiful day, isn't it? We'll see what they've done.",
    "你好，世界！今天天气很好。我们一起去公园散步吧。中文文本和汉字。",
    "日本語のテキストと漢字。こんにちは、世界。東京は大きな都市です。",
    "한국어 문장입니다. 안녕하세요 세계.",
    "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "مرحبا بالعالم. هذا نص عربي.",
    "नमस्ते दुनिया। यह हिंदी पाठ है।",
    "El veloz murciélago hindú comía feliz cardillo y kiwi. Ça va très bien, merci.",
    "Emoji: 😀😃😄 🦊🐶✨ 👍 ❤️ 🎉",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 2.71828",
]


def corpus() -> list[str]:
    import argparse
    import collections
    import json as json_mod
    import textwrap

    lines: list[str] = []
    for mod in (argparse, collections, json_mod, textwrap, inspect, re, gzip, io):
        lines += inspect.getsource(mod).splitlines()
    for _ in range(40):
        lines += _MULTILINGUAL
    return [ln for ln in lines if ln.strip()]


# --- families ------------------------------------------------------------------------------


def _vectors(encode: Any, texts: list[str], specials: list[str]) -> list[dict[str, Any]]:
    return [{"text": t, "ids": [int(i) for i in encode(t)]} for t in texts + specials]


def gen_qwen2() -> dict[str, Any]:
    from transformers import AutoTokenizer

    from tools.devdata import real_qwen_path

    path = real_qwen_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    specials = [
        *_special_texts(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
        "<tool_call>\n{}\n</tool_call>",
    ]
    vectors = _vectors(lambda t: tok.encode(t, add_special_tokens=False), COMMON_TEXTS, specials)
    return {
        "family": "qwen2",
        "source": "transformers GGUF conversion of " + path.name,
        "vectors": vectors,
    }


SPM_SPECIALS = ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>", "<|endoftext|>"]


def gen_spm() -> dict[str, Any]:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=3000,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        character_coverage=0.9995,
        max_sentence_length=100000,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.is_unused(i):
            types.append(5)
        else:
            types.append(1)
    # Chat tokens appended as control tokens, as Phi-3's converter does.
    special_ids = {}
    for s in SPM_SPECIALS:
        special_ids[s] = len(tokens)
        tokens.append(s)
        scores.append(0.0)
        types.append(3)
    split_re = re.compile("(" + "|".join(map(re.escape, SPM_SPECIALS)) + ")")

    def encode(text: str) -> list[int]:
        out: list[int] = []
        for part in split_re.split(text):
            if part in special_ids:
                out.append(special_ids[part])
            elif part:
                out += sp.encode(part)
        return out

    vocab = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": special_ids["<|endoftext|>"],
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    vectors = _vectors(encode, COMMON_TEXTS, _special_texts(SPM_SPECIALS))
    return {
        "family": "spm",
        "source": f"sentencepiece {spm.__version__} (BPE, byte fallback, Llama 2 settings)",
        "vocab": vocab,
        "vectors": vectors,
    }


HARMONY_SPECIALS = [
    "<|start|>",
    "<|message|>",
    "<|end|>",
    "<|channel|>",
    "<|return|>",
    "<|call|>",
    "<|constrain|>",
    "<|endoftext|>",
]


@functools.lru_cache(maxsize=1)
def _byte_tables() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's byte <-> character table, from transformers (not from worker/tokenizer)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_char: dict[int, str] = bytes_to_unicode()
    return to_char, {c: b for b, c in to_char.items()}


def bytes_to_byte_level(data: bytes) -> str:
    return "".join(_byte_tables()[0][b] for b in data)


def byte_level_to_bytes(token: str) -> bytes:
    return bytes(_byte_tables()[1][c] for c in token)


def _o200k_ranks() -> tuple[dict[bytes, int], str]:
    import tiktoken_ext.openai_public as oai
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    # o200k_base() would download the real ranks; only its split pattern is wanted here.
    real_loader = oai.load_tiktoken_bpe
    oai.load_tiktoken_bpe = lambda *a, **k: {}
    try:
        pat = oai.o200k_base()["pat_str"]
    finally:
        oai.load_tiktoken_bpe = real_loader
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pat), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]

    ranks: dict[bytes, int] = {}
    for b in range(256):
        ranks[bytes([b])] = b
    for left, right in (m.split(" ") if isinstance(m, str) else m for m in model["merges"]):
        piece = byte_level_to_bytes(left + right)
        if piece not in ranks:
            ranks[piece] = len(ranks)
    return ranks, pat


def _split_by_ranks(piece: bytes, ranks: dict[bytes, int], limit: int) -> list[bytes]:
    """tiktoken's merge rule on `piece` with ranks below `limit` (to find the merge that
    makes each token)."""
    parts = [bytes([b]) for b in piece]
    while True:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return parts
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def gen_byte_level_families() -> list[dict[str, Any]]:
    import tiktoken

    ranks, o200k_pat = _o200k_ranks()
    by_rank = sorted(ranks, key=ranks.__getitem__)
    tokens = [bytes_to_byte_level(b) for b in by_rank]
    merges = []
    for b in by_rank[256:]:
        parts = _split_by_ranks(b, ranks, ranks[b])
        assert len(parts) == 2, (b, parts)
        merges.append(f"{bytes_to_byte_level(parts[0])} {bytes_to_byte_level(parts[1])}")
    special = {s: len(tokens) + k for k, s in enumerate(HARMONY_SPECIALS)}
    vocab = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-4o",
        "tokenizer.ggml.tokens": tokens + HARMONY_SPECIALS,
        "tokenizer.ggml.token_type": [1] * len(tokens) + [3] * len(HARMONY_SPECIALS),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": special["<|endoftext|>"],
        "tokenizer.ggml.eos_token_id": special["<|return|>"],
        "tokenizer.ggml.padding_token_id": special["<|endoftext|>"],
    }
    patterns = {
        "gpt4o": ("gpt-4o", o200k_pat),
        # Llama 3's tokenizer.json split pattern.
        "llama-bpe": (
            "llama-bpe",
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        # GPT-2's (the tokenizers ByteLevel pre-tokenizer's) pattern.
        "gpt2": (
            "gpt2",
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        ),
    }
    out = []
    for family, (pre, pat) in patterns.items():
        enc = tiktoken.Encoding(
            name=f"test-{family}", pat_str=pat, mergeable_ranks=ranks, special_tokens=special
        )
        vectors = _vectors(
            lambda t, enc=enc: enc.encode(t, allowed_special="all"),
            COMMON_TEXTS,
            [*_special_texts(["<|start|>", "<|message|>", "<|end|>"]), "<|return|><|call|>"],
        )
        out.append(
            {
                "family": family,
                "source": f"tiktoken {tiktoken.__version__} with the {pre} split pattern",
                "pre": pre,
                "vectors": vectors,
            }
        )
    return [{"vocab": vocab}, *out]


def _write_json(name: str, obj: Any) -> None:
    path = OUT / name
    text = json.dumps(obj, ensure_ascii=False, indent=None, separators=(",", ":"))
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    else:
        path.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    spm_family = gen_spm()
    _write_json("spm_vocab.json.gz", spm_family.pop("vocab"))
    _write_json("golden_spm.json", spm_family)
    vocab_entry, *families = gen_byte_level_families()
    _write_json("o200k_style_vocab.json.gz", vocab_entry["vocab"])
    for fam in families:
        _write_json(f"golden_{fam['family']}.json", fam)
    _write_json("golden_qwen2.json", gen_qwen2())


if __name__ == "__main__":
    main()
