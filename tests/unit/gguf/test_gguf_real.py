"""The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file through the reader.

Known values below were read from the file with gguf-py's own GGUFReader (too slow to run
here: ~10-30 s on the CI machine) and from the model card: 24 layers, 896 wide, 14 query
and 2 KV heads, vocabulary 151936.
"""

from __future__ import annotations

import mmap
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest

from worker.gguf.hparams import load_hparams
from worker.gguf.reader import GGUFFile, open_gguf

T = gguf.GGMLQuantizationType

COUNT_BY_TYPE = {"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12}
BYTES_BY_TYPE = {
    "Q5_0": 266_742_784,
    "Q8_0": 146_105_344,
    "Q6_K": 42_900_480,
    "Q4_K": 29_417_472,
    "F32": 286_208,
}
# name: (type, ne, absolute offset, nbytes) as GGUFReader reports them
KNOWN_TENSORS = {
    "output.weight": (T.Q8_0, (896, 151936), 5_947_776, 144_643_072),
    "token_embd.weight": (T.Q5_0, (896, 151936), 150_590_848, 93_592_576),
    "blk.0.attn_k.weight": (T.Q5_0, (896, 128), 253_758_592, 78_848),
    "blk.0.ffn_down.weight": (T.Q6_K, (4864, 896), 244_187_008, 3_575_040),
    "blk.0.attn_norm.weight": (T.F32, (896,), 244_183_424, 3_584),
}


@pytest.fixture(scope="module")
def qwen(real_qwen: Path) -> GGUFFile:
    return open_gguf(real_qwen)


def test_header_and_metadata(qwen: GGUFFile, real_qwen: Path) -> None:
    assert qwen.version == 3
    assert qwen.architecture == "qwen2"
    assert qwen.file_size == real_qwen.stat().st_size == 491_400_064
    md = qwen.metadata
    assert md["qwen2.block_count"] == 24
    assert md["qwen2.embedding_length"] == 896
    assert md["qwen2.attention.head_count"] == 14
    assert md["qwen2.attention.head_count_kv"] == 2
    assert md["qwen2.context_length"] == 32768
    assert md["qwen2.feed_forward_length"] == 4864
    assert md["qwen2.rope.freq_base"] == 1e6
    assert md["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "qwen2"
    tokens = md["tokenizer.ggml.tokens"]
    assert len(tokens) == 151936 and all(isinstance(t, str) for t in tokens[:1000])
    assert tokens[151643] == "<|endoftext|>" and tokens[151645] == "<|im_end|>"
    assert md["tokenizer.ggml.eos_token_id"] == 151645
    assert len(md["tokenizer.ggml.merges"]) == 151387
    assert md["tokenizer.ggml.add_bos_token"] is False
    assert qwen.metadata_types["tokenizer.ggml.token_type"] == (
        gguf.GGUFValueType.ARRAY,
        gguf.GGUFValueType.INT32,
    )
    assert "{%- if tools %}" in md["tokenizer.chat_template"]


def test_hyperparameters(qwen: GGUFFile) -> None:
    hp = load_hparams(qwen)
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv) == (24, 896, 14, 2)
    assert (hp.head_dim, hp.n_ff, hp.n_vocab, hp.n_ctx_train) == (64, 4864, 151936, 32768)


def test_tensor_table(qwen: GGUFFile) -> None:
    assert len(qwen.tensors) == 291
    assert {t.ggml_type for t in qwen.tensors.values()} == {T.Q5_0, T.Q8_0, T.Q6_K, T.Q4_K, T.F32}
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for t in qwen.tensors.values():
        count[t.ggml_type.name] += 1
        size[t.ggml_type.name] += t.nbytes
    assert dict(count) == COUNT_BY_TYPE
    assert dict(size) == BYTES_BY_TYPE
    assert qwen.total_tensor_bytes() == sum(BYTES_BY_TYPE.values()) == 485_452_288
    for name, (gtype, ne, offset, nbytes) in KNOWN_TENSORS.items():
        t = qwen.tensors[name]
        assert (t.ggml_type, t.shape, t.offset, t.nbytes) == (gtype, ne, offset, nbytes), name
        assert t.np_shape == tuple(reversed(ne))
    assert list(qwen.tensors)[:2] == ["output.weight", "token_embd.weight"]  # file order
    assert qwen.data_offset == 5_947_776 and qwen.alignment == 32
    for i in range(24):
        for part in ("attn_q", "attn_k", "attn_v"):
            assert f"blk.{i}.{part}.bias" in qwen.tensors
    last = max(qwen.tensors.values(), key=lambda t: t.offset)
    assert last.offset + last.nbytes <= qwen.file_size


def test_raw_is_a_zero_copy_read_only_view(qwen: GGUFFile, real_qwen: Path) -> None:
    a = qwen.raw("blk.0.attn_norm.weight")
    b = qwen.raw("blk.0.attn_norm.weight")
    assert a.dtype == np.uint8 and a.shape == (3584,)
    assert not a.flags.writeable and not a.flags.owndata
    assert np.shares_memory(a, b)
    assert isinstance(a.base, memoryview) and isinstance(a.base.obj, mmap.mmap)
    with real_qwen.open("rb") as fh:
        fh.seek(KNOWN_TENSORS["blk.0.attn_norm.weight"][2])
        assert fh.read(3584) == a.tobytes()


def test_opening_reads_no_tensor_data(real_qwen: Path) -> None:
    """Opening maps the file: the process's peak RSS grows by the metadata's Python objects
    (vocabulary and merges), far less than the 463 MiB of tensor data. Measured in a fresh
    interpreter (ru_maxrss is a process-wide peak); tracemalloc is too slow for 300k
    strings."""
    code = (
        "import resource, sys\n"
        "from worker.gguf.reader import open_gguf\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "f = open_gguf(sys.argv[1])\n"
        "n = sum(t.nbytes for t in f.tensors.values())\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(after - before, n)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(real_qwen)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    grown_kib, tensor_bytes = int(out[0]), int(out[1])
    assert tensor_bytes == 485_452_288
    assert grown_kib * 1024 < 128 * 1024 * 1024, f"peak RSS grew by {grown_kib} KiB"


@pytest.mark.parametrize(
    "name",
    [
        "blk.0.attn_k.weight",  # Q5_0
        "blk.0.attn_v.weight",  # Q8_0
        "blk.0.ffn_down.weight",  # Q6_K
        "blk.11.ffn_down.weight",  # Q4_K
        "blk.0.attn_norm.weight",  # F32
        "blk.5.attn_q.bias",  # F32
    ],
)
def test_dequantize_real_tensors_like_gguf_py(qwen: GGUFFile, name: str) -> None:
    info = qwen.tensors[name]
    got = qwen.dequantize(name)
    assert got.shape == info.np_shape and got.dtype == np.float32
    rows = qwen.raw(name).reshape(*info.np_shape[:-1], -1)
    ref = np.asarray(gguf.quants.dequantize(rows, info.ggml_type), dtype=np.float32)
    np.testing.assert_array_equal(got, ref)
    assert np.all(np.isfinite(got))
    if len(info.shape) == 2:  # trained weights: small, centred, not degenerate
        assert 1e-3 < float(got.std()) < 1.0 and abs(float(got.mean())) < 0.05


def test_dequantize_embedding_rows_match_gguf_py(qwen: GGUFFile) -> None:
    """Rows of the Q5_0 token embedding from a raw slice equal the full dequantization's."""
    info = qwen.tensors["token_embd.weight"]
    row_bytes = info.nbytes // info.np_shape[0]
    raw = qwen.raw("token_embd.weight").reshape(info.np_shape[0], row_bytes)
    ids = [0, 151643, 151935]
    ref = np.asarray(gguf.quants.dequantize(raw[ids], T.Q5_0), dtype=np.float32)
    from worker.gguf.quants import dequantize

    got = dequantize(raw[ids], T.Q5_0).reshape(len(ids), 896)
    np.testing.assert_array_equal(got, ref)
