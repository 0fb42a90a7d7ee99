"""Host time of one engine step without a device (BENCHMARKS.md).

    python -m tools.host_step --model GGUF [--batch 1,8,64] [--runs 27] [--steps 200]

`Scheduler.step` over a backend that does the CUDA backend's host work and nothing else:
the bucket choice and the packed step layout (worker/backends/cuda/step.py); its "device"
returns fixed ids at once. B jobs (31-token prompts, sampled with top-p and a repetition
penalty, EOS ignored) run past their prompts, then `--steps` decode steps are timed; the
best of `--runs` such runs is printed per B (the figure that holds when other processes
share the CPU). The tokenizer is the model file's.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from worker.backends.cuda.step import choose_bucket, layout_step, prompt_buckets
from worker.engine.batch import Chunk, StepOutput
from worker.engine.params import SamplingParams
from worker.engine.scheduler import Request, Scheduler
from worker.gguf.reader import open_gguf
from worker.tokenizer.loader import load_tokenizer

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class HostOnlyBackend:
    """The CUDA backend's per-step host work (bucket, layout), no device."""

    vocab_size = 151936
    context_length = 4096
    block_size = 64
    n_blocks = 20000
    max_batch = 256
    max_step_tokens = 256 + 512
    chunk_align = 1

    def __init__(self) -> None:
        self.prev_rows: dict[int, int] = {}

    def launch(self, chunks: Sequence[Chunk]) -> Sequence[Chunk]:
        bucket = choose_bucket(
            chunks,
            decode_buckets=DECODE_BUCKETS,
            prompt_sizes=prompt_buckets(512),
            max_chunks=self.max_batch,
            max_tokens=self.max_step_tokens,
            max_rows=self.max_batch + 64,
        )
        lay = layout_step(
            chunks,
            width=self.context_length // self.block_size,
            trash_block=0,
            bucket=bucket,
            pad_slot=self.max_batch,
            prev_rows=self.prev_rows,
        )
        self.prev_rows = lay.sampled_rows
        return chunks

    def collect(self, handle: Sequence[Chunk]) -> StepOutput:
        return StepOutput(ids=[1000 + i for i in range(len(handle))], logits=[None] * len(handle))

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        pass

    def release_slot(self, slot: int) -> None:
        pass


def step_us(tok: object, batch: int, steps: int) -> float:
    """Microseconds a decode step of `batch` jobs takes on the host (one run)."""
    sched = Scheduler(HostOnlyBackend(), tok, max_batch=batch, prefill_chunk=512)  # type: ignore[arg-type]
    params = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    for k in range(batch):
        prompt = list(range(100, 131))
        req = Request(f"j{k}", prompt, 10 * steps, params=params, seed=k, ignore_eos=True)
        sched.add(req)
    for _ in range(5):  # past the prompts
        sched.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        sched.step()
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="GGUF file (its tokenizer)")
    p.add_argument("--batch", default="1,8,64", help="comma list of B")
    p.add_argument("--runs", type=int, default=27)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    with open_gguf(args.model) as gf:
        tok = load_tokenizer(gf.metadata)
    for b in (int(x) for x in args.batch.split(",")):
        best = min(step_us(tok, b, args.steps) for _ in range(args.runs))
        print(f"B={b}: {best:.0f} us a step (best of {args.runs} runs of {args.steps} steps)")


if __name__ == "__main__":
    main()
