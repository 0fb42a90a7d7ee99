"""`worker-orcd synth`: writes the file and prints a one-line summary; bad requests exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from worker.cli import main


def test_synth_command_writes_and_summarises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.gguf"
    rc = main(["synth", "--arch", "gpt-oss", "--size", "tiny", "--seed", "3", "--out", str(out)])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert "gpt-oss tiny mxfp4" in line and "41 tensors" in line
    assert "MXFP4:6/" in line and "Q8_0:10/" in line and "F32:25/" in line
    reader = gguf.GGUFReader(out)
    assert len(reader.tensors) == 41


def test_synth_command_overrides_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.gguf"
    rc = main([
        "synth", "--arch", "llama", "--size", "tiny", "--mix", "q6_k", "--layers", "3",
        "--vocab", "700", "--out", str(out), "--json",
    ])  # fmt: skip
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_vocab"] == 700 and report["mix"] == "q6_k" and report["size"] == "custom"
    assert report["file_bytes"] == out.stat().st_size
    reader = gguf.GGUFReader(out)
    assert reader.fields["llama.block_count"].contents() == 3
    assert {t.tensor_type.name for t in reader.tensors} == {"Q6_K", "F32"}


def test_synth_command_tied_output(tmp_path: Path) -> None:
    out = tmp_path / "t.gguf"
    assert (
        main(["synth", "--arch", "qwen2", "--size", "tiny", "--tied-output", "--out", str(out)])
        == 0
    )
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    out2 = tmp_path / "u.gguf"
    assert (
        main(["synth", "--arch", "llama", "--size", "tiny", "--no-tied-output", "--out", str(out2)])
        == 0
    )
    assert "output.weight" in {t.name for t in gguf.GGUFReader(out2).tensors}


def test_synth_command_rejects_impossible_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.gguf"
    rc = main(["synth", "--arch", "qwen2", "--size", "tiny", "--mix", "mxfp4", "--out", str(out)])
    assert rc == 2
    assert "gpt-oss only" in capsys.readouterr().err
    assert not out.exists()
