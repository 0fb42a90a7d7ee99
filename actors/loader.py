"""Loader actor: mmap -> validate -> tokenizer -> backend (weights to the device) -> ready.

Runs its work on the backend thread (the backend is created, and later used, only there) and
narrates ``model_load_start``, ``model_load_progress`` (0/25/50/75/100: file validated,
tokenizer built, weights and KV cache in place, warm-up step done) and
``model_load_complete``. A load failure raises ModelLoadError / InsufficientVram, which the
supervisor turns into exit code 1 with the message (SPEC §4).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

from actors.backend_thread import BackendThread
from worker.backends.base import Backend
from worker.config import WorkerConfig
from worker.errors import ErrorCode, ModelLoadError, WorkerError
from worker.narration import narrate
from worker.tokenizer.base import Tokenizer


@dataclass
class LoadedModel:
    backend: Backend
    tokenizer: Tokenizer
    model_name: str
    quant_kind: str
    architecture: str
    load_seconds: float
    # The job-facing context in tokens (SPEC §4): --ctx-size, else the model's training
    # context. The KV capacity is backend.context_length (--ctx-size / --kv-cache-size-mb /
    # what fits); a job needing more KV than that gets VRAM_OOM, not a smaller context.
    context_length: int


def _call_with_supported(ctor: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `ctor` with the keyword arguments its signature accepts (the CUDA backend takes
    device options the NumPy one does not)."""
    try:
        params = inspect.signature(ctor).parameters
    except (TypeError, ValueError):
        return ctor(*args, **kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return ctor(*args, **kwargs)
    return ctor(*args, **{k: v for k, v in kwargs.items() if k in params and v is not None})


def load_model_blocking(cfg: WorkerConfig) -> LoadedModel:
    """The whole load; runs on the backend thread. Any failure is a WorkerError: a file
    whose metadata and tensors disagree in a way no check caught (found by fuzzing: a head
    count that divides but does not match the k/v tensors) fails its warm-up step with a
    NumPy error, reported as MODEL_LOAD_FAILED (exit 1), not as a crash (exit 2)."""
    try:
        return _load_model_blocking(cfg)
    except WorkerError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            cfg.model,
            f"cannot load the model ({type(exc).__name__}: {exc}); its metadata and tensors "
            "may not agree",
        ) from exc


def _load_model_blocking(cfg: WorkerConfig) -> LoadedModel:
    from worker.gguf.estimate import quant_kind
    from worker.gguf.hparams import load_hparams
    from worker.gguf.reader import open_gguf
    from worker.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    narrate("model_load_start", f"loading {cfg.model}", path=str(cfg.model), device=cfg.device)
    emitted: set[int] = set()

    def milestone(percent: int, what: str, **fields: Any) -> None:
        if percent not in emitted:
            emitted.add(percent)
            narrate("model_load_progress", f"{percent}%: {what}", percent=percent, **fields)

    def progress(fraction: float) -> None:
        """Weights-copy progress from the backend (the CUDA one reports its chunked H2D
        copy): 25/50/75 % are the copy's quarters."""
        for pct in (25, 50, 75):
            if fraction * 100 >= pct:
                milestone(pct, "weights copied", fraction=round(fraction, 3))

    milestone(0, "starting")
    gguf_file = open_gguf(cfg.model)
    quant = quant_kind(gguf_file)
    narrate(
        "model_load_validated",
        "file validated",
        architecture=gguf_file.architecture,
        tensors=len(gguf_file.tensors),
        quant_kind=quant,
    )
    tokenizer = load_tokenizer(
        gguf_file.metadata, model_path=cfg.model, tokenizer_json=cfg.tokenizer
    )
    narrate("model_load_tokenizer", "tokenizer ready", tokenizer=tokenizer.kind)
    options: dict[str, Any] = {
        "ctx_size": cfg.ctx_size,
        "kv_cache_size_mb": cfg.kv_cache_size_mb,
        "gpu_device": cfg.gpu_device,
        "h2d_chunk_mb": cfg.h2d_chunk_mb,
        "progress": progress,
    }
    backend: Backend
    if cfg.device == "cpu":
        from worker.backends.numpy_ref import NumpyBackend

        backend = _call_with_supported(NumpyBackend, gguf_file, **options)
    else:
        try:
            from worker.backends.cuda import CudaBackend

            backend = _call_with_supported(CudaBackend, gguf_file, **options)
        except WorkerError:
            raise
        except Exception as exc:  # no driver, no device, pycuda missing: never fall back
            raise WorkerError(
                ErrorCode.CUDA_ERROR,
                f"CUDA backend unavailable on GPU {cfg.gpu_device} "
                f"({type(exc).__name__}: {exc}); use --device cpu for the NumPy reference",
                retriable=False,
            ) from exc
    # a backend without copy progress (NumPy) reaches the milestones when it is built
    for pct in (25, 50, 75):
        milestone(pct, "weights and KV cache in place", context_length=backend.context_length)
    # warm-up: one token through the model so the first job pays no first-call costs
    backend.reset()
    warm_id = tokenizer.bos_id if tokenizer.bos_id is not None else 0
    backend.forward([warm_id])
    backend.reset()
    milestone(100, "warm-up done")
    context_length = (
        cfg.ctx_size if cfg.ctx_size is not None else load_hparams(gguf_file).n_ctx_train
    )
    name = gguf_file.metadata.get("general.name")
    model_name = name if isinstance(name, str) and name else cfg.model.name
    seconds = time.perf_counter() - t0
    narrate(
        "model_load_complete",
        f"loaded {model_name} in {seconds:.2f} s",
        load_seconds=round(seconds, 3),
        quant_kind=quant,
        vram_bytes_used=backend.info.vram_bytes_used,
        context_length=context_length,
        kv_cache_tokens=backend.context_length,
    )
    if backend.context_length < context_length:
        narrate(
            "kv_cache_smaller_than_context",
            f"the KV cache holds {backend.context_length} tokens, the context is "
            f"{context_length}: jobs that may need more KV get VRAM_OOM",
            # expected without --ctx-size (KV "capped to fit"); asked for, it is worth a look
            level="INFO" if cfg.ctx_size is None else "WARNING",
            context_length=context_length,
            kv_cache_tokens=backend.context_length,
        )
    return LoadedModel(
        backend=backend,
        tokenizer=tokenizer,
        model_name=model_name,
        quant_kind=quant,
        architecture=gguf_file.architecture,
        load_seconds=seconds,
        context_length=context_length,
    )


async def load(thread: BackendThread, cfg: WorkerConfig) -> LoadedModel:
    return await thread.call(load_model_blocking, cfg)
