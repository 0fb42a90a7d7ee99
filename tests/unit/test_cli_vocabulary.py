"""The command line speaks one vocabulary, for people: every command has a description,
examples and its defaults in --help; the flags shared between commands parse alike; the
model is `--model` everywhere (and positional where the usage shows it); `--stop` repeats
without eating positionals; generate shows its load on a terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

from tools.synth import preset, write_synthetic
from worker.cli import build_parser

COMMANDS = ["serve", "submit", "cancel", "health", "generate", "inspect", "bench", "synth"]
WORKER_ORCD = str(Path(sys.executable).parent / "worker-orcd")


def help_of(*args: str) -> str:
    out = subprocess.run([WORKER_ORCD, *args, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_top_level_help_describes_the_product() -> None:
    text = help_of()
    assert "GGUF" in text and "NATS" in text and "GPU" in text
    assert "quick start" in text and "docs/" in text
    assert "register" not in text and "module" not in text  # not the code's layout
    for command in COMMANDS:
        assert f"    {command} " in text, command


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description_examples_and_defaults(command: str) -> None:
    text = help_of(command)
    _usage, _, rest = text.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert len(description.split()) >= 12, (command, description)  # says what it does
    assert "examples:\n  worker-orcd " + command in text
    assert "(default:" in text


@pytest.mark.parametrize("command", ["submit", "cancel", "health"])
def test_nats_clients_share_their_flags(command: str) -> None:
    extra = {"submit": ["hi"], "cancel": ["job-1"], "health": []}[command]
    base = build_parser().parse_args([command, *extra])
    assert base.nats_url == "nats://127.0.0.1:4222"
    # health's connect is bounded by its --timeout (2 s) unless given: None until it runs
    assert base.connect_timeout == (None if command == "health" else 5.0)
    assert base.subject_prefix == "orcd"
    args = build_parser().parse_args(
        [command, *extra, "--nats-url", "nats://h:1", "--nats-connect-timeout", "2"]
    )
    assert args.nats_url == "nats://h:1" and args.connect_timeout == 2.0


@pytest.mark.parametrize("command", ["submit", "cancel", "health", "gateway"])
def test_nats_url_comes_from_the_environment(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command that talks to NATS reads WORKER_ORCD_NATS_URL when --nats-url is absent
    (the parser reads it when built)."""
    extra = {"submit": ["hi"], "cancel": ["job-1"], "health": [], "gateway": []}[command]
    monkeypatch.setenv("WORKER_ORCD_NATS_URL", "nats://from-env:4333")
    assert build_parser().parse_args([command, *extra]).nats_url == "nats://from-env:4333"
    flag = build_parser().parse_args([command, *extra, "--nats-url", "nats://h:1"])
    assert flag.nats_url == "nats://h:1"


def test_serve_spells_the_same_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "--model", "m.gguf", "--connect-timeout", "3", "--ctx-size", "512"]
    )
    assert args.connect_timeout == 3.0 and args.ctx_size == 512
    assert "--nats-connect-timeout S" in help_of("serve")


def test_model_is_a_flag_everywhere_and_positional_where_shown() -> None:
    p = build_parser()
    for argv in (["generate", "m.gguf", "hi"], ["generate", "--model", "m.gguf", "hi"]):
        args = p.parse_args(argv)
        assert (args.model or args.model_pos) == Path("m.gguf") and args.prompt == "hi"
    for argv in (["inspect", "m.gguf"], ["inspect", "--model", "m.gguf"]):
        args = p.parse_args(argv)
        assert (args.model or args.model_pos) == Path("m.gguf")
    assert p.parse_args(["bench", "--model", "m.gguf"]).model == Path("m.gguf")
    assert p.parse_args(["serve", "--model", "m.gguf"]).model == Path("m.gguf")


def test_stop_repeats_and_leaves_the_positionals_alone() -> None:
    p = build_parser()
    args = p.parse_args(["generate", "--stop", "a", "--stop", "b c", "m.gguf", "hi"])
    assert args.stop == ["a", "b c"] and args.model_pos == Path("m.gguf") and args.prompt == "hi"
    args = p.parse_args(["submit", "--stop", "x", "--stop", "y", "hi"])
    assert args.stop == ["x", "y"] and args.prompt == "hi"


def test_ctx_size_means_the_context_everywhere() -> None:
    for command in ("serve", "generate", "inspect", "bench"):
        text = " ".join(help_of(command).split())
        assert "--ctx-size N context length in tokens" in text, command


def test_generate_shows_its_load_on_a_terminal(tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    write_synthetic(model, preset("qwen2", "tiny", seed=5))
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [WORKER_ORCD, "generate", "--device", "cpu", str(model), "hi", "--max-tokens", "3"],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        assert ready, seen
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(60) == 0
    text = seen.decode()
    assert "loading tiny.gguf: weights [" in text and "100%" in text
    assert "loaded tiny.gguf in " in text
    assert "generated 3 tokens" in text  # the summary still follows
