"""`worker-orcd generate MODEL PROMPT`: one generation, no NATS (SPEC §5).

Streams the text to stdout as it is produced and ends with one summary line on stderr
(tokens, decode tokens/s, time to first token, stop reason). `--chat` renders PROMPT as a
user message through the model's chat template. The device defaults to `cuda`, as for
`serve`; if the CUDA backend cannot be imported or the GPU cannot be used, the command fails
with a message naming `--device cpu` (the NumPy reference) and exit code 1: the CPU is never
chosen silently. Any failure exits 1 with one line on stderr. Defaults: greedy
(--temperature 0), 256 tokens, a random seed (printed in the summary).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from worker.cli._argtypes import positive_int
from worker.engine.batch import BatchBackend
from worker.engine.params import SamplingParams


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"seed must be a uint64: {value}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a GGUF model once, without NATS",
        description="Load MODEL, generate a continuation of PROMPT (or a chat reply with "
        "--chat) and stream it to stdout; a summary line goes to stderr.",
    )
    p.add_argument("model", metavar="MODEL", type=Path, help="path of the GGUF file")
    p.add_argument("prompt", metavar="PROMPT", help="prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda",
        help="cuda: the GPU backend (default); cpu: the NumPy reference backend",
    )
    p.add_argument("--gpu-device", type=int, default=0, metavar="N", help="GPU index (cuda)")
    p.add_argument("--max-tokens", type=positive_int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0, metavar="P", help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1 = off")
    p.add_argument("--seed", type=_seed, default=None, metavar="S", help="default: random")
    p.add_argument(
        "--stop",
        action="extend",
        nargs="+",
        default=[],
        metavar="S",
        help="stop strings (--stop A B, or --stop A --stop B)",
    )
    p.add_argument(
        "--ctx-size", type=positive_int, default=None, metavar="N", help="KV cache tokens"
    )
    p.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer.json to use")
    p.set_defaults(func=run)


def load_backend(args: argparse.Namespace, gguf_file: Any) -> BatchBackend:
    """The backend named by --device; CUDA failures are errors, never a CPU fallback."""
    if args.device == "cpu":
        from worker.backends.numpy_ref import NumpyBackend

        return NumpyBackend(gguf_file, ctx_size=args.ctx_size, max_batch=1)
    from worker.errors import ErrorCode, WorkerError

    try:
        from worker.backends.cuda import CudaBackend
    except Exception as exc:  # pycuda / driver missing: say so
        raise WorkerError(
            ErrorCode.CUDA_ERROR,
            f"--device cuda: the CUDA backend cannot be imported ({type(exc).__name__}: {exc});"
            " install the cuda extra on a machine with an NVIDIA GPU, or use --device cpu",
            retriable=False,
        ) from exc
    try:
        backend: BatchBackend = CudaBackend(
            gguf_file, ctx_size=args.ctx_size, gpu_device=args.gpu_device, max_batch=1
        )
    except WorkerError:
        raise
    except ImportError as exc:  # the backend imports pycuda / cuda-bindings lazily
        raise WorkerError(
            ErrorCode.CUDA_ERROR,
            f"--device cuda: the CUDA backend needs {exc.name or exc} (pip install '.[cuda]'"
            " on a machine with an NVIDIA GPU); use --device cpu for the NumPy reference",
            retriable=False,
        ) from exc
    except Exception as exc:
        raise WorkerError(
            ErrorCode.CUDA_ERROR,
            f"--device cuda: GPU {args.gpu_device} unavailable ({type(exc).__name__}: {exc});"
            " use --device cpu for the NumPy reference",
            retriable=False,
        ) from exc
    return backend


def run(args: argparse.Namespace) -> int:
    from worker.engine.generate import GenerationRequest, generate, prepare_prompt
    from worker.engine.rng import new_seed
    from worker.errors import WorkerError
    from worker.gguf.reader import open_gguf
    from worker.tokenizer.loader import load_tokenizer

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
        )
        _validate(params)
        t_load = time.perf_counter()
        gguf_file = open_gguf(args.model)
        try:
            tok = load_tokenizer(
                gguf_file.metadata, model_path=args.model, tokenizer_json=args.tokenizer
            )
            backend = load_backend(args, gguf_file)
            load_s = time.perf_counter() - t_load
            if args.chat:
                messages = [{"role": "user", "content": prompt}]
                if args.system is not None:
                    messages.insert(0, {"role": "system", "content": args.system})
                ids = prepare_prompt(tok, messages=messages)
            else:
                ids = prepare_prompt(tok, prompt=prompt)
            seed = args.seed if args.seed is not None else new_seed()
            req = GenerationRequest(
                prompt_ids=ids,
                max_tokens=args.max_tokens,
                params=params,
                seed=seed,
                stop=list(args.stop),
            )

            def show(i: int, text: str, token_id: int) -> None:
                if text:
                    sys.stdout.write(text)
                    sys.stdout.flush()

            end = generate(backend, tok, req, on_token=show)
            backend.close()
        finally:
            gguf_file.close()
    except WorkerError as exc:
        sys.stdout.flush()
        print(f"\nworker-orcd generate: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"worker-orcd generate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nworker-orcd generate: interrupted", file=sys.stderr)
        return 130
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(
        f"[{args.device}] prompt {end.prompt_tokens} tokens, generated {end.tokens_out} "
        f"tokens, {end.tokens_per_s:.2f} tok/s decode, ttft {end.ttft_ms:.0f} ms, "
        f"stop: {end.stop_reason}, seed {seed}, load {load_s:.1f} s",
        file=sys.stderr,
    )
    return 0


def _validate(p: SamplingParams) -> None:
    """The SPEC §3 ranges, so a typo fails before the model loads."""
    if not 0.0 <= p.temperature <= 2.0:
        raise ValueError(f"--temperature must be in [0, 2], got {p.temperature}")
    if not 0.0 <= p.top_p <= 1.0:
        raise ValueError(f"--top-p must be in [0, 1], got {p.top_p}")
    if p.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {p.top_k}")
    if not 0.0 <= p.min_p <= 1.0:
        raise ValueError(f"--min-p must be in [0, 1], got {p.min_p}")
    if not 0.0 <= p.repetition_penalty <= 2.0:
        raise ValueError(f"--repetition-penalty must be in [0, 2], got {p.repetition_penalty}")
