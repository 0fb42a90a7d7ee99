"""Unit tests of the worker's own parts: cancel registry and TTL set, backend thread,
narration (JSON lines, prompt hashing), config precedence, metrics text."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.backend_thread import BackendThread
from actors.cancellation import CancelRegistry, TtlSet
from worker.config import add_serve_arguments, config_from_args
from worker.metrics import WorkerMetrics
from worker.narration import narrate, setup_logging, text_fields


def test_ttl_set_expires_and_is_bounded() -> None:
    s = TtlSet(ttl_s=10.0, max_items=3)
    now = time.monotonic()
    assert s.add("a", now) and not s.add("a", now)
    for k in "bcd":
        s.add(k, now)
    assert len(s) == 3 and "a" not in s  # oldest dropped at the bound
    short = TtlSet(ttl_s=0.01, max_items=10)
    short.add("x")
    time.sleep(0.02)
    assert "x" not in short


def test_cancel_registry_states() -> None:
    reg = CancelRegistry()
    assert reg.cancel("q") == "recorded"
    assert reg.cancel("q") == "already_recorded"
    assert reg.take_pending("q")
    job = reg.begin("r")
    assert not job.cancel.is_set()
    assert reg.cancel("r") == "cancelling" and job.cancel.is_set()
    assert reg.cancel("r") == "already_cancelling"
    reg.end("r")
    assert reg.active is None and reg.cancel("r") == "already_finished"
    # a cancel that raced the job's start is applied when it begins
    assert reg.cancel("late") == "recorded"
    assert reg.begin("late").cancel.is_set()


async def test_backend_thread_runs_every_call_on_one_dedicated_thread() -> None:
    t = BackendThread()
    t.start()
    try:
        idents = await asyncio.gather(*(t.call(threading.get_ident) for _ in range(50)))
        assert len(set(idents)) == 1 and idents[0] != threading.get_ident()
        assert idents[0] == t.ident

        def boom() -> None:
            raise ValueError("bad")

        with pytest.raises(ValueError, match="bad"):
            await t.call(boom)
        assert await t.call(lambda: 7) == 7  # still alive after an exception
    finally:
        t.stop()


@pytest.fixture
def restore_loguru() -> Iterator[None]:
    yield
    from loguru import logger

    logger.remove()
    logger.configure(extra={})
    logger.add(sys.stderr)


@pytest.mark.usefixtures("restore_loguru")
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
