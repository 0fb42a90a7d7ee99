"""The paged KV cache in VRAM: per layer a K pool and a V pool of KV_BLOCK-position blocks.

Block b of layer l holds pool rows b*KV_BLOCK .. of that layer's K and V ([rows][n_kv][d]
FP16 each); which block holds which positions of which sequence is the engine's business
(worker.engine.block_manager), passed to the kernels as block tables. One block past the
usable ones (`trash_block`) is never given to a sequence: padding rows of a step write
there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.backends.cuda.arena import DevBuf, align_up
from worker.backends.cuda.kernels import KV_BLOCK


def kv_block_bytes(n_layer: int, n_kv: int, head_dim: int) -> int:
    """Bytes of one block over all layers (K and V, FP16)."""
    return 2 * n_layer * KV_BLOCK * n_kv * head_dim * 2


class KvPool:
    def __init__(self, ctx: Any, n_layer: int, n_kv: int, head_dim: int, n_blocks: int) -> None:
        if n_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.ctx = ctx
        self.n_blocks = n_blocks  # usable by sequences
        self.trash_block = n_blocks
        self.rows = (n_blocks + 1) * KV_BLOCK
        self.row_bytes = n_kv * head_dim * 2
        self.block_bytes = KV_BLOCK * self.row_bytes  # one layer's K (or V) of one block
        self.layer_bytes = align_up(self.rows * self.row_bytes)
        self.n_layer = n_layer
        self.buf: DevBuf = ctx.alloc(2 * n_layer * self.layer_bytes, "KV cache")

    def layer(self, il: int) -> tuple[DevBuf, DevBuf]:
        base = 2 * il * self.layer_bytes
        return (
            self.buf.view(base, self.rows * self.row_bytes, f"K[{il}]"),
            self.buf.view(base + self.layer_bytes, self.rows * self.row_bytes, f"V[{il}]"),
        )

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Every layer's K and V of block src into block dst (queued on the stream)."""
        drv, st = self.ctx.drv, self.ctx.stream
        for src, dst in pairs:
            for b in (src, dst):
                if not 0 <= b < self.n_blocks:
                    raise ValueError(f"block {b} outside the pool (0..{self.n_blocks - 1})")
            for il in range(self.n_layer):
                for half in self.layer(il):
                    drv.memcpy_dtod_async(
                        half.ptr + dst * self.block_bytes,
                        half.ptr + src * self.block_bytes,
                        self.block_bytes,
                        st,
                    )
