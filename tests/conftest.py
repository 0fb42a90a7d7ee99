"""Shared fixtures: the real Qwen2.5-Coder-0.5B Q4_K_M file and scratch directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.devdata import real_qwen_path


@pytest.fixture(scope="session")
def real_qwen() -> Path:
    """The genuine Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (491,400,064 bytes).

    Assembled from the data wheels that scripts/dev-setup.sh installs; a missing install is
    an error, not a skip, so CI can never pass without testing the real file.
    """
    return real_qwen_path()
