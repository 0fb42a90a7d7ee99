"""The container files hold together: every path the Dockerfile copies exists and passes the
.dockerignore, the build context leaves out environments, caches and models, and compose.yaml
scales (`--scale worker=N`: no fixed GPU id, no fixed host port, no container name per
replica) with a command and healthcheck our own CLI parser accepts. `docker compose config`
validates the file too where the compose plugin is installed (it is not on every machine:
the checks above run everywhere)."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from worker.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
ENV = {"MODEL_DIR": "/srv/models", "MODEL_FILE": "model.gguf", "MODEL_REF": "qwen"}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return data


def interpolate(text: str) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message} with ENV."""

    def value(m: re.Match[str]) -> str:
        name, op, rest = m.group(1), m.group(2), m.group(3)
        if name in ENV:
            return ENV[name]
        assert op == ":-", f"${{{name}}} is required and unset"
        return rest or ""

    return re.sub(r"\$\{([A-Z_]+)(?:(:-|:\?)([^}]*))?\}", value, text)


def dockerfile_lines() -> list[str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def excluded(path: str, patterns: list[str]) -> bool:
    """The .dockerignore decision for a context-relative path: the last matching pattern
    wins, `!` re-includes, and a pattern also matches a path under what it names."""
    parts = path.split("/")
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pat = raw[1:] if negate else raw
        pat = pat.rstrip("/")
        depth = len(pat.split("/"))
        candidates = {path, *("/".join(parts[:k]) for k in range(1, len(parts)))}
        if "**" not in pat:
            candidates = {c for c in candidates if len(c.split("/")) == depth} | {
                "/".join(parts[:depth])
            }
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            result = not negate
    return result


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_dockerfile_copies_what_exists_and_the_context_admits() -> None:
    lines = dockerfile_lines()
    stages = [ln.split()[-1] for ln in lines if ln.startswith("FROM ")]
    assert stages == ["builder", "runtime"]
    patterns = dockerignore()
    copies = [ln for ln in lines if ln.startswith("COPY ") and "--from" not in ln]
    assert copies
    for line in copies:
        sources = shlex.split(line)[1:-1]
        for src in sources:
            assert (REPO / src).exists(), f"{line}: {src} does not exist"
            assert not excluded(src, patterns), f"{src} is left out by .dockerignore"
            if (REPO / src).is_dir():
                inner = next(p for p in (REPO / src).rglob("*") if p.is_file())
                rel = inner.relative_to(REPO).as_posix()
                assert "__pycache__" in rel or not excluded(rel, patterns), rel
    text = " ".join(lines)
    assert "pip wheel" in text and "'.[cuda]'" in text  # pycuda's wheel is built in the builder
    runtime = text[text.index("AS runtime") :]
    assert "python3-dev" not in runtime  # no build dependencies in the runtime stage
    assert "--no-index" in runtime  # only the builder's wheels are installed
    assert 'ENTRYPOINT ["worker-orcd"]' in runtime


def test_build_context_leaves_out_environments_caches_and_models() -> None:
    patterns = dockerignore()
    for path in (
        ".venv/bin/python",
        ".git/config",
        ".cache/x",
        ".mypy_cache/3.11/x.json",
        "worker/__pycache__/client.cpython-311.pyc",
        "models/qwen.gguf",
        "qwen.gguf",
        "tests/unit/test_protocol.py",
        "third_party/lcpp.tgz",
        "worker/backends/cuda/cuda_src/gemv.cu",  # a copy from an in-place build
    ):
        assert excluded(path, patterns), path
    for path in ("worker/cli/serve.py", "actors/supervisor.py", "cuda_src/gemv.cu", "setup.py"):
        assert not excluded(path, patterns), path


def test_compose_worker_scales() -> None:
    data = compose()
    services = data["services"]
    worker = services["worker"]
    # the default set; the others belong to the `cluster` profile
    assert {k for k, v in services.items() if "profiles" not in v} == {"nats", "worker", "gateway"}
    assert "ports" not in worker and "container_name" not in worker  # unique per replica
    assert worker["expose"] == ["9100"]
    (gpus,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert "device_ids" not in gpus and gpus["count"] == "all" and "gpu" in gpus["capabilities"]
    command = [interpolate(str(arg)) for arg in worker["command"]]
    assert "--gpu-device=auto" in command
    args = build_parser().parse_args(command)  # every flag is one serve knows
    assert args.command == "serve" and args.gpu_device == "auto"
    assert args.nats_url == "nats://nats:4222" and args.metrics_port == 9100
    # the lock directory the replicas share, and the kernel cache, are volumes
    mounts = {interpolate(v).split(":")[1] for v in worker["volumes"]}
    assert {"/var/lock/worker-orcd", "/var/cache/worker-orcd", "/models"} <= mounts
    for volume in worker["volumes"]:
        name = interpolate(volume).split(":")[0]
        assert name.startswith("/") or name in data["volumes"], name
    check = worker["healthcheck"]["test"]
    assert check[:2] == ["CMD", "worker-orcd"]
    health = build_parser().parse_args(check[2:])
    assert health.command == "health" and health.worker_id_file == "/tmp/worker-orcd.id"
    assert worker["environment"]["WORKER_ORCD_ID_FILE"] == health.worker_id_file
    build = worker["build"]
    assert (REPO / build["context"] / build["dockerfile"]).is_file()
    assert worker["stop_signal"] == "SIGTERM"
    grace = int(str(worker["stop_grace_period"]).rstrip("s"))
    assert grace > 30  # the worker exits within 30 s of SIGTERM


def test_docker_compose_config_where_available() -> None:
    try:
        version = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError:
        return  # no docker client at all: the structural checks above are the check
    if version.returncode != 0:
        return  # the client without the compose plugin (this CI machine): same
    out = subprocess.run(
        ["docker", "compose", "-f", str(REPO / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
    )
    assert out.returncode == 0, out.stderr
    assert "--gpu-device=auto" in out.stdout
