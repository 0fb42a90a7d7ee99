"""Memory-mapped GGUF (version 3) reader with validation before anything large is allocated.

The file is mapped read-only; the header, metadata and tensor table are parsed with explicit
bounds checks (every count and length is checked against the bytes left in the file before
anything is read or allocated), and tensor data are zero-copy views into the mapping. Every
problem with the file raises `ModelLoadError(path, problem)` (docs/design.md "Loading").

GGUF v3 layout (little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
kv_count x (string key, u32 value type, value), tensor_count x (string name, u32 n_dims,
u64 ne[n_dims], u32 ggml type, u64 offset), padding to `general.alignment` (default 32),
then the tensor data; each tensor's offset is relative to the start of the data section.
A string is a u64 byte length and UTF-8 bytes; an array is a u32 element type, a u64 count
and the elements.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType, GGUFValueType

from worker.errors import ModelLoadError
from worker.gguf import hparams, quants

SUPPORTED_ARCHITECTURES: Final[tuple[str, ...]] = ("qwen2", "phi3", "gpt-oss", "llama", "gpt2")

GGUF_MAGIC: Final = b"GGUF"
GGUF_VERSION: Final = 3
MAX_TENSORS: Final = 10_000  # a real model has hundreds; more is a corrupt count
MAX_DIMS: Final = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME: Final = 63  # GGML_MAX_NAME - 1 (llama.cpp rejects longer names)
MAX_KV: Final = 65_536
MAX_ARRAY_ELEMENTS: Final = 1 << 24  # o200k vocab + merges fit many times over
MAX_ARRAY_DEPTH: Final = 2
DEFAULT_ALIGNMENT: Final = 32
HEADER_SIZE: Final = 4 + 4 + 8 + 8

_SCALAR: Final[dict[GGUFValueType, tuple[str, int]]] = {
    GGUFValueType.UINT8: ("<B", 1),
    GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4),
    GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4),
    GGUFValueType.BOOL: ("<B", 1),
    GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
_NUMPY: Final[dict[GGUFValueType, str]] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
# Fewest bytes one value of each type can occupy (bounds element counts before reading).
_MIN_SIZE: Final[dict[GGUFValueType, int]] = {
    **{t: s for t, (_, s) in _SCALAR.items()},
    GGUFValueType.STRING: 8,
    GGUFValueType.ARRAY: 12,
}
_INT_TYPES: Final = frozenset(
    {
        GGUFValueType.UINT8,
        GGUFValueType.INT8,
        GGUFValueType.UINT16,
        GGUFValueType.INT16,
        GGUFValueType.UINT32,
        GGUFValueType.INT32,
        GGUFValueType.UINT64,
        GGUFValueType.INT64,
    }
)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. `shape` is in ggml order: ne[0] is the contiguous row."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the tensor's bytes
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def np_shape(self) -> tuple[int, ...]:
        """NumPy shape (reversed ne): a matrix of ne = (cols, rows) is (rows, cols)."""
        return tuple(reversed(self.shape))


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure is a ModelLoadError."""

    def __init__(self, path: Path, buf: memoryview, pos: int = 0) -> None:
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.pos = pos

    def fail(self, problem: str) -> ModelLoadError:
        return ModelLoadError(self.path, problem)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated or corrupt header: {what} needs {n} bytes at offset {self.pos}, "
                f"the file has {self.size - self.pos} left"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def string(self, what: str, *, max_len: int | None = None) -> str:
        n = self.u64(f"{what} length")
        if max_len is not None and n > max_len:
            raise self.fail(f"{what} is {n} bytes long (at most {max_len} allowed)")
        if n > self.size - self.pos:
            raise self.fail(
                f"corrupt header: {what} claims {n} bytes at offset {self.pos}, "
                f"the file has {self.size - self.pos} left"
            )
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        # surrogateescape keeps a non-UTF-8 token byte-exact instead of rejecting the file.
        return bytes(raw).decode("utf-8", errors="surrogateescape")

    def value_type(self, what: str) -> GGUFValueType:
        code = self.u32(f"{what} type")
        try:
            return GGUFValueType(code)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {code}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, depth)
        fmt, size = _SCALAR[vtype]
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return bool(v) if vtype == GGUFValueType.BOOL else v

    def array(self, what: str, depth: int) -> list[Any]:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
        etype = self.value_type(f"{what} element")
        count = self.u64(f"{what} element count")
        left = self.size - self.pos
        if count > MAX_ARRAY_ELEMENTS or count * _MIN_SIZE[etype] > left:
            raise self.fail(
                f"corrupt header: {what} claims {count} elements of {etype.name} "
                f"at offset {self.pos}, more than the {left} bytes left in the file can hold"
            )
        if etype in _NUMPY:
            size = _SCALAR[etype][1] * count
            arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos)
            self.pos += size
            values: list[Any] = arr.tolist()
            if etype == GGUFValueType.BOOL:
                values = [bool(v) for v in values]
            return values
        if etype == GGUFValueType.STRING:
            return self._strings(what, count)
        return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]

    def _strings(self, what: str, count: int) -> list[str]:
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"{what}[{i}] length")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                raise self.fail(
                    f"corrupt header: {what}[{i}] claims {n} bytes at offset {pos}, "
                    f"the file has {size - pos} left"
                )
            append(bytes(buf[pos : pos + n]).decode("utf-8", errors="surrogateescape"))
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """A validated, memory-mapped GGUF file. Use `open_gguf` to make one.

    `metadata` holds plain Python values (str, int, float, bool, lists of them);
    `metadata_types` the GGUF value type of each key (for arrays: ARRAY then element type).
    `tensors` is in file order. `raw(name)` is a read-only zero-copy uint8 view.
    """

    path: Path
    version: int
    architecture: str
    metadata: dict[str, Any]
    metadata_types: dict[str, tuple[GGUFValueType, ...]]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    file_size: int

    def __init__(
        self,
        path: Path,
        mm: mmap.mmap,
        *,
        version: int,
        architecture: str,
        metadata: dict[str, Any],
        metadata_types: dict[str, tuple[GGUFValueType, ...]],
        tensors: dict[str, TensorInfo],
        alignment: int,
        data_offset: int,
    ) -> None:
        self.path = path
        self._mm: mmap.mmap | None = mm
        self.version = version
        self.architecture = architecture
        self.metadata = metadata
        self.metadata_types = metadata_types
        self.tensors = tensors
        self.alignment = alignment
        self.data_offset = data_offset
        self.file_size = len(mm)

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, arch={self.architecture!r}, "
            f"tensors={len(self.tensors)}, closed={self._mm is None})"
        )

    def _tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> npt.NDArray[np.uint8]:
        """The tensor's bytes as a read-only uint8 view of the mapping (no copy)."""
        info = self._tensor(name)
        if self._mm is None:
            raise ValueError(f"{self.path}: file is closed")
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def dequantize(self, name: str) -> npt.NDArray[np.float32]:
        """The tensor as a new float32 array of shape `np_shape`."""
        info = self._tensor(name)
        flat = quants.dequantize(self.raw(name), info.ggml_type, info.n_elements)
        return flat.reshape(info.np_shape)

    def total_tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Unmap now, or, while views from `raw` are alive, when the last one goes away."""
        mm, self._mm = self._mm, None
        if mm is not None:
            # While views are exported, the mapping is released with the last of them.
            with contextlib.suppress(BufferError):
                mm.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _open_map(path: Path) -> mmap.mmap:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelLoadError(path, "file not found") from None
    except OSError as exc:
        raise ModelLoadError(path, f"cannot access file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelLoadError(path, "is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(path, "not a regular file")
    if st.st_size < HEADER_SIZE:
        raise ModelLoadError(
            path, f"file too small to be GGUF: {st.st_size} bytes (the header alone is 24)"
        )
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ModelLoadError(path, f"cannot open file: {exc.strerror or exc}") from None
    try:
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(path, f"cannot memory-map file: {exc}") from None
    finally:
        os.close(fd)


_FLOAT_TYPES: Final = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})


def _check_required(
    path: Path, md: dict[str, Any], types: dict[str, tuple[GGUFValueType, ...]], arch: str
) -> None:
    """The keys hparams.required_keys(arch) names: present, and numbers where numbers are
    meant (a per-layer array of them is allowed, as llama.cpp does)."""
    for key in hparams.required_keys(arch):
        if key not in md:
            raise ModelLoadError(path, f"required metadata key '{key}' is missing")
        if key == "general.architecture":
            continue
        vtypes = types[key]
        value = md[key]
        if vtypes[0] == GGUFValueType.ARRAY:
            vtype = vtypes[1] if len(vtypes) > 1 else GGUFValueType.ARRAY
            values = value
        else:
            vtype, values = vtypes[0], [value]
        is_eps = key.endswith("epsilon")
        ok_types = _FLOAT_TYPES | _INT_TYPES if is_eps else _INT_TYPES
        if vtype not in ok_types or not values or any(v <= 0 for v in values):
            what = "a positive number" if is_eps else "a positive integer"
            raise ModelLoadError(path, f"metadata key '{key}' must be {what}, found {value!r}")


def _check_architecture(
    path: Path,
    md: dict[str, Any],
    types: dict[str, tuple[GGUFValueType, ...]],
    supported: Iterable[str],
) -> str:
    supported = tuple(supported)
    if "general.architecture" not in md:
        raise ModelLoadError(path, "required metadata key 'general.architecture' is missing")
    arch = md["general.architecture"]
    if not isinstance(arch, str):
        raise ModelLoadError(path, f"general.architecture must be a string, found {arch!r}")
    if arch not in supported or arch not in hparams.SUPPORTED_ARCHS:
        raise ModelLoadError(
            path, f"unsupported architecture '{arch}' (supported: {', '.join(supported)})"
        )
    _check_required(path, md, types, arch)
    return arch


def _read_tensor_infos(cur: _Cursor, count: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for i in range(count):
        name = cur.string(f"tensor {i} name", max_len=MAX_TENSOR_NAME)
        n_dims = cur.u32(f"tensor '{name}' n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = tuple(cur.u64(f"tensor '{name}' ne[{k}]") for k in range(n_dims))
        type_code = cur.u32(f"tensor '{name}' type")
        offset = cur.u64(f"tensor '{name}' offset")
        infos.append((name, shape, type_code, offset))
    return infos


def _build_tensors(
    path: Path,
    raw_infos: list[tuple[str, tuple[int, ...], int, int]],
    data_offset: int,
    alignment: int,
    file_size: int,
) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for name, shape, type_code, rel in raw_infos:
        if name in tensors:
            raise ModelLoadError(path, f"duplicate tensor name '{name}'")
        try:
            gtype = GGMLQuantizationType(type_code)
        except ValueError:
            raise ModelLoadError(
                path, f"tensor '{name}' has unknown tensor type {type_code}"
            ) from None
        if gtype not in quants.SUPPORTED_TYPES:
            names = ", ".join(t.name for t in quants.SUPPORTED_TYPES)
            raise ModelLoadError(
                path,
                f"tensor '{name}' has unsupported tensor type {gtype.name} (supported: {names})",
            )
        if any(d < 1 for d in shape):
            raise ModelLoadError(path, f"tensor '{name}' has an empty dimension: ne={list(shape)}")
        bs, ts = quants.BLOCK_SIZE[gtype], quants.TYPE_SIZE[gtype]
        if shape[0] % bs:
            raise ModelLoadError(
                path,
                f"shape/type mismatch: tensor '{name}' of type {gtype.name} has row length "
                f"ne[0]={shape[0]}, not a multiple of the block size {bs}",
            )
        n = 1
        for d in shape:
            n *= d
        nbytes = n // bs * ts
        if rel % alignment:
            raise ModelLoadError(
                path, f"tensor '{name}' data offset {rel} is not aligned to {alignment} bytes"
            )
        start = data_offset + rel
        if start + nbytes > file_size:
            raise ModelLoadError(
                path,
                f"tensor '{name}' data lies outside the file: {nbytes} bytes at offset "
                f"{start}, the file is {file_size} bytes",
            )
        tensors[name] = TensorInfo(name, gtype, shape, start, nbytes)
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for prev, cur in itertools.pairwise(ordered):
        if cur.offset < prev.offset + prev.nbytes:
            raise ModelLoadError(
                path,
                f"tensor data overlap: '{cur.name}' at offset {cur.offset} starts inside "
                f"'{prev.name}' ({prev.nbytes} bytes at offset {prev.offset})",
            )
    return tensors


def _parse(path: Path, mm: mmap.mmap, supported: Iterable[str]) -> GGUFFile:
    buf = memoryview(mm)
    try:
        cur = _Cursor(path, buf)
        magic = bytes(buf[:4])
        if magic != GGUF_MAGIC:
            raise cur.fail(f"bad magic {magic!r}: not a GGUF file (expected b'GGUF')")
        cur.pos = 4
        version = cur.u32("version")
        if version != GGUF_VERSION:
            if version & 0xFFFF == 0 and version >> 16:
                raise cur.fail(f"big-endian GGUF (version field {version:#x}) is not supported")
            raise cur.fail(f"unsupported GGUF version {version} (only version 3 is supported)")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        if n_tensors >= MAX_TENSORS:
            raise cur.fail(f"tensor count {n_tensors} is too large (must be < {MAX_TENSORS})")
        left = cur.size - cur.pos
        if n_kv > MAX_KV or n_kv * (8 + 4 + 1) > left:
            raise cur.fail(
                f"corrupt header: metadata count {n_kv} is impossible for {left} bytes of header"
            )

        metadata: dict[str, Any] = {}
        types: dict[str, tuple[GGUFValueType, ...]] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}", max_len=65_535)
            if key in metadata:
                raise cur.fail(f"duplicate metadata key '{key}'")
            vtype = cur.value_type(f"metadata '{key}'")
            if vtype == GGUFValueType.ARRAY:
                # peek at the element type for metadata_types
                etype_code = _U32.unpack_from(buf, cur.pos)[0] if cur.pos + 4 <= cur.size else -1
                metadata[key] = cur.value(vtype, f"metadata '{key}'")
                try:
                    types[key] = (vtype, GGUFValueType(etype_code))
                except ValueError:  # pragma: no cover - value() already rejected it
                    types[key] = (vtype,)
            else:
                metadata[key] = cur.value(vtype, f"metadata '{key}'")
                types[key] = (vtype,)

        min_info = 8 + 1 + 4 + 8 + 4 + 8
        left = cur.size - cur.pos
        if n_tensors * min_info > left:
            raise cur.fail(
                f"corrupt header: tensor count {n_tensors} is impossible for the {left} "
                "bytes left in the file"
            )
        raw_infos = _read_tensor_infos(cur, n_tensors)

        alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in metadata:
            alignment = metadata["general.alignment"]
            if (
                types["general.alignment"][0] not in _INT_TYPES
                or alignment <= 0
                or alignment & (alignment - 1)
                or alignment > 1 << 20
            ):
                raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
        data_offset = -(-cur.pos // alignment) * alignment
        if raw_infos and data_offset > cur.size:
            raise cur.fail(
                f"tensor data lies outside the file: the data section would start at "
                f"offset {data_offset}, past the end of the {cur.size}-byte file"
            )

        arch = _check_architecture(path, metadata, types, supported)
        tensors = _build_tensors(path, raw_infos, data_offset, alignment, cur.size)
    finally:
        # A traceback may still hold a numpy view of `buf`; never mask the real error.
        with contextlib.suppress(BufferError):
            buf.release()
    return GGUFFile(
        path,
        mm,
        version=version,
        architecture=arch,
        metadata=metadata,
        metadata_types=types,
        tensors=tensors,
        alignment=alignment,
        data_offset=data_offset,
    )


def _check_hparams(gf: GGUFFile) -> None:
    """Everything else the forward pass needs (hparams.load_hparams: head counts that
    divide, rope dims, expert counts...), so a file that opens is a file that can run."""
    try:
        hparams.load_hparams(gf)
    except ModelLoadError:
        raise
    except Exception as exc:  # a metadata value of an unexpected kind
        raise ModelLoadError(gf.path, f"bad hyperparameter metadata: {exc}") from exc


def open_gguf(
    path: str | os.PathLike[str],
    *,
    supported_architectures: Iterable[str] = SUPPORTED_ARCHITECTURES,
) -> GGUFFile:
    """Map and validate a GGUF v3 file; raise ModelLoadError naming the file and problem."""
    p = Path(path)
    mm = _open_map(p)
    try:
        gf = _parse(p, mm, supported_architectures)
        _check_hparams(gf)
    except BaseException:
        mm.close()
        raise
    return gf
