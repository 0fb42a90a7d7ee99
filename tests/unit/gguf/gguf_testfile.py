"""A byte-level GGUF v3 builder for tests: valid tiny files, and every field open to
corruption (counts, lengths, types, offsets) without going through a library writer."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

VT = GGUFValueType
T = GGMLQuantizationType

_FMT = {
    VT.UINT8: "<B",
    VT.INT8: "<b",
    VT.UINT16: "<H",
    VT.INT16: "<h",
    VT.UINT32: "<I",
    VT.INT32: "<i",
    VT.FLOAT32: "<f",
    VT.BOOL: "<?",
    VT.UINT64: "<Q",
    VT.INT64: "<q",
    VT.FLOAT64: "<d",
}


def gguf_string(s: str | bytes, *, length: int | None = None) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def encode_value(vtype: int, value: Any) -> bytes:
    """A value of `vtype`; an ARRAY value is (element type, list[, claimed count])."""
    if vtype == VT.STRING:
        return gguf_string(value)
    if vtype == VT.ARRAY:
        etype, items, *claimed = value
        count = claimed[0] if claimed else len(items)
        body = b"".join(encode_value(etype, v) for v in items)
        return struct.pack("<IQ", etype, count) + body
    return struct.pack(_FMT[VT(vtype)], value)


@dataclass
class Tensor:
    name: str
    ne: tuple[int, ...]  # ggml order
    ggml_type: int
    data: bytes | None = None  # default: random bytes of the right size
    offset: int | None = None  # relative offset override (default: packed, aligned)


@dataclass
class GGUFBytes:
    kv: list[tuple[str, int, Any]] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    magic: bytes = b"GGUF"
    version: int = 3
    tensor_count: int | None = None
    kv_count: int | None = None
    alignment: int = 32
    n_dims_override: dict[str, int] = field(default_factory=dict)

    def set(self, key: str, vtype: int, value: Any) -> GGUFBytes:
        self.kv = [(k, t, v) for k, t, v in self.kv if k != key]
        self.kv.append((key, vtype, value))
        return self

    def drop(self, key: str) -> GGUFBytes:
        self.kv = [(k, t, v) for k, t, v in self.kv if k != key]
        return self

    def header(self) -> bytes:
        out = bytearray(self.magic)
        out += struct.pack("<I", self.version)
        out += struct.pack(
            "<Q", len(self.tensors) if self.tensor_count is None else self.tensor_count
        )
        out += struct.pack("<Q", len(self.kv) if self.kv_count is None else self.kv_count)
        for key, vtype, value in self.kv:
            out += gguf_string(key) + struct.pack("<I", vtype) + encode_value(vtype, value)
        return bytes(out)

    def _data_sizes(self) -> list[int]:
        sizes = []
        for t in self.tensors:
            if t.data is not None:
                sizes.append(len(t.data))
                continue
            bs, ts = GGML_QUANT_SIZES[T(t.ggml_type)]
            n = int(np.prod(t.ne))
            sizes.append(n // bs * ts)
        return sizes

    def to_bytes(self, *, seed: int = 0) -> bytes:
        rng = np.random.default_rng(seed)
        sizes = self._data_sizes()
        offsets: list[int] = []
        pos = 0
        for t, size in zip(self.tensors, sizes, strict=True):
            pos = -(-pos // self.alignment) * self.alignment
            offsets.append(pos if t.offset is None else t.offset)
            pos += size
        out = bytearray(self.header())
        for t, off in zip(self.tensors, offsets, strict=True):
            n_dims = self.n_dims_override.get(t.name, len(t.ne))
            out += gguf_string(t.name) + struct.pack("<I", n_dims)
            out += b"".join(struct.pack("<Q", d) for d in t.ne)
            out += struct.pack("<IQ", t.ggml_type, off)
        out += b"\0" * (-len(out) % self.alignment)
        data = bytearray()
        for t, size, off in zip(self.tensors, sizes, offsets, strict=True):
            if t.offset is not None:
                continue  # overridden offsets point wherever the test wants
            data += b"\0" * (off - len(data))
            payload = t.data
            if payload is None:
                payload = _sane_random(T(t.ggml_type), size, rng)
            data += payload
        return bytes(out + data)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.to_bytes())
        return path


def _sane_random(gtype: T, size: int, rng: np.random.Generator) -> bytes:
    if gtype == T.F32:
        return rng.standard_normal(size // 4).astype(np.float32).tobytes()
    if gtype == T.F16:
        return rng.standard_normal(size // 2).astype(np.float16).tobytes()
    raw = rng.integers(0, 256, size=size, dtype=np.uint8)
    if gtype in (T.Q4_0, T.Q8_0, T.Q5_0):
        ts = GGML_QUANT_SIZES[gtype][1]
        blocks = raw.reshape(-1, ts)
        d = (rng.random(blocks.shape[0]) * 0.01 + 0.001).astype(np.float16)
        blocks[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
    return raw.tobytes()


def tiny_qwen2(n_vocab: int = 8) -> GGUFBytes:
    """A minimal valid qwen2 file: the required metadata, a vocabulary, two tensors."""
    g = GGUFBytes()
    g.set("general.architecture", VT.STRING, "qwen2")
    g.set("general.name", VT.STRING, "tiny test")
    g.set("qwen2.context_length", VT.UINT32, 128)
    g.set("qwen2.embedding_length", VT.UINT32, 64)
    g.set("qwen2.block_count", VT.UINT32, 1)
    g.set("qwen2.feed_forward_length", VT.UINT32, 128)
    g.set("qwen2.attention.head_count", VT.UINT32, 4)
    g.set("qwen2.attention.head_count_kv", VT.UINT32, 2)
    g.set("qwen2.attention.layer_norm_rms_epsilon", VT.FLOAT32, 1e-6)
    g.set("tokenizer.ggml.model", VT.STRING, "gpt2")
    g.set("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, [f"t{i}" for i in range(n_vocab)]))
    g.set("tokenizer.ggml.token_type", VT.ARRAY, (VT.INT32, [1] * n_vocab))
    g.tensors = [
        Tensor("token_embd.weight", (64, n_vocab), T.Q8_0),
        Tensor("output_norm.weight", (64,), T.F32),
    ]
    return g
