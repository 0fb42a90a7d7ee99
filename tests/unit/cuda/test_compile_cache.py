"""The kernel cache key (worker/backends/cuda/compile.py): headers are part of the key, and
a warm cache compiles nothing (no PyCUDA needed: nothing is compiled when all is cached)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from worker.backends.cuda import compile as kc


@pytest.fixture
def src_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    src = tmp_path / "cuda_src"
    src.mkdir()
    (src / "common.cuh").write_text("#define ONE 1\n")
    (src / "a.cu").write_text('#include "common.cuh"\n#include "common.cuh"\n#include <cstdint>\n')
    (src / "b.cu").write_text('#include "common.cuh"\nextern "C" __global__ void k() {}\n')
    monkeypatch.setattr(kc, "CUDA_SRC", src)
    monkeypatch.setenv("WORKER_ORCD_CACHE", str(tmp_path / "cache"))
    return src


def test_headers_are_inlined_once_and_system_headers_kept(src_tree: Path) -> None:
    text = kc.expand_includes(src_tree / "a.cu")
    assert text.count("#define ONE 1") == 1
    assert "#include <cstdint>" in text


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="the cache key names the nvcc version")
def test_a_header_change_changes_the_key(src_tree: Path) -> None:
    before = kc.cached_path("b", "sm_90")
    (src_tree / "common.cuh").write_text("#define ONE 2\n")
    after = kc.cached_path("b", "sm_90")
    assert before != after and before.parent == after.parent
    assert kc.cached_path("b", "sm_80") != after


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="the cache key names the nvcc version")
def test_warm_cache_compiles_nothing(src_tree: Path) -> None:
    for name in kc.module_names():
        p = kc.cached_path(name, "sm_90")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"cubin of {name}".encode())
    assert kc.module_names() == ["a", "b"]
    assert kc.prewarm("sm_90") == []
    assert kc.compile_cubin("b", "sm_90") == (b"cubin of b", False)
