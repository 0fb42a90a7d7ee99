"""GGUF fuzzing of the whole load path (open_gguf -> hyperparameters -> tokenizer -> the CPU
backend and one forward step) on a real-layout tiny model (tools.synth, 2 MiB, real
tokenizer metadata): truncated at any length, bytes flipped in the header / metadata / tensor
table, absurd 64-bit counts, lengths, dimensions and offsets written anywhere in them.

Whatever the file: either it loads, or a ModelLoadError (MODEL_LOAD_FAILED, naming the
file) is raised - never another exception, a crash or a hang (each load is timed); parsing
never allocates more than the file's size (tracemalloc), and a load that fails allocates no
more than a successful load of the intact file does.

Sizes: ORCD_FUZZ_GGUF_EXAMPLES per property (default 150; nightly 5000)."""

from __future__ import annotations

import contextlib
import os
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.loader import load_model_blocking
from tools.synth import preset, write_synthetic
from worker.config import WorkerConfig
from worker.errors import ErrorCode, ModelLoadError, WorkerError
from worker.gguf.reader import open_gguf

EXAMPLES = int(os.environ.get("ORCD_FUZZ_GGUF_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("ORCD_FUZZ_RANDOM", "") == "",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ABSURD_U64 = (
    0,
    1,
    0xFF,
    0xFFFF_FFFF,
    0x1_0000_0000,
    2**31,
    2**40,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
)
SECONDS = 5.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int, int]:
    """(the file's bytes, the data section's offset, peak allocation of a good full load)."""
    path = tmp_path_factory.mktemp("gguf-fuzz") / "tiny.gguf"
    write_synthetic(path, preset("qwen2", "tiny", seed=7).scaled(n_ctx=512))
    data = path.read_bytes()
    with open_gguf(path) as gf:
        offset = gf.data_offset
    _, peak = load(path)
    return data, offset, peak


def load(path: Path) -> tuple[str, int]:
    """The worker's load path (actors/loader.py: open, validate, tokenizer, CPU backend,
    warm-up step); ('ok', peak bytes allocated)."""
    cfg = WorkerConfig(model=path, device="cpu", ctx_size=64)
    tracemalloc.start()
    try:
        model = load_model_blocking(cfg)
        model.backend.close()
        return "ok", tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def check(tmp_path: Path, name: str, data: bytes, good_peak: int) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    t0 = time.perf_counter()
    try:
        outcome, peak = load(path)
    except ModelLoadError as exc:
        assert exc.code is ErrorCode.MODEL_LOAD_FAILED and str(path) in str(exc)
        outcome, peak = "ModelLoadError", 0
    except WorkerError as exc:  # e.g. a hyperparameter the model cannot run with
        assert exc.code in (ErrorCode.MODEL_LOAD_FAILED, ErrorCode.INSUFFICIENT_VRAM), exc
        outcome, peak = exc.code.value, 0
    took = time.perf_counter() - t0
    assert took < SECONDS, f"{name}: {took:.1f} s"
    assert peak <= max(good_peak, len(data)) * 1.5, (name, peak, good_peak)
    return outcome


def test_truncated_anywhere(tmp_path: Path, model: tuple[bytes, int, int]) -> None:
    """Every cut in the first KiB (header, first metadata), every 61st through the rest of
    the metadata and tensor table (every one in a nightly run), a spread through the data."""
    data, offset, good_peak = model
    step = 1 if os.environ.get("ORCD_FUZZ_GGUF_EXAMPLES") else 61
    cuts = [*range(0, 1024), *range(1024, offset + 64, step), *range(offset + 64, len(data), 8191)]
    fails = sum(check(tmp_path, "cut.gguf", data[:n], good_peak) != "ok" for n in cuts)
    assert fails == len(cuts)  # nothing truncated loads


def parse_peak(path: Path) -> int:
    tracemalloc.start()
    try:
        with contextlib.suppress(ModelLoadError):
            open_gguf(path).close()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@FUZZ
@given(st.data())
def test_flipped_bytes_in_the_header(
    tmp_path: Path, model: tuple[bytes, int, int], data: st.DataObject
) -> None:
    raw, offset, good_peak = model
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, offset - 1))
        buf[pos] ^= data.draw(st.integers(1, 255))
    check(tmp_path, "flip.gguf", bytes(buf), good_peak)
    assert parse_peak(tmp_path / "flip.gguf") <= len(raw)


@FUZZ
@given(st.data())
def test_absurd_counts_and_lengths(
    tmp_path: Path, model: tuple[bytes, int, int], data: st.DataObject
) -> None:
    """64-bit values written over the header: they land on counts, string and array lengths,
    dimensions, offsets, types (the reader checks each against the bytes left)."""
    raw, offset, good_peak = model
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(8, offset - 8))
        value = data.draw(st.one_of(st.sampled_from(ABSURD_U64), st.integers(0, 2**64 - 1)))
        struct.pack_into("<Q", buf, pos, value)
    check(tmp_path, "absurd.gguf", bytes(buf), good_peak)
    assert parse_peak(tmp_path / "absurd.gguf") <= len(raw)


def test_the_intact_file_loads(tmp_path: Path, model: tuple[bytes, int, int]) -> None:
    raw, _, good_peak = model
    assert check(tmp_path, "ok.gguf", raw, good_peak) == "ok"
