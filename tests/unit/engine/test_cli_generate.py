"""`worker-orcd generate` end to end on a tiny synthetic model (CPU backend)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.synth import preset, write_synthetic
from worker.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny-qwen2.gguf"
    write_synthetic(path, preset("qwen2", "tiny"))
    return path


def test_generate_streams_text_and_summarises(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", str(tiny), "Hello world", "--device", "cpu", "--max-tokens", "12"]
    assert main([*argv, "--seed", "7", "--temperature", "0.8", "--top-k", "50"]) == 0
    first = capsys.readouterr()
    assert "generated" in first.err and "tok/s" in first.err and "seed 7" in first.err
    assert main([*argv, "--seed", "7", "--temperature", "0.8", "--top-k", "50"]) == 0
    second = capsys.readouterr()
    assert first.out == second.out  # same seed, same text
    assert main([*argv, "--chat", "--stop", "a", "--ctx-size", "64"]) == 0
    out = capsys.readouterr()
    assert "a" not in out.out
    assert "stop: " in out.err


def test_generate_rejects_bad_flags(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(tiny), "x", "--device", "cpu", "--temperature", "3"]) == 1
    assert "--temperature" in capsys.readouterr().err
    long_prompt = "word " * 200
    rc = main(["generate", str(tiny), long_prompt, "--device", "cpu", "--ctx-size", "16"])
    assert rc == 1
    assert "CONTEXT_LENGTH_EXCEEDED" in capsys.readouterr().err


def test_cuda_failure_is_an_error_never_a_cpu_fallback(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GPU 99 exists nowhere: without pycuda the import fails, with it the device does
    rc = main(["generate", str(tiny), "x", "--device", "cuda", "--gpu-device", "99"])
    assert rc == 1
    err = capsys.readouterr()
    assert "CUDA_ERROR" in err.err and "--device cpu" in err.err
    assert err.out.strip() == ""
