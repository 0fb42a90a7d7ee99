"""`worker-orcd synth`: write a synthetic GGUF model with the real layout of an architecture.

The writer lives in the repository's tools/ tree (test and benchmark tooling, not installed),
so this command works from a source checkout and says so elsewhere."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from worker.cli._common import EXIT_USAGE, SubParsers, add_command, fail
from worker.cli._tools import ToolsUnavailable, import_tool

_OVERRIDES: tuple[tuple[str, str, str], ...] = (
    ("--layers", "n_layer", "number of blocks"),
    ("--embd", "n_embd", "embedding width"),
    ("--heads", "n_head", "query heads"),
    ("--kv-heads", "n_head_kv", "key/value heads"),
    ("--head-dim", "head_dim", "head size"),
    ("--ff", "n_ff", "feed-forward width"),
    ("--vocab", "n_vocab", "vocabulary size (special tokens kept)"),
    ("--train-ctx", "n_ctx", "training context length written to the metadata"),
    ("--experts", "n_expert", "experts (gpt-oss)"),
    ("--experts-used", "n_expert_used", "experts per token (gpt-oss)"),
    ("--expert-ff", "n_ff_exp", "expert feed-forward width (gpt-oss)"),
    ("--sliding-window", "sliding_window", "sliding-window size"),
)


ORDER = 80


def register(subparsers: SubParsers) -> None:
    p = add_command(
        subparsers,
        "synth",
        summary="write a random-weight GGUF with a real model's layout (tests, benchmarks)",
        description=(
            "Write a GGUF file with random weights in the exact tensor layout, types and "
            "metadata of a real model (qwen2: Qwen2.5-0.5B, phi3: Phi-3-mini-4k, gpt-oss: "
            "GPT-OSS-20B, llama: Llama-3.2-1B, gpt2: GPT-2 124M), full size or tiny. Runs from "
            "a source checkout (the writer is test tooling in tools/, not installed)."
        ),
        examples="""\
  worker-orcd synth --arch qwen2 --size tiny --out /tmp/tiny-qwen2.gguf
  worker-orcd synth --arch gpt-oss --size full --out /tmp/gpt-oss.gguf --progress""",
    )
    p.add_argument("--arch", required=True, help="qwen2, phi3, gpt-oss, llama or gpt2")
    p.add_argument("--size", default="full", help="full or tiny")
    p.add_argument(
        "--mix",
        default=None,
        help="quant mix: q4_k_m, mxfp4 or one type (f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, "
        "q8_0, q4_k, q5_k, q6_k); default q4_k_m (mxfp4 for gpt-oss)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--out", required=True, metavar="PATH", help="output .gguf path")
    for flag, field_name, text in _OVERRIDES:
        p.add_argument(flag, dest=field_name, type=int, default=None, help=text)
    p.add_argument(
        "--rope-factors",
        action="store_true",
        help="phi3: add rope_factors_long/short tensors (128k variant)",
    )
    p.add_argument(
        "--tied-output",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop output.weight (LM head = token_embd); default as the real model",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--progress", action="store_true", help="progress on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        synth = import_tool("synth", "synth")
    except ToolsUnavailable as exc:
        return fail(args, str(exc), EXIT_USAGE)
    try:
        spec = synth.preset(args.arch, args.size, mix=args.mix, seed=args.seed)
        overrides: dict[str, Any] = {
            f: getattr(args, f) for _, f, _ in _OVERRIDES if getattr(args, f) is not None
        }
        if args.rope_factors:
            overrides["rope_factors"] = True
        if args.tied_output is not None:
            overrides["tied_output"] = args.tied_output
        if overrides:
            spec = spec.scaled(**overrides)
        spec.validate()
    except synth.SynthError as exc:
        return fail(args, str(exc), EXIT_USAGE)

    def progress(done: int, total: int) -> None:
        print(f"\r{100 * done // max(total, 1):3d}% of {total >> 20} MiB", end="", file=sys.stderr)

    report = synth.write_synthetic(args.out, spec, progress=progress if args.progress else None)
    if args.progress:
        print(file=sys.stderr)
    if args.json:
        d = report.as_dict()
        d.pop("tensors")
        print(json.dumps(d))
    else:
        print(report.summary())
    return 0
