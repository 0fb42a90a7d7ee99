"""Synthetic models in every architecture and quant mix (tools/synth.py, the real layouts)
read back through open_gguf: the tensor table matches what was written, and every tensor
dequantizes exactly as gguf-py's reference does."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from tools.synth import ARCHS, preset, write_synthetic
from worker.gguf.reader import open_gguf

CASES = [(arch, None) for arch in ARCHS] + [
    ("llama", "q4_1"),
    ("llama", "q5_1"),
    ("llama", "q5_k"),
    ("llama", "q6_k"),
    ("phi3", "bf16"),
    ("gpt2", "f16"),
    ("qwen2", "q4_0"),
    ("gpt-oss", "q4_k_m"),
]


@pytest.mark.parametrize(("arch", "mix"), CASES, ids=[f"{a}-{m or 'default'}" for a, m in CASES])
def test_synthetic_model_reads_back(tmp_path: Path, arch: str, mix: str | None) -> None:
    spec = preset(arch, "tiny", mix=mix, seed=11)
    report = write_synthetic(tmp_path / "m.gguf", spec)
    with open_gguf(report.path) as f:
        assert f.architecture == arch
        assert [t.name for t in report.tensors] == list(f.tensors)
        for planned in report.tensors:
            info = f.tensors[planned.name]
            assert info.shape == planned.shape and info.ggml_type == planned.qtype
            assert info.nbytes == planned.nbytes and info.offset % f.alignment == 0
            got = f.dequantize(planned.name)
            rows = f.raw(planned.name).reshape(*info.np_shape[:-1], -1)
            ref = np.asarray(gguf.quants.dequantize(rows, info.ggml_type), dtype=np.float32)
            np.testing.assert_array_equal(got, ref, err_msg=planned.name)
            assert np.all(np.isfinite(got)), planned.name
