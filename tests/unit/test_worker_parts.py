"""Unit tests of the worker's own parts: the recent-job-id set behind cancel replies,
narration (JSON lines, prompt hashing), config precedence, metrics text."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.inference import _Recent
from worker.config import add_serve_arguments, config_from_args
from worker.metrics import WorkerMetrics
from worker.narration import TextDigest, narrate, setup_logging, text_fields


def test_recent_job_ids_expire_and_are_bounded() -> None:
    s = _Recent(max_items=3, ttl_s=10.0)
    assert s.add("a") and not s.add("a")
    for k in "bcd":
        s.add(k)
    assert "a" not in s and all(k in s for k in "bcd")  # oldest dropped at the bound
    short = _Recent(max_items=10, ttl_s=0.01)
    short.add("x")
    time.sleep(0.02)
    assert "x" not in short
    s.discard("b")
    assert "b" not in s


def test_narration_json_lines_and_prompt_privacy() -> None:
    out = io.StringIO()
    setup_logging("json", worker_id="w1", model_ref="m", gpu_device=0, stream=out)
    narrate("execute_start", "go", job_id="j1", **text_fields("prompt", "secret prompt"))
    rec = json.loads(out.getvalue().splitlines()[-1])
    assert (rec["event"], rec["worker_id"], rec["job_id"], rec["model_ref"]) == (
        "execute_start",
        "w1",
        "j1",
        "m",
    )
    assert rec["gpu_device"] == 0
    assert rec["prompt_sha256"] == hashlib.sha256(b"secret prompt").hexdigest()
    assert rec["prompt_chars"] == 13 and "secret prompt" not in out.getvalue()
    out2 = io.StringIO()
    setup_logging("json", worker_id="w1", log_prompts=True, stream=out2)
    narrate("execute_start", job_id="j2", **text_fields("prompt", "secret prompt"))
    assert json.loads(out2.getvalue().splitlines()[-1])["prompt"] == "secret prompt"
    out3 = io.StringIO()
    setup_logging("pretty", worker_id="w1", stream=out3)
    narrate("ready", "serving")
    assert "ready" in out3.getvalue() and not out3.getvalue().startswith("{")


def test_output_digest_describes_the_whole_text_from_its_pieces() -> None:
    """A job's output arrives token by token: the execute_end fields (SHA-256, length; the
    text only with --log-prompts) are those of the whole text, a lone surrogate included."""
    pieces = ["def", " fib", "(n", "):\n", " \u00e9\U0001f600", "\ud800"]
    whole = "".join(pieces)
    for log_prompts in (False, True):
        setup_logging("json", worker_id="w1", log_prompts=log_prompts, stream=io.StringIO())
        d = TextDigest()
        for p in pieces:
            d.add(p)
        assert d.fields("output") == text_fields("output", whole)
        assert ("output" in d.fields("output")) == log_prompts
    assert TextDigest().fields("output")["output_chars"] == 0


def test_config_flags_override_environment(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    env = {
        "WORKER_ORCD_MODEL": str(tmp_path / "Qwen2.5 0.5B.gguf"),
        "WORKER_ORCD_CTX_SIZE": "99",
        "WORKER_ORCD_DEVICE": "cpu",
    }
    cfg = config_from_args(p.parse_args(["--ctx-size", "128"]), env)
    assert cfg.ctx_size == 128 and cfg.device == "cpu" and cfg.model_ref == "qwen2-5-0-5b"
    cfg = config_from_args(p.parse_args([]), env)
    assert cfg.ctx_size == 99
    assert config_from_args(p.parse_args(["--model", "m.gguf"]), {}).device == "cuda"
    with pytest.raises(ValueError, match="model"):
        config_from_args(p.parse_args([]), {})
    with pytest.raises(ValueError, match="model ref"):
        config_from_args(p.parse_args(["--model", "m.gguf", "--model-ref", "a.b"]), {})
    with pytest.raises(ValueError, match="worker-id"):
        config_from_args(p.parse_args(["--model", "m.gguf", "--worker-id", "a.b"]), {})
    with pytest.raises(ValueError, match="max-tokens-out"):
        config_from_args(p.parse_args(["--model", "m.gguf", "--max-tokens-out", "5000"]), {})


def test_batch_invariance_is_on_unless_the_flag_or_the_environment_turns_it_off() -> None:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    m = ["--model", "m.gguf"]
    assert config_from_args(p.parse_args(m), {}).batch_invariant
    assert not config_from_args(p.parse_args([*m, "--no-batch-invariance"]), {}).batch_invariant
    for off in ("0", "false", "no"):
        env = {"WORKER_ORCD_BATCH_INVARIANT": off}
        assert not config_from_args(p.parse_args(m), env).batch_invariant
    assert config_from_args(p.parse_args(m), {"WORKER_ORCD_BATCH_INVARIANT": "1"}).batch_invariant
    # the loader hands the setting to the CUDA backend by this keyword (actors/loader.py)
    from worker.backends.cuda.backend import CudaBackend

    assert "batch_invariant" in inspect.signature(CudaBackend).parameters
    # callers that pass no setting (generate, the tools) read the variable as serve does
    for value, on in (("false", False), ("No", False), ("0", False), ("1", True), ("", True)):
        out = subprocess.run(
            [sys.executable, "-c", "from worker.backends.cuda.backend import BATCH_INVARIANT as b;"
             " print(b)"],
            env={**os.environ, "WORKER_ORCD_BATCH_INVARIANT": value},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert out.stdout.strip() == str(on), (value, out.stdout, out.stderr)


def test_metrics_text() -> None:
    m = WorkerMetrics("w", "r")
    m.outcome("ok")
    m.outcome("CANCELLED")
    m.tokens.inc(5)
    m.ttft.observe(0.01)
    text = m.render().decode()
    assert 'orcd_requests_total{outcome="ok"} 1.0' in text
    assert 'orcd_requests_total{outcome="CANCELLED"} 1.0' in text
    assert "orcd_tokens_generated_total 5.0" in text
    assert "orcd_time_to_first_token_seconds_bucket" in text
