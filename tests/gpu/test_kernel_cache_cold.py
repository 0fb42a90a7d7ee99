"""Cold start: the first cache miss compiles every cuda_src module through PyCUDA in
parallel; the next start compiles nothing and loads the same cubins."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.backends.cuda import compile as kc

pytestmark = pytest.mark.gpu


def test_cold_prewarm_then_warm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_ORCD_CACHE", str(tmp_path))
    monkeypatch.setattr(kc, "_prewarmed", set())
    cubin, compiled = kc.compile_cubin("elementwise", "sm_90")
    assert compiled and cubin
    names = kc.module_names()
    assert all(kc.cached_path(n, "sm_90").exists() for n in names)  # all, in one go
    assert kc.prewarm("sm_90") == []
    assert kc.compile_cubin("gemv", "sm_90")[1] is False
