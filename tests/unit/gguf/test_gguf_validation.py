"""Every way a model file can be wrong fails with a ModelLoadError that names the file and
the problem, before anything large is allocated (checked with tracemalloc)."""

from __future__ import annotations

import os
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_testfile import VT, GGUFBytes, T, Tensor, tiny_qwen2

from worker.errors import ErrorCode, ModelLoadError
from worker.gguf.hparams import required_keys
from worker.gguf.reader import SUPPORTED_ARCHITECTURES, open_gguf

# Parsing a tiny file takes a few KiB; anything near this means something was allocated
# from a corrupt count or length.
ALLOC_LIMIT = 512 * 1024


def load_fails(path: Path, *problem_parts: str) -> ModelLoadError:
    """open_gguf(path) must raise ModelLoadError whose message names the file and contains
    every part of `problem_parts`, with a tracemalloc peak under ALLOC_LIMIT."""
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError) as info:
            open_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    err = info.value
    assert err.code == ErrorCode.MODEL_LOAD_FAILED
    assert err.retriable is False
    assert str(path) in str(err)
    for part in problem_parts:
        assert part in err.problem, f"{part!r} not in {err.problem!r}"
    assert peak < ALLOC_LIMIT, f"peak allocation {peak} bytes while failing: {err.problem}"
    return err


def test_builder_writes_a_valid_file(tmp_path: Path) -> None:
    path = tiny_qwen2().write(tmp_path / "ok.gguf")
    with open_gguf(path) as f:
        assert f.architecture == "qwen2"
        assert list(f.tensors) == ["token_embd.weight", "output_norm.weight"]
        assert f.metadata["tokenizer.ggml.tokens"][:2] == ["t0", "t1"]
        assert f.dequantize("token_embd.weight").shape == (8, 64)
    # and gguf-py agrees that it is well formed
    r = gguf.GGUFReader(path)
    assert [t.name for t in r.tensors] == ["token_embd.weight", "output_norm.weight"]
    assert r.tensors[0].data_offset == f.tensors["token_embd.weight"].offset


# --- the file itself -------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    load_fails(tmp_path / "nope.gguf", "file not found")


def test_directory(tmp_path: Path) -> None:
    load_fails(tmp_path, "is a directory")


def test_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    load_fails(fifo, "not a regular file")


@pytest.mark.parametrize("size", [0, 3, 23])
def test_file_too_small(tmp_path: Path, size: int) -> None:
    path = tmp_path / "small.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00"[:size] + b"\0" * max(0, size - 8))
    load_fails(path, "file too small", f"{size} bytes")


