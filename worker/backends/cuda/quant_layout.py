"""Block layouts of the tensor types the CUDA matrix kernels read (cuda_src/quant.cuh).

Type ids are ggml's (`gguf.GGMLQuantizationType` values). A row of K elements is K/QK
consecutive blocks of BYTES bytes. F32/F16/BF16 are treated by the kernels as 32-element
blocks, so every type needs K to be a multiple of its QK here (ggml itself only needs that for
the quantized types).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QLayout:
    type_id: int
    name: str  # suffix of the kernel names: gemv_<name>_nb1, gemm_<name>, embed_<name>...
    qk: int  # elements per block
    block_bytes: int

    def row_bytes(self, k: int) -> int:
        if k <= 0 or k % self.qk:
            raise ValueError(f"{self.name}: row length {k} is not a positive multiple of {self.qk}")
        return k // self.qk * self.block_bytes


_LAYOUTS = (
    QLayout(0, "f32", 32, 128),
    QLayout(1, "f16", 32, 64),
    QLayout(2, "q4_0", 32, 18),
    QLayout(3, "q4_1", 32, 20),
    QLayout(6, "q5_0", 32, 22),
    QLayout(7, "q5_1", 32, 24),
    QLayout(8, "q8_0", 32, 34),
    QLayout(12, "q4_k", 256, 144),
    QLayout(13, "q5_k", 256, 176),
    QLayout(14, "q6_k", 256, 210),
    QLayout(30, "bf16", 32, 64),
    QLayout(39, "mxfp4", 32, 17),
)

LAYOUTS: dict[int, QLayout] = {lay.type_id: lay for lay in _LAYOUTS}


def layout(qtype: int) -> QLayout:
    """The layout of ggml type id `qtype`; ValueError for a type the kernels do not read."""
    try:
        return LAYOUTS[int(qtype)]
    except KeyError:
        names = ", ".join(lay.name for lay in _LAYOUTS)
        raise ValueError(
            f"tensor type {int(qtype)} has no CUDA matrix kernel (have {names})"
        ) from None
