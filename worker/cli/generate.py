"""`worker-orcd generate MODEL PROMPT`: one generation, no NATS.

Streams the text to stdout as it is produced and ends with one summary line on stderr
(tokens, decode tokens/s, time to first token, stop reason). `--chat` renders PROMPT as a
user message through the model's chat template. The device defaults to `cuda`, as for
`serve`; if the CUDA backend cannot be imported or the GPU cannot be used, the command fails
with a message naming `--device cpu` (the NumPy reference) and exit code 1: the CPU is never
chosen silently. Any failure exits 1 with one line on stderr. Defaults: greedy
(--temperature 0), 256 tokens, a random seed (printed in the summary). On a terminal the
model load shows its progress on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.cli._common import (
    SubParsers,
    add_command,
    add_model_options,
    add_sampling_options,
    model_path,
    positive_int,
)
from worker.engine.batch import BatchBackend
from worker.engine.params import SamplingParams

ORDER = 50


def register(subparsers: SubParsers) -> None:
    p = add_command(
        subparsers,
        "generate",
        summary="generate text from a GGUF model once, without NATS",
        description="Load MODEL, generate a continuation of PROMPT (or a chat reply with "
        "--chat) and stream it to stdout; a summary line goes to stderr. Nothing else is "
        "needed: no NATS, no worker.",
        examples="""\
  worker-orcd generate --device cpu qwen.gguf --chat "Write a haiku about GPUs"
  worker-orcd generate --model qwen.gguf --max-tokens 64 "def fibonacci(n):"
  echo "Once upon a time" | worker-orcd generate qwen.gguf - --temperature 0.8 --seed 1""",
    )
    add_model_options(p, positional=True)
    p.add_argument("prompt", metavar="PROMPT", help="prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message (with --chat)")
    d = p.add_argument_group("model and device")
    d.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda",
        help="cuda: the GPU backend; cpu: the NumPy reference backend",
    )
    d.add_argument("--gpu-device", type=int, default=0, metavar="N", help="GPU index (cuda)")
    d.add_argument(
        "--ctx-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="context length in tokens (default: the model's training context); the KV cache "
        "is sized for it, capped to what fits",
    )
    d.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        metavar="PATH",
        help="a tokenizer.json to use (default: the GGUF vocabulary)",
    )
    add_sampling_options(p, max_tokens=256, temperature=0.0)
    p.set_defaults(func=run, parser=p)


def load_backend(
    args: argparse.Namespace,
    gguf_file: Any,
    progress: Callable[[float], None] | None = None,
) -> BatchBackend:
    """The backend named by --device; CUDA failures are errors, never a CPU fallback.
    `progress(fraction)` follows the weights' load."""
    if args.device == "cpu":
        from worker.backends.numpy_ref import NumpyBackend

        return NumpyBackend(gguf_file, ctx_size=args.ctx_size, max_batch=1, progress=progress)
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
            gguf_file,
            ctx_size=args.ctx_size,
            gpu_device=args.gpu_device,
            max_batch=1,
            progress=progress,
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


class LoadProgress:
    """One self-rewriting status line on stderr while the model loads, when stderr is a
    terminal (a log or a pipe gets nothing: the summary line reports the load time)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.on = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self._last = -1

    def stage(self, what: str) -> None:
        if self.on:
            sys.stderr.write(f"\r\x1b[Kloading {self.name}: {what}")
            sys.stderr.flush()

    def weights(self, fraction: float) -> None:
        pct = int(fraction * 100)
        if pct != self._last:
            self._last = pct
            filled = pct // 5
            self.stage(f"weights [{'#' * filled}{'.' * (20 - filled)}] {pct:3d}%")

    def done(self) -> None:
        if self.on:
            secs = time.perf_counter() - self.t0
            sys.stderr.write(f"\r\x1b[Kloaded {self.name} in {secs:.1f} s\n")
            sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    from worker.engine.generate import GenerationRequest, generate, prepare_prompt
    from worker.engine.rng import new_seed
    from worker.errors import WorkerError
    from worker.gguf.hparams import load_hparams
    from worker.gguf.reader import open_gguf
    from worker.tokenizer.loader import load_tokenizer

    model = model_path(args.parser, args)
    if args.system is not None and not args.chat:
        args.parser.error("--system goes with --chat")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=1.0 if args.top_p is None else args.top_p,
            top_k=0 if args.top_k is None else args.top_k,
            min_p=0.0 if args.min_p is None else args.min_p,
            repetition_penalty=1.0 if args.repetition_penalty is None else args.repetition_penalty,
        )
        _validate(params)
        t_load = time.perf_counter()
        shown = LoadProgress(model.name)
        shown.stage("reading the file")
        gguf_file = open_gguf(model)
        try:
            shown.stage("tokenizer")
            tok = load_tokenizer(
                gguf_file.metadata, model_path=model, tokenizer_json=args.tokenizer
            )
            shown.stage("weights")
            backend = load_backend(args, gguf_file, progress=shown.weights)
            shown.done()
            load_s = time.perf_counter() - t_load
            # the job-facing context, as `serve` has it: --ctx-size, else the model's
            context = args.ctx_size or load_hparams(gguf_file).n_ctx_train
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

            try:
                end = generate(backend, tok, req, on_token=show, context_length=context)
            finally:
                backend.close()
        finally:
            gguf_file.close()
    except WorkerError as exc:
        sys.stdout.flush()
        print(f"\nworker-orcd generate: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"worker-orcd generate: {exc}", file=sys.stderr)
        return 1
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
    """The job ranges of docs/protocol.md, so a typo fails before the model loads."""
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
