"""`worker-orcd inspect MODEL`: what a GGUF file holds and what serving it takes.

Prints the architecture, name, hyperparameters, tokenizer kind and vocabulary size, tensor
count and bytes by type, the quant kind the worker reports, and the VRAM estimate (weights +
FP16 KV cache at `--ctx-size` + scratch; see worker/gguf/estimate.py). `--json` prints one
JSON object instead. A file that fails validation gives one line on stderr (a JSON object
with `error` on stdout under --json) and exit code 1.
Nothing is allocated on a GPU and no tensor data is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from worker.cli._common import (
    SubParsers,
    add_command,
    add_json_option,
    add_model_options,
    fail,
    model_path,
    positive_int,
)

ORDER = 60


def register(subparsers: SubParsers) -> None:
    p = add_command(
        subparsers,
        "inspect",
        summary="show a GGUF model's metadata, tensor type mix and VRAM estimate",
        description="Validate a GGUF model as `serve` would and show its architecture, "
        "hyperparameters, tokenizer, tensor type mix, quant kind and the device memory "
        "serving it takes. Reads no tensor data and needs no GPU. Exit status 1 (with one "
        "line) when the file is not a model the worker can serve.",
        examples="""\
  worker-orcd inspect qwen2.5-0.5b-instruct-q4_k_m.gguf
  worker-orcd inspect --model qwen.gguf --ctx-size 8192 --json | jq .vram_estimate""",
    )
    add_model_options(p, positional=True)
    p.add_argument(
        "--ctx-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="context length in tokens the KV cache estimate is for (default: the model's)",
    )
    add_json_option(p, "one object")
    p.set_defaults(func=run, parser=p)


def _plain(value: Any) -> Any:
    """JSON-safe copy of hyperparameter values (tuples to lists, mappings to dicts)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def tokenizer_kind(model: Path) -> str:
    """The tokenizer the worker would choose (worker/tokenizer/loader.py): `hf-json` when a
    tokenizer.json lies beside the model, else `gguf-bpe` from the metadata."""
    return "hf-json" if (model.parent / "tokenizer.json").is_file() else "gguf-bpe"


def describe(model: Path, ctx_size: int | None = None) -> dict[str, Any]:
    """Everything `inspect` reports, as one JSON-ready dict (raises ModelLoadError)."""
    from worker.gguf.estimate import bytes_by_type, estimate_vram, quant_kind
    from worker.gguf.hparams import load_hparams
    from worker.gguf.reader import open_gguf

    with open_gguf(model) as gf:
        hp = load_hparams(gf)
        md = gf.metadata
        tokens = md.get("tokenizer.ggml.tokens")
        hparams = {f.name: _plain(getattr(hp, f.name)) for f in dataclasses.fields(hp)}
        hparams["rope"] = _plain(dataclasses.asdict(hp.rope))
        hparams.pop("extra", None)
        hparams["swa_layers"] = sum(hp.swa_layers)  # count, not a per-layer list
        est = estimate_vram(gf, ctx_size, hp=hp)
        return {
            "path": str(model),
            "file_size": gf.file_size,
            "gguf_version": gf.version,
            "architecture": gf.architecture,
            "name": str(md.get("general.name", "")),
            "hparams": hparams,
            "tokenizer": {
                "kind": tokenizer_kind(model),
                "model": md.get("tokenizer.ggml.model"),
                "pre": md.get("tokenizer.ggml.pre"),
                "vocab_size": len(tokens) if isinstance(tokens, list) else 0,
                "has_chat_template": isinstance(md.get("tokenizer.chat_template"), str),
            },
            "tensors": {
                "count": len(gf.tensors),
                "bytes": gf.total_tensor_bytes(),
                "by_type": bytes_by_type(gf),
            },
            "quant_kind": quant_kind(gf),
            "vram_estimate": est.as_dict(),
        }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.2f} MiB"


def format_text(info: dict[str, Any]) -> str:
    hp = info["hparams"]
    tok = info["tokenizer"]
    est = info["vram_estimate"]
    lines = [
        f"file:          {info['path']} "
        f"({info['file_size']:,} bytes, GGUF v{info['gguf_version']})",
        f"architecture:  {info['architecture']}",
        f"name:          {info['name']}",
        f"quant kind:    {info['quant_kind']}",
        f"tokenizer:     {tok['kind']} (model {tok['model']}, pre {tok['pre']}), "
        f"vocab {tok['vocab_size']:,}",
        "hyperparameters:",
    ]
    for key, value in hp.items():
        if key == "rope":
            rope = ", ".join(f"{k}={v}" for k, v in value.items())
            lines.append(f"  {key:<16} {rope}")
        else:
            lines.append(f"  {key:<16} {value}")
    t = info["tensors"]
    lines.append(f"tensors:       {t['count']} ({t['bytes']:,} bytes, {_mib(t['bytes'])})")
    for name, row in t["by_type"].items():
        lines.append(f"  {name:<8} {row['count']:>5} tensors {row['bytes']:>16,} bytes")
    lines += [
        f"VRAM estimate at ctx {est['ctx_size']:,}:",
        f"  weights        {est['weights_bytes']:>16,} bytes ({_mib(est['weights_bytes'])})",
        f"  KV cache FP16  {est['kv_cache_bytes']:>16,} bytes ({_mib(est['kv_cache_bytes'])})",
        f"  scratch        {est['scratch_bytes']:>16,} bytes ({_mib(est['scratch_bytes'])})",
        f"  total          {est['total_bytes']:>16,} bytes ({_mib(est['total_bytes'])})",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from worker.errors import WorkerError

    try:
        info = describe(model_path(args.parser, args), args.ctx_size)
    except WorkerError as exc:
        return fail(args, str(exc))
    if args.json:
        print(json.dumps(info))
    else:
        print(format_text(info))
    return 0
