"""Device memory layout: the 256-byte-aligned weights arena, KV-cache sizing, and the launch
layer's two types: the device buffer every launch wrapper takes (`DevBuf`) and the error
that refuses a launch before it is queued (`LaunchRefused`).

Everything here is plain arithmetic over byte counts (no CUDA calls), so the plans are unit
tested on machines without a GPU; `CudaContext.alloc` turns a plan into one allocation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from worker.errors import CudaError

ALIGN = 256
MIB = 1 << 20


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class DevBuf:
    """A range of device memory: base address, size in bytes and a name for error messages.

    Launch wrappers check every access they are about to queue against `nbytes`.
    """

    ptr: int
    nbytes: int
    name: str = "buffer"

    def view(self, offset: int, nbytes: int, name: str | None = None) -> DevBuf:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes:
            raise ValueError(
                f"{self.name}: view [{offset}, {offset + nbytes}) outside {self.nbytes} bytes"
            )
        return DevBuf(self.ptr + offset, nbytes, name or f"{self.name}+{offset}")


class LaunchRefused(CudaError):
    """A launch refused before it was queued: its shapes, strides, alignment or the byte
    ranges it would read or write do not fit its buffers (a CudaError naming the kernel)."""

    def __init__(self, kernel: str, problem: str) -> None:
        super().__init__(f"{kernel}: launch refused: {problem}")
        self.kernel = kernel


@dataclass(frozen=True, slots=True)
class ArenaPlan:
    offsets: dict[str, int]
    sizes: dict[str, int]
    total: int


def plan_arena(items: Iterable[tuple[str, int]], align: int = ALIGN) -> ArenaPlan:
    """Place each (name, nbytes) at the next `align`-byte boundary, in the given order."""
    if align <= 0 or align & (align - 1):
        raise ValueError(f"alignment must be a power of two, got {align}")
    offsets: dict[str, int] = {}
    sizes: dict[str, int] = {}
    off = 0
    for name, nbytes in items:
        if nbytes < 0:
            raise ValueError(f"{name}: negative size {nbytes}")
        if name in offsets:
            raise ValueError(f"{name}: placed twice")
        off = align_up(off, align)
        offsets[name] = off
        sizes[name] = nbytes
        off += nbytes
    return ArenaPlan(offsets, sizes, align_up(off, align))


def kv_bytes_per_token(n_layer: int, n_head_kv: int, head_dim: int, head_dim_v: int) -> int:
    """FP16 K and V of one position over all layers."""
    return n_layer * n_head_kv * (head_dim + head_dim_v) * 2


def plan_ctx(
    *,
    requested: int | None,
    n_ctx_train: int,
    per_token: int,
    fixed_bytes: int,
    free_bytes: int,
    reserve_bytes: int,
    per_token_scratch: int = 0,
) -> int:
    """Context length (KV capacity in tokens) for a startup with `free_bytes` free.

    requested None means the model's training context. The result is capped so that weights,
    scratch (`fixed_bytes`), the KV cache and a safety reserve fit; it is at least 1 or the
    caller gets 0 (the caller turns that into INSUFFICIENT_VRAM).
    """
    want = n_ctx_train if requested is None else requested
    if want <= 0:
        raise ValueError(f"context size must be > 0, got {want}")
    room = free_bytes - fixed_bytes - reserve_bytes
    if room <= 0:
        return 0
    fit = room // max(1, per_token + per_token_scratch)
    return int(min(want, fit))
