"""`worker-orcd inspect` and the VRAM estimate / quant kind behind it, on the real file (as a
real subprocess) and on each synthetic architecture, against figures computed here from the
models' known shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from gguf_testfile import VT, T, Tensor, tiny_qwen2

from tools.synth import ARCHS, preset, write_synthetic
from worker.cli.inspect import describe
from worker.gguf.estimate import align_up, estimate_vram, quant_kind
from worker.gguf.reader import open_gguf

CLI = Path(sys.executable).parent / "worker-orcd"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "inspect", *args], capture_output=True, text=True, timeout=120, check=False
    )


# --- the real Qwen2.5-Coder-0.5B Q4_K_M ------------------------------------------------

QWEN_BY_TYPE = {
    "Q5_0": {"count": 133, "bytes": 266_742_784},
    "Q8_0": {"count": 13, "bytes": 146_105_344},
    "Q6_K": {"count": 12, "bytes": 42_900_480},
    "Q4_K": {"count": 12, "bytes": 29_417_472},
    "F32": {"count": 121, "bytes": 286_208},
}


def qwen_expected(ctx: int) -> dict[str, int]:
    n_layer, n_embd, n_head, n_kv, head_dim, n_ff, vocab = 24, 896, 14, 2, 64, 4864, 151936
    # Every tensor's size is already a multiple of 256: all row counts (128, 896, 4864,
    # 151936) are multiples of 128 and every row's byte length is even.
    weights = sum(v["bytes"] for v in QWEN_BY_TYPE.values())
    kv = 2 * n_layer * ctx * n_kv * head_dim * 2
    rows = min(512, ctx)
    per_row = 3 * n_embd + n_head * head_dim + 2 * n_kv * head_dim + 3 * n_ff
    partials = n_head * 16 * (head_dim + 2)
    scratch = (rows * (per_row + partials) + 2 * vocab) * 4
    return {
        "ctx_size": ctx,
        "weights_bytes": weights,
        "kv_cache_bytes": kv,
        "scratch_bytes": scratch,
        "total_bytes": weights + kv + scratch,
    }


def test_inspect_real_file_json(real_qwen: Path) -> None:
    proc = run_cli(str(real_qwen), "--json", "--ctx-size", "4096")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1  # one JSON object on one line
    info = json.loads(proc.stdout)
    assert info["architecture"] == "qwen2"
    assert info["name"] == "Qwen2.5 Coder 0.5B Instruct AWQ"
    assert info["file_size"] == 491_400_064 and info["gguf_version"] == 3
    hp = info["hparams"]
    assert (hp["n_layer"], hp["n_embd"], hp["n_head"], hp["n_head_kv"]) == (24, 896, 14, 2)
    assert (hp["head_dim"], hp["n_ff"], hp["n_vocab"], hp["n_ctx_train"]) == (
        64,
        4864,
        151936,
        32768,
    )
    assert hp["rope"]["theta"] == 1e6 and hp["rope"]["type"] == "neox"
    assert info["tokenizer"] == {
        "kind": "gguf-bpe",
        "model": "gpt2",
        "pre": "qwen2",
        "vocab_size": 151936,
        "has_chat_template": True,
    }
    assert info["tensors"]["count"] == 291
    assert info["tensors"]["bytes"] == 485_452_288
    assert info["tensors"]["by_type"] == QWEN_BY_TYPE
    assert list(info["tensors"]["by_type"]) == ["Q5_0", "Q8_0", "Q6_K", "Q4_K", "F32"]
    assert info["quant_kind"] == "Q4_K_M"
    assert info["vram_estimate"] == qwen_expected(4096)
    assert info["vram_estimate"]["kv_cache_bytes"] == 50_331_648  # 48 MiB


def test_inspect_real_file_text_default_ctx(real_qwen: Path) -> None:
    proc = run_cli(str(real_qwen))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    exp = qwen_expected(32768)
    assert exp["kv_cache_bytes"] == 402_653_184  # 384 MiB at the model's 32768
    for line in (
        "architecture:  qwen2",
        "quant kind:    Q4_K_M",
        "tokenizer:     gguf-bpe (model gpt2, pre qwen2), vocab 151,936",
        "tensors:       291 (485,452,288 bytes, 462.96 MiB)",
        "VRAM estimate at ctx 32,768:",
        f"KV cache FP16  {exp['kv_cache_bytes']:>16,} bytes (384.00 MiB)",
        f"total          {exp['total_bytes']:>16,} bytes",
    ):
        assert line in out, line
    assert "  n_head_kv        2" in out


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: d / "missing.gguf", "file not found"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d / "junk.gguf", b"not a model at all, just text\n"), "bad magic"),
        (
            lambda d: (
                tiny_qwen2().set("general.architecture", VT.STRING, "rwkv").write(d / "rwkv.gguf")
            ),
            "unsupported architecture 'rwkv' (supported: qwen2, phi3, gpt-oss, llama, gpt2)",
        ),
    ],
)
def test_inspect_bad_file_one_line_exit_1(tmp_path: Path, make: Any, problem: str) -> None:
    path = make(tmp_path)
    proc = run_cli(str(path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and problem in lines[0] and "MODEL_LOAD_FAILED" in lines[0]
    # --json: the error is a JSON object on stdout, like the report would be
    proc = run_cli(str(path), "--json")
    assert proc.returncode == 1 and proc.stderr == ""
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    error = json.loads(lines[0])["error"]
    assert str(path) in error and problem in error and "MODEL_LOAD_FAILED" in error


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_inspect_rejects_a_bad_ctx_size(tmp_path: Path) -> None:
    proc = run_cli(str(tiny_qwen2().write(tmp_path / "t.gguf")), "--ctx-size", "0")
    assert proc.returncode == 2 and "must be positive" in proc.stderr


# --- synthetic models of every architecture ---------------------------------------------


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


EXPECTED_KIND = {"q4_k_m": "Q4_K_M", "mxfp4": "MXFP4_MOE"}


@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_synthetic_architectures(synth_dir: Path, arch: str) -> None:
    spec = preset(arch, "tiny", seed=3)
    report = write_synthetic(synth_dir / f"{arch}.gguf", spec)
    ctx = 256
    info = describe(report.path, ctx)

    assert info["architecture"] == arch
    assert info["name"] == spec.name
    hp = info["hparams"]
    assert hp["n_layer"] == spec.n_layer and hp["n_embd"] == spec.n_embd
    assert hp["n_head"] == spec.n_head and hp["n_head_kv"] == spec.n_head_kv
    assert hp["head_dim"] == spec.head_dim and hp["n_ctx_train"] == spec.n_ctx
    assert hp["n_vocab"] == spec.n_vocab == info["tokenizer"]["vocab_size"] == report.n_vocab
    assert info["tokenizer"]["kind"] == "gguf-bpe"
    if arch == "gpt-oss":
        assert (hp["n_expert"], hp["n_expert_used"], hp["n_ff_exp"]) == (4, 2, 288)
        assert hp["sliding_window"] == 16 and hp["swa_layers"] == 1 and hp["has_sinks"]
    else:
        assert hp["n_ff"] == spec.n_ff and hp["n_expert"] == 0
    assert hp["tied_embeddings"] == spec.tied_output
    assert hp["learned_pos"] == (arch == "gpt2")

    t = info["tensors"]
    assert t["count"] == report.n_tensors
    assert t["bytes"] == report.tensor_bytes
    assert {k: v["bytes"] for k, v in t["by_type"].items()} == report.bytes_by_type
    assert {k: v["count"] for k, v in t["by_type"].items()} == report.count_by_type
    assert info["quant_kind"] == EXPECTED_KIND[spec.mix]

    est = info["vram_estimate"]
    assert est["ctx_size"] == ctx
    assert est["weights_bytes"] == sum(-(-p.nbytes // 256) * 256 for p in report.tensors)
    assert est["kv_cache_bytes"] == 2 * spec.n_layer * ctx * spec.n_head_kv * spec.head_dim * 2
    assert est["total_bytes"] == est["weights_bytes"] + est["kv_cache_bytes"] + est["scratch_bytes"]
    assert 0 < est["scratch_bytes"] < est["weights_bytes"] + est["kv_cache_bytes"] * 100


def test_inspect_synthetic_gpt_oss_subprocess(synth_dir: Path) -> None:
    spec = preset("gpt-oss", "tiny", seed=4)
    report = write_synthetic(synth_dir / "oss-cli.gguf", spec)
    proc = run_cli(str(report.path), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["quant_kind"] == "MXFP4_MOE"
    assert info["tensors"]["by_type"]["MXFP4"]["count"] == report.count_by_type["MXFP4"]
    # default ctx: the model's own context length, every layer sized full (an upper bound
    # for the sliding-window layers)
    assert info["vram_estimate"]["ctx_size"] == spec.n_ctx
    assert info["vram_estimate"]["kv_cache_bytes"] == (
        2 * spec.n_layer * spec.n_ctx * spec.n_head_kv * spec.head_dim * 2
    )


@pytest.mark.parametrize(
    ("mix", "kind"), [("q4_0", "Q4_0"), ("f32", "F32"), ("q8_0", "Q8_0"), ("q4_k", "Q4_K_S")]
)
def test_quant_kind_of_single_type_mixes(synth_dir: Path, mix: str, kind: str) -> None:
    report = write_synthetic(synth_dir / f"llama-{mix}.gguf", preset("llama", "tiny", mix=mix))
    with open_gguf(report.path) as f:
        assert quant_kind(f) == kind


# --- quant kind fallback and estimate edges ---------------------------------------------


def test_quant_kind_falls_back_to_the_biggest_weight_type(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.tensors = [
        Tensor("token_embd.weight", (64, 8), T.Q8_0),  # 544 bytes
        Tensor("blk.0.ffn_up.weight", (64, 16), T.Q4_0),  # 576 bytes: the most
        Tensor("output_norm.weight", (256,), T.F32),  # 1 KiB, but a vector
    ]
    with open_gguf(g.write(tmp_path / "a.gguf")) as f:
        assert quant_kind(f) == "Q4_0"
    g.set("general.file_type", VT.UINT32, 1024)  # LLAMA_FTYPE_GUESSED: not a label
    with open_gguf(g.write(tmp_path / "b.gguf")) as f:
        assert quant_kind(f) == "Q4_0"
    g.set("general.file_type", VT.UINT32, 7)
    with open_gguf(g.write(tmp_path / "c.gguf")) as f:
        assert quant_kind(f) == "Q8_0"


def test_estimate_edges(tmp_path: Path) -> None:
    assert [align_up(n) for n in (0, 1, 256, 257)] == [0, 256, 256, 512]
    with open_gguf(tiny_qwen2().write(tmp_path / "t.gguf")) as f:
        est = estimate_vram(f)
        assert est.ctx_size == 128  # the model's context_length
        # 544-byte Q8_0 embedding -> 768, 256-byte norm -> 256
        assert est.weights_bytes == 768 + 256
        # 1 layer, 2 KV heads of 64/4 = 16 dims
        assert est.kv_cache_bytes == 2 * 1 * 128 * 2 * 16 * 2
        with pytest.raises(ValueError, match="context size must be positive"):
            estimate_vram(f, 0)
