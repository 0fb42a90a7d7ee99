"""Time `worker.engine.sampling.sample` per call (BENCHMARKS.md).

    python -m tools.sampling_bench [--model GGUF] [--repeat N]

Without --model the logits are synthetic, shaped like a language model's (a normal bulk
of std 2.5 plus a dozen peaks) at Qwen's vocab of 151936; with --model they are the real
logits of the chat-templated haiku prompt and its greedy continuation (NumPy backend,
teacher-forced). Prints, per parameter set: the wall-clock median, the median over rows of
the best of N repeats (and the slowest row's best), and the median CPU time of this process
per call; the last two are the figures that hold up when other processes share the CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from worker.engine.params import SamplingParams
from worker.engine.rng import uniform
from worker.engine.sampling import sample

PARAM_SETS: dict[str, SamplingParams] = {
    "greedy": SamplingParams(temperature=0.0),
    "T=1 (no filters)": SamplingParams(temperature=1.0),
    "T=0.7 top_k=40 top_p=0.9": SamplingParams(temperature=0.7, top_k=40, top_p=0.9),
    "T=0.8 top_p=0.95 rep=1.1": SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1),
    "T=1 min_p=0.05": SamplingParams(temperature=1.0, min_p=0.05),
    "T=2 (flat)": SamplingParams(temperature=2.0),
}


def synthetic_rows(n: int, vocab: int = 151_936, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        l = rng.standard_normal(vocab).astype(np.float32) * np.float32(2.5)
        l[rng.integers(0, vocab, 12)] += rng.uniform(4.0, 14.0, 12).astype(np.float32)
        rows.append(l)
    return rows


def model_rows(path: Path) -> list[np.ndarray]:
    from worker.backends.numpy_ref import NumpyBackend
    from worker.engine.generate import GenerationRequest, generate, prepare_prompt
    from worker.engine.single import SingleSequence
    from worker.gguf.reader import open_gguf
    from worker.tokenizer.loader import load_tokenizer

    with open_gguf(path) as gf:
        backend = NumpyBackend(gf, ctx_size=256)
        tok = load_tokenizer(gf.metadata, model_path=path)
        ids = prepare_prompt(
            tok, messages=[{"role": "user", "content": "Write a haiku about GPU computing"}]
        )
        out = generate(backend, tok, GenerationRequest(ids, 16, SamplingParams(temperature=0)))
        logits = SingleSequence(backend).forward(ids + list(out.token_ids), all_logits=True)
        backend.close()
    return [np.ascontiguousarray(r) for r in logits[len(ids) - 1 :]]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    rows = model_rows(args.model) if args.model else synthetic_rows(16)
    history = list(range(0, 3000, 11))
    print(f"{len(rows)} logit rows of {rows[0].size} ({'model' if args.model else 'synthetic'})")
    for name, params in PARAM_SETS.items():
        per_row_best, all_times, cpu = [], [], []
        for i, row in enumerate(rows):
            times = []
            for rep in range(args.repeat):
                c = time.process_time()
                t = time.perf_counter()
                sample(row, params, uniform(i, rep), history)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            per_row_best.append(min(times))
            all_times += times
        print(
            f"  {name:28s} wall median {np.median(all_times) * 1e3:6.3f} ms, "
            f"best-of-{args.repeat} median {np.median(per_row_best) * 1e3:6.3f} ms, "
            f"max {max(per_row_best) * 1e3:6.3f} ms; CPU median {np.median(cpu) * 1e3:6.3f} ms"
        )


if __name__ == "__main__":
    main()
