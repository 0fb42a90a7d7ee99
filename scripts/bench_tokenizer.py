#!/usr/bin/env python3
"""Tokenizer speed on the real Qwen2.5-Coder-0.5B vocabulary (a 32 KB prompt must
encode well under 50 ms on the CI-class machine).

Prints one JSON object: vocabulary load time, and min / median / p95 milliseconds over
--repeat runs for encoding a 32 KB prompt (code, prose, CJK, emoji), decoding it back and
streaming it through StreamDecoder.

Run: .venv/bin/python scripts/bench_tokenizer.py [--repeat 30] [--chars 32768]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ (not installed)

from tools.devdata import real_qwen_path
from worker.gguf.reader import open_gguf
from worker.tokenizer import StreamDecoder, load_tokenizer

_PARTS = [
    Path(__file__).resolve().parent.parent.joinpath("worker", "tokenizer", "gguf_bpe.py"),
]
_PROSE = (
    "The worker takes generation jobs from NATS and streams tokens back. "
    "Le modèle est chargé une seule fois. 模型只加载一次，然后一直驻留在显存中。 "
    "Модель загружается один раз. 🚀✨ 12345 + 67890 = 80235\n"
)


def prompt(chars: int) -> str:
    code = "".join(p.read_text(encoding="utf-8") for p in _PARTS)
    text = ""
    while len(text) < chars:
        text += code + _PROSE * 20
    return text[:chars]


def timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return {
        "min_ms": round(ts[0], 2),
        "median_ms": round(statistics.median(ts), 2),
        "p95_ms": round(ts[min(len(ts) - 1, int(0.95 * len(ts)))], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--chars", type=int, default=32768)
    args = ap.parse_args()

    path = real_qwen_path()
    with open_gguf(path) as f:
        metadata = dict(f.metadata)
    t0 = time.perf_counter()
    tok = load_tokenizer(metadata, model_path=path)
    load_s = time.perf_counter() - t0

    text = prompt(args.chars)
    ids = tok.encode(text)
    assert tok.decode(ids) == text

    def stream() -> None:
        dec = StreamDecoder(tok)
        for i in ids:
            dec.push(i)
        dec.flush()

    result = {
        "vocabulary": path.name,
        "tokenizer": tok.kind,
        "load_s": round(load_s, 3),
        "prompt_chars": len(text),
        "prompt_bytes": len(text.encode("utf-8")),
        "prompt_tokens": len(ids),
        "encode": timed(lambda: tok.encode(text), args.repeat),
        "decode": timed(lambda: tok.decode(ids), args.repeat),
        "stream_decode": timed(stream, args.repeat),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