def test_bad_magic(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.magic = b"GGML"
    load_fails(g.write(tmp_path / "m.gguf"), "bad magic", "b'GGML'")


@pytest.mark.parametrize("version", [1, 2, 4, 0xFFFFFFFF])
def test_unsupported_version(tmp_path: Path, version: int) -> None:
    g = tiny_qwen2()
    g.version = version
    load_fails(g.write(tmp_path / "v.gguf"), f"unsupported GGUF version {version}")


def test_big_endian_file(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.version = 3 << 24  # how a big-endian writer's version field reads little-endian
    load_fails(g.write(tmp_path / "be.gguf"), "big-endian")


@pytest.mark.parametrize("count", [10_000, 2**40, 2**64 - 1])
def test_tensor_count_too_large(tmp_path: Path, count: int) -> None:
    g = tiny_qwen2()
    g.tensor_count = count
    load_fails(g.write(tmp_path / "tc.gguf"), f"tensor count {count}", "< 10000")


def test_tensor_count_larger_than_the_file_holds(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.tensor_count = 9_999
    load_fails(g.write(tmp_path / "tc.gguf"), "tensor count 9999 is impossible")


@pytest.mark.parametrize("count", [10**6, 2**62])
def test_absurd_metadata_count(tmp_path: Path, count: int) -> None:
    g = tiny_qwen2()
    g.kv_count = count
    load_fails(g.write(tmp_path / "kv.gguf"), f"metadata count {count}")


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_truncated_header(tmp_path: Path, keep: float) -> None:
    """Cut anywhere in the metadata or the tensor table: a clear error, no big allocation."""
    g = tiny_qwen2()
    data = g.to_bytes()
    table_end = len(data) - 544 - 256 - 0  # the two tensors' data
    cut = int(table_end * keep) - (1 if keep == 1.0 else 0)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    err = load_fails(path)
    assert "corrupt header" in err.problem or "outside the file" in err.problem, err.problem


def test_truncated_tensor_data(tmp_path: Path) -> None:
    data = tiny_qwen2().to_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:-100])
    load_fails(path, "tensor 'output_norm.weight' data lies outside the file")


# --- metadata ---------------------------------------------------------------------------


def test_huge_key_length(tmp_path: Path) -> None:
    g = tiny_qwen2()
    header = g.header()
    # overwrite the first key's u64 length (right after the 24-byte header)
    data = bytearray(g.to_bytes())
    data[24:32] = struct.pack("<Q", 2**62)
    assert header[24:32] != data[24:32]
    path = tmp_path / "key.gguf"
    path.write_bytes(bytes(data))
    load_fails(path, "metadata key 0", "4611686018427387904")


def test_huge_string_value_length(tmp_path: Path) -> None:
    g = tiny_qwen2()
    # a raw value: u64 length claiming 2**40 bytes followed by 3 bytes
    g.set("general.name", VT.STRING, b"abc")
    data = g.to_bytes()
    marker = struct.pack("<Q", 3) + b"abc"
    i = data.index(marker)
    path = tmp_path / "str.gguf"
    path.write_bytes(data[:i] + struct.pack("<Q", 2**40) + data[i + 8 :])
    load_fails(path, "metadata 'general.name'", "claims 1099511627776 bytes")


@pytest.mark.parametrize("claimed", [2**40, 10**7, 2**64 - 1])
def test_huge_array_count(tmp_path: Path, claimed: int) -> None:
    g = tiny_qwen2()
    g.set("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, ["a", "b"], claimed))
    load_fails(g.write(tmp_path / "arr.gguf"), "tokenizer.ggml.tokens", f"claims {claimed}")


def test_huge_numeric_array_count(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.set("tokenizer.ggml.token_type", VT.ARRAY, (VT.INT32, [1, 1], 2**33))
    load_fails(g.write(tmp_path / "arr.gguf"), "tokenizer.ggml.token_type", "INT32")


def test_huge_string_inside_array(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.set("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, ["zz"] * 8))
    data = g.to_bytes()
    i = data.index(struct.pack("<Q", 2) + b"zz")
    path = tmp_path / "arrstr.gguf"
    path.write_bytes(data[:i] + struct.pack("<Q", 2**50) + data[i + 8 :])
    load_fails(path, "'tokenizer.ggml.tokens'[0]", "claims 1125899906842624 bytes")


def test_unknown_value_type(tmp_path: Path) -> None:
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    header += struct.pack("<Q", 9) + b"weird.key" + struct.pack("<I", 13) + b"\0" * 16
    path = tmp_path / "vt.gguf"
    path.write_bytes(header)
    load_fails(path, "metadata 'weird.key'", "unknown value type 13")


def test_unknown_array_element_type(tmp_path: Path) -> None:
    g = tiny_qwen2().set("x.arr", VT.ARRAY, (77, []))
    load_fails(g.write(tmp_path / "vt.gguf"), "metadata 'x.arr' element", "unknown value type 77")


def test_duplicate_metadata_key(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.kv.append(("qwen2.block_count", VT.UINT32, 2))
    load_fails(g.write(tmp_path / "dup.gguf"), "duplicate metadata key 'qwen2.block_count'")


def test_missing_architecture(tmp_path: Path) -> None:
    g = tiny_qwen2().drop("general.architecture")
    load_fails(g.write(tmp_path / "a.gguf"), "'general.architecture' is missing")


def test_architecture_not_a_string(tmp_path: Path) -> None:
    g = tiny_qwen2().set("general.architecture", VT.UINT32, 7)
    load_fails(g.write(tmp_path / "a.gguf"), "general.architecture must be a string")


def test_unsupported_architecture(tmp_path: Path) -> None:
    g = tiny_qwen2().set("general.architecture", VT.STRING, "mamba")
    err = load_fails(g.write(tmp_path / "a.gguf"), "unsupported architecture 'mamba'")
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in err.problem


def test_architecture_outside_the_callers_list(tmp_path: Path) -> None:
    path = tiny_qwen2().write(tmp_path / "a.gguf")
    with pytest.raises(
        ModelLoadError, match=r"unsupported architecture 'qwen2' \(supported: llama"
    ):
        open_gguf(path, supported_architectures=("llama",))


@pytest.mark.parametrize(
    "key",
    [
        "qwen2.block_count",
        "qwen2.embedding_length",
        "qwen2.attention.head_count",
        "qwen2.context_length",
        "qwen2.feed_forward_length",
        "qwen2.attention.layer_norm_rms_epsilon",
    ],
)
def test_missing_required_key(tmp_path: Path, key: str) -> None:
    g = tiny_qwen2().drop(key)
    load_fails(g.write(tmp_path / "k.gguf"), f"required metadata key '{key}' is missing")


@pytest.mark.parametrize(
    ("vtype", "value"), [(VT.STRING, "24"), (VT.INT32, 0), (VT.INT32, -3), (VT.FLOAT32, 2.0)]
)
def test_required_key_of_the_wrong_kind(tmp_path: Path, vtype: int, value: object) -> None:
    g = tiny_qwen2().set("qwen2.block_count", vtype, value)
    load_fails(g.write(tmp_path / "k.gguf"), "'qwen2.block_count' must be a positive integer")


def test_inconsistent_hyperparameters(tmp_path: Path) -> None:
    g = tiny_qwen2().set("qwen2.attention.head_count_kv", VT.UINT32, 3)
    load_fails(g.write(tmp_path / "h.gguf"), "head_count 4 not a multiple of head_count_kv 3")


def _complete(arch: str) -> GGUFBytes:
    """Every key hparams.required_keys(arch) names, with workable values."""
    g = GGUFBytes()
    for key in required_keys(arch):
        if key == "general.architecture":
            g.set(key, VT.STRING, arch)
        elif key.endswith("epsilon"):
            g.set(key, VT.FLOAT32, 1e-5)
        elif key.endswith("expert_used_count"):
            g.set(key, VT.UINT32, 2)
        elif key.endswith("expert_count"):
            g.set(key, VT.UINT32, 4)
        else:
            g.set(key, VT.UINT32, 64)
    g.set("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, ["a", "b", "c"]))
    g.tensors = [Tensor("output_norm.weight", (64,), T.F32)]
    return g


@pytest.mark.parametrize(
    ("arch", "key"),
    [(a, k) for a in SUPPORTED_ARCHITECTURES for k in required_keys(a)[1:]],
)
def test_required_keys_follow_the_architecture(tmp_path: Path, arch: str, key: str) -> None:
    with open_gguf(_complete(arch).write(tmp_path / "ok.gguf")) as f:
        assert f.architecture == arch
    g = _complete(arch).drop(key)
    load_fails(g.write(tmp_path / "r.gguf"), f"required metadata key '{key}' is missing")


def test_bad_alignment(tmp_path: Path) -> None:
    g = tiny_qwen2().set("general.alignment", VT.UINT32, 48)
    load_fails(g.write(tmp_path / "al.gguf"), "general.alignment 48 is not a power of two")


# --- tensor table -----------------------------------------------------------------------


def test_unknown_tensor_type(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.tensors[1] = Tensor("output_norm.weight", (64,), 99, data=b"\0" * 256)
    load_fails(g.write(tmp_path / "t.gguf"), "'output_norm.weight'", "unknown tensor type 99")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.tensors[0] = Tensor("token_embd.weight", (256, 8), T.Q2_K)
    err = load_fails(g.write(tmp_path / "t.gguf"), "unsupported tensor type Q2_K")
    assert "Q4_K" in err.problem and "MXFP4" in err.problem


def test_row_not_a_multiple_of_the_block(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.tensors[0] = Tensor("token_embd.weight", (48, 8), T.Q8_0, data=b"\0" * 34 * 12)
    load_fails(
        g.write(tmp_path / "t.gguf"),
        "shape/type mismatch",
        "'token_embd.weight' of type Q8_0",
        "ne[0]=48",
        "block size 32",
    )


def test_k_quant_row_not_a_multiple_of_256(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.tensors[0] = Tensor("token_embd.weight", (64, 8), T.Q4_K, data=b"\0" * 144 * 2)
    load_fails(g.write(tmp_path / "t.gguf"), "shape/type mismatch", "block size 256")


def test_too_many_dimensions(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.n_dims_override["output_norm.weight"] = 5
    load_fails(g.write(tmp_path / "t.gguf"), "'output_norm.weight' has 5 dimensions")


def test_empty_dimension(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.tensors[1] = Tensor("output_norm.weight", (0,), T.F32, data=b"")
    load_fails(g.write(tmp_path / "t.gguf"), "'output_norm.weight' has an empty dimension")


def test_tensor_name_too_long(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.tensors[1] = Tensor("x" * 64, (64,), T.F32)
    load_fails(g.write(tmp_path / "t.gguf"), "tensor 1 name is 64 bytes long")


def test_duplicate_tensor_name(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.tensors.append(Tensor("output_norm.weight", (64,), T.F32))
    load_fails(g.write(tmp_path / "t.gguf"), "duplicate tensor name 'output_norm.weight'")


@pytest.mark.parametrize("ne", [(2**40, 2**20), (2**63, 2**63, 2**63, 2**63)])
def test_huge_shape_is_outside_the_file(tmp_path: Path, ne: tuple[int, ...]) -> None:
    g = tiny_qwen2()
    g.tensors[1] = Tensor("output_norm.weight", ne, T.F32, offset=288)
    load_fails(g.write(tmp_path / "t.gguf"), "'output_norm.weight' data lies outside the file")


def test_offset_past_the_end(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.tensors[1].offset = 2**60
    load_fails(g.write(tmp_path / "t.gguf"), "'output_norm.weight' data lies outside the file")


def test_misaligned_offset(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.tensors[1].offset = 36 * 8 + 4
    load_fails(g.write(tmp_path / "t.gguf"), "offset 292 is not aligned to 32 bytes")


def test_overlapping_tensors(tmp_path: Path) -> None:
    g = tiny_qwen2()
    g.tensors[1].offset = 0  # inside token_embd.weight's 272 bytes
    load_fails(
        g.write(tmp_path / "t.gguf"),
        "tensor data overlap",
        "'output_norm.weight'",
        "inside 'token_embd.weight'",
    )


def test_failures_close_the_mapping(tmp_path: Path) -> None:
    """A failed open leaves no mapping behind (the file can be replaced and reopened)."""
    g = tiny_qwen2()
    g.tensors[1].offset = 0
    path = g.write(tmp_path / "t.gguf")
    for _ in range(50):
        with pytest.raises(ModelLoadError):
            open_gguf(path)
    maps = Path("/proc/self/maps").read_text()
    assert str(path) not in maps


def test_closed_file_refuses_raw(tmp_path: Path) -> None:
    path = tiny_qwen2().write(tmp_path / "ok.gguf")
    f = open_gguf(path)
    view = f.raw("output_norm.weight")
    f.close()
    assert f.closed
    # a view taken before close stays valid; new ones are refused
    assert np.frombuffer(view.tobytes(), np.float32).shape == (64,)
    with pytest.raises(ValueError, match="closed"):
        f.raw("output_norm.weight")
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        f.raw("nope")
