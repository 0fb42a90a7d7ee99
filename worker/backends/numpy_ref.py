"""`--device cpu`: the NumPy reference backend (docs/design.md), the oracle the CUDA backend is
held to.

Weights stay as mapped in the GGUF file; float32 dequantized copies are cached up to
`dequant_cache_mb` (first come, first kept; anything past the budget is dequantized again
on every use, so a model larger than the budget still runs, only slower). F32 tensors are
used straight from the mapping (zero copy). Embedding lookups dequantize only the rows
they need; MoE experts are dequantized (and cached) one expert matrix at a time.

The forward pass is worker.models (one recipe per architecture), float32 throughout, with
a float32 KV cache sized to `ctx_size` tokens. Prefill runs in chunks of `prefill_chunk`
tokens (bounded attention-score memory).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType

from worker.backends.base import BackendInfo, ResidencyReport
from worker.engine.batch import Chunk, StepOutput
from worker.errors import ContextLengthExceeded, ModelLoadError
from worker.gguf import quants
from worker.gguf.hparams import HParams, load_hparams
from worker.gguf.reader import GGUFFile, open_gguf
from worker.models.base import DecoderModel, build_model
from worker.models.common import F32, PagedKV

# Enough for the real Qwen2.5-0.5B fully dequantized (about 2.0 GB of matrices besides the
# token embedding, which is read row by row); Phi-3-mini (about 15 GB as float32) keeps
# 6 GiB cached and dequantizes the rest per use, well inside a 24 GiB machine.
DEFAULT_DEQUANT_CACHE_MB = int(os.environ.get("WORKER_ORCD_DEQUANT_CACHE_MB", "6144"))
DEFAULT_CTX_CAP = 4096
DEFAULT_MAX_BATCH = 8
DEFAULT_BLOCK_SIZE = 64
DEFAULT_PREFILL_CHUNK = 256


class _BlasThreads:
    """Best-effort control of the thread count of NumPy's bundled OpenBLAS.

    OpenBLAS's worker threads spin while they wait for each other, so as soon as the cores
    are shared (the engine's other threads, other processes) more than one thread turns
    slow instead of fast. Measured on the 2-core dev box under load (real Qwen2.5-0.5B):
    decode 3.6 tok/s with one thread vs 0.6 with two; a 36-token prefill 1.4 s vs 8-11 s.
    A decode step is memory-bound anyway (one thread streams nearly as fast as two). So the
    backend runs its forward passes with one thread by default. Without a recognisable
    OpenBLAS this does nothing.
    """

    def __init__(self) -> None:
        self._set: Any = None
        self._get: Any = None
        try:
            import ctypes
            import glob

            libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
            for path in glob.glob(os.path.join(libdir, "*openblas*")):
                lib = ctypes.CDLL(path)
                for prefix, suffix in (("scipy_", "64_"), ("scipy_", ""), ("", "64_"), ("", "")):
                    setter = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                    getter = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                    if setter is not None and getter is not None:
                        self._set, self._get = setter, getter
                        return
        except OSError:
            pass

    def get(self) -> int | None:
        return int(self._get()) if self._get is not None else None

    def set(self, n: int | None) -> None:
        if self._set is not None and n is not None and n > 0:
            self._set(int(n))


_BLAS = _BlasThreads()


def _col_major(w: F32) -> F32:
    """The same [out, in] matrix stored column-major, so `x @ w.T` reads a C-contiguous
    [in, out] array: OpenBLAS's matrix-vector product over that layout streams memory
    about 1.5x faster than over the transposed one (decode is memory-bound)."""
    if w.ndim != 2:
        return w
    return np.asfortranarray(w)


class GGUFWeights:
    """The `worker.models.common.Weights` view of a GGUFFile with a bounded float32 cache."""

    def __init__(self, gf: GGUFFile, cache_mb: int = DEFAULT_DEQUANT_CACHE_MB) -> None:
        self.gf = gf
        self.budget = max(0, int(cache_mb)) << 20
        self.cached_bytes = 0
        self._cache: dict[str | tuple[str, int], F32] = {}

    def has(self, name: str) -> bool:
        return name in self.gf.tensors

    def _keep(self, key: str | tuple[str, int], arr: F32) -> F32:
        """Cache `arr` (column-major) if it fits the budget; otherwise hand it out as is
        (it is dequantized again on its next use)."""
        if self.cached_bytes + arr.nbytes <= self.budget:
            arr = _col_major(arr)
            self._cache[key] = arr
            self.cached_bytes += arr.nbytes
        return arr

    def get(self, name: str) -> F32:
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        info = self.gf.tensors[name]
        if info.ggml_type == GGMLQuantizationType.F32:
            arr: F32 = self.gf.raw(name).view(np.float32).reshape(info.np_shape)
            self._cache[name] = arr  # a view of the mapping: costs no memory
            return arr
        return self._keep(name, self.gf.dequantize(name))

    def _row_bytes(self, name: str) -> tuple[npt.NDArray[np.uint8], int, int]:
        info = self.gf.tensors[name]
        ne0 = info.shape[0]
        n_rows = info.n_elements // ne0
        raw = self.gf.raw(name).reshape(n_rows, info.nbytes // n_rows)
        return raw, ne0, n_rows

    def rows(self, name: str, idx: npt.NDArray[np.int64]) -> F32:
        hit = self._cache.get(name)
        if hit is not None:
            return hit.reshape(-1, hit.shape[-1])[idx]
        info = self.gf.tensors[name]
        raw, ne0, n_rows = self._row_bytes(name)
        if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
            raise IndexError(f"{name}: row index out of range 0..{n_rows - 1}")
        flat = quants.dequantize(raw[idx], info.ggml_type, idx.size * ne0)
        return flat.reshape(idx.size, ne0)

    def expert(self, name: str, e: int) -> F32:
        key = (name, e)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        whole = self._cache.get(name)
        if whole is not None:
            return whole[e]
        info = self.gf.tensors[name]
        if len(info.shape) != 3 or not 0 <= e < info.shape[2]:
            raise IndexError(f"{name}: no expert {e} in shape {info.shape}")
        return self._keep(key, self._dequant_expert(name, e))

    def _dequant_expert(self, name: str, e: int) -> F32:
        """Expert e of a [experts][N][K] tensor as a float32 [N][K] matrix."""
        info = self.gf.tensors[name]
        per = info.nbytes // info.shape[2]
        raw = self.gf.raw(name)[e * per : (e + 1) * per]
        mat = quants.dequantize(raw, info.ggml_type, info.shape[0] * info.shape[1])
        return mat.reshape(info.shape[1], info.shape[0])

    def preload(self, progress: Callable[[float], None] | None = None) -> None:
        """Dequantize into the cache now (in file order) as far as the budget goes;
        `progress(fraction)` after each tensor."""
        items = list(self.gf.tensors.items())
        for i, (name, info) in enumerate(items):
            skip = (
                self.cached_bytes >= self.budget
                # read row by row; only the LM head needs it whole
                or (name == "token_embd.weight" and "output.weight" in self.gf.tensors)
                or len(info.shape) == 3  # experts load on first use
            )
            if not skip:
                self.get(name)
            if progress is not None:
                progress((i + 1) / len(items))

    def preload_experts(self, threads: int = 1) -> None:
        """Dequantize every expert matrix into the cache now (as far as the budget goes),
        `threads` at a time: NumPy releases the GIL inside its array operations, so a
        many-core machine fills a large cache several times faster than first use would."""
        from concurrent.futures import ThreadPoolExecutor

        jobs = [
            (name, e)
            for name, info in self.gf.tensors.items()
            if len(info.shape) == 3
            for e in range(info.shape[2])
        ]
        threads = max(1, threads)

        def one(job: tuple[str, int]) -> tuple[tuple[str, int], F32]:
            return job, _col_major(self._dequant_expert(*job))

        with ThreadPoolExecutor(threads) as ex:
            for i in range(0, len(jobs), 4 * threads):  # bounded memory in flight
                batch = [j for j in jobs[i : i + 4 * threads] if j not in self._cache]
                for key, arr in ex.map(one, batch):
                    if self.cached_bytes + arr.nbytes > self.budget:
                        return
                    self._cache[key] = arr
                    self.cached_bytes += arr.nbytes


class NumpyBackend:
    """The batched backend protocol (worker.engine.batch) over the NumPy reference models.

    A step runs its chunks one after another, each exactly as it would run alone (one
    forward per chunk, prompt chunks cut at multiples of `chunk_align` positions), so a
    job's results never depend on what else is in the step. The KV cache is a pool of
    blocks (worker.models.common.PagedKV) addressed through each chunk's block table.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | GGUFFile,
        *,
        ctx_size: int | None = None,
        kv_tokens: int | None = None,
        kv_cache_size_mb: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dequant_cache_mb: int = DEFAULT_DEQUANT_CACHE_MB,
        kv_dtype: npt.DTypeLike = np.float32,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        preload: bool = True,
        progress: Callable[[float], None] | None = None,
        blas_threads: int | None = 1,
    ) -> None:
        """`model`: a path or an open GGUFFile (then left open on close()).
        `ctx_size`: most positions one sequence may hold (default min(n_ctx_train, 4096)).
        `kv_tokens`: positions in the KV pool, all sequences together (default
        `max_batch` x ctx_size, at least one block), capped so the pool fits
        `kv_cache_size_mb` when that is given. `dequant_cache_mb`: budget of dequantized
        float32 weight copies. `progress(fraction)`: weight preload progress.
        `prefill_chunk`: prompt positions one forward runs at most; prompts are cut at its
        multiples (`chunk_align`). `blas_threads`: OpenBLAS threads during a step (None =
        leave NumPy's setting)."""
        self._owns_file = not isinstance(model, GGUFFile)
        self.gf: GGUFFile = model if isinstance(model, GGUFFile) else open_gguf(Path(model))
        try:
            self.hp: HParams = load_hparams(self.gf)
            n_ctx = ctx_size if ctx_size is not None else min(self.hp.n_ctx_train, DEFAULT_CTX_CAP)
            if n_ctx <= 0:
                raise ModelLoadError(self.gf.path, f"ctx_size must be > 0, got {n_ctx}")
            bs = max(1, block_size)
            if kv_cache_size_mb is None:  # whole blocks, at least one
                pool = kv_tokens if kv_tokens is not None else max(1, max_batch) * n_ctx
                pool = max(1, -(-pool // bs)) * bs
            else:
                per_token = (
                    self.hp.n_layer
                    * self.hp.n_head_kv
                    * (self.hp.head_dim + self.hp.head_dim_v)
                    * np.dtype(kv_dtype).itemsize
                )
                pool = min(
                    kv_tokens if kv_tokens is not None else max(1, max_batch) * n_ctx,
                    (int(kv_cache_size_mb) << 20) // per_token,
                )
                pool = pool // bs * bs
            if pool < bs:
                raise ModelLoadError(
                    self.gf.path,
                    f"the KV cache budget holds {pool} positions, less than one block of {bs}",
                )
            self.weights = GGUFWeights(self.gf, dequant_cache_mb)
            self.model: DecoderModel = build_model(
                self.hp, self.weights, n_ctx=n_ctx, path=self.gf.path
            )
            if preload:
                self.weights.preload(progress)
        except BaseException:
            if self._owns_file:
                self.gf.close()
            raise
        self.info = BackendInfo(device="cpu", resident=False)
        self.vocab_size = self.hp.n_vocab
        self.block_size = bs
        self.n_blocks = pool // bs
        self.context_length = min(n_ctx, self.n_blocks * bs)
        self.max_batch = max(1, max_batch)
        self.chunk_align = max(1, prefill_chunk)
        self.max_step_tokens = 1 << 20  # chunks run one at a time: no step buffer to fill
        self.blas_threads = blas_threads
        self.kv = PagedKV(self.hp, self.n_blocks, bs, kv_dtype)
        self._drawn: dict[int, int] = {}  # per slot: the id its last sampled chunk drew

    def launch(self, chunks: Sequence[Chunk]) -> StepOutput:
        """Runs the step now (on the calling thread); `collect` hands its output back. A
        pending chunk's token is the id its slot drew last."""
        return self.step(chunks)

    def collect(self, handle: StepOutput) -> StepOutput:
        return handle

    def step(self, chunks: Sequence[Chunk]) -> StepOutput:
        if self.blas_threads is not None:
            before = _BLAS.get()
            _BLAS.set(self.blas_threads)
            try:
                return self._step(chunks)
            finally:
                _BLAS.set(before)
        return self._step(chunks)

    def _step(self, chunks: Sequence[Chunk]) -> StepOutput:
        from worker.engine.sampling import sample

        out = StepOutput(ids=[], logits=[])
        for ch in chunks:
            if ch.pending:
                drawn = self._drawn.get(ch.slot)
                if drawn is None or ch.prefill or ch.sample is None:
                    raise ValueError(f"pending chunk in slot {ch.slot} without a drawn id")
                hist = [*ch.sample.history, drawn]
                ch = dataclasses.replace(
                    ch, tokens=(drawn,), sample=dataclasses.replace(ch.sample, history=hist)
                )
            n = len(ch.tokens)
            if n == 0:
                raise ValueError("a chunk needs at least one token")
            end = ch.start + n
            if end > self.context_length or end > len(ch.blocks) * self.block_size:
                raise ContextLengthExceeded(
                    f"positions up to {end} exceed the context ({self.context_length}) "
                    f"or the chunk's {len(ch.blocks)} blocks"
                )
            kv = self.kv.view(ch.blocks)
            parts: list[F32] = []
            last: F32 | None = None
            pos = ch.start
            while pos < end:  # cut at multiples of chunk_align, as the scheduler does
                stop = min(end, (pos // self.chunk_align + 1) * self.chunk_align)
                res = self.model.forward(
                    ch.tokens[pos - ch.start : stop - ch.start], kv, pos, all_logits=ch.logits
                )
                if ch.logits:
                    parts.append(res)
                else:
                    last = res
                pos = stop
            logits = np.concatenate(parts, axis=0) if ch.logits else None
            out.logits.append(logits.astype(np.float32, copy=False) if logits is not None else None)
            if ch.sample is None:
                out.ids.append(-1)
                continue
            row = logits[-1] if logits is not None else last
            assert row is not None
            sp = ch.sample
            tok = int(sample(row.astype(np.float32, copy=False), sp.params, sp.draw, sp.history))
            self._drawn[ch.slot] = tok
            out.ids.append(tok)
        return out

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        for src, dst in pairs:
            self.kv.copy_block(src, dst)

    def release_slot(self, slot: int) -> None:
        self._drawn.pop(slot, None)

    def check_residency(self) -> ResidencyReport:
        # Host memory by design (resident=False): there is no device memory to verify.
        return ResidencyReport(ok=True, checked=0)

    def close(self) -> None:
        self.weights._cache.clear()
        if self._owns_file:
            self.gf.close()
