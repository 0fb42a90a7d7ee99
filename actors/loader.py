"""Loading: mmap -> validate -> tokenizer -> backend (weights to the device) -> ready.

Runs on the engine thread (the backend is created, and later used, only there: see
actors/inference.py) and narrates ``model_load_start``, ``model_load_progress``
(0/25/50/75/100: file validated, tokenizer built, weights and KV cache in place, warm-up
step done) and
``model_load_complete``. A load failure raises ModelLoadError / InsufficientVram, which the
supervisor turns into exit code 1 with the message.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

from worker.config import WorkerConfig
from worker.engine.batch import BatchBackend
from worker.errors import ErrorCode, ModelLoadError, WorkerError
from worker.narration import narrate
from worker.tokenizer.base import Tokenizer


@dataclass
class LoadedModel:
    backend: BatchBackend
    tokenizer: Tokenizer
    model_name: str
    quant_kind: str
    architecture: str
    load_seconds: float
    # The job-facing context in tokens: --ctx-size, else the model's training context. What
    # one job can be given is bounded by the KV pool (--kv-cache-size-mb / what fits); a job
    # needing more KV than that gets VRAM_OOM, not a smaller context.
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
    """The whole load; runs on the engine thread. Any failure is a WorkerError: a file
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

    on_gpu = cfg.device == "cuda"
    # what the weights' progress means: a chunked copy to the GPU, or the CPU backend
    # preparing its weights in host memory
    weights_step = "weights copied to the GPU" if on_gpu else "weights prepared in host memory"

    def progress(fraction: float) -> None:
        """Weights progress from the backend: 25/50/75 % are its quarters."""
        for pct in (25, 50, 75):
            if fraction * 100 >= pct:
                milestone(pct, weights_step, fraction=round(fraction, 3))

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
        "max_batch": cfg.max_batch,
        "prefill_chunk": cfg.prefill_chunk,
        "batch_invariant": cfg.batch_invariant,
    }
    backend: BatchBackend
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
    from worker.engine.single import SingleSequence

    warm_id = tokenizer.bos_id if tokenizer.bos_id is not None else 0
    SingleSequence(backend).forward([warm_id])
    milestone(100, "warm-up done")
    context_length = (
        cfg.ctx_size if cfg.ctx_size is not None else load_hparams(gguf_file).n_ctx_train
    )
    name = gguf_file.metadata.get("general.name")
    model_name = name if isinstance(name, str) and name else cfg.model.name
    seconds = time.perf_counter() - t0
    device_fields: dict[str, Any] = (
        {"vram_bytes_used": backend.info.vram_bytes_used} if on_gpu else {}
    )
    arithmetic = getattr(backend, "arithmetic", None)  # the CUDA backend's products
    if arithmetic is not None:
        device_fields["arithmetic"] = arithmetic
    narrate(
        "model_load_complete",
        f"loaded {model_name} in {seconds:.2f} s",
        load_seconds=round(seconds, 3),
        quant_kind=quant,
        **device_fields,
        context_length=context_length,
        kv_cache_tokens=backend.n_blocks * backend.block_size,
        max_batch=backend.max_batch,
    )
    per_job = min(backend.context_length, backend.n_blocks * backend.block_size)
    if per_job < context_length:
        # on the GPU the KV cache is what fits in VRAM; on the CPU a bounded host buffer
        # (--ctx-size or --kv-cache-size-mb size it); either way a job needing more is refused
        refused = "get VRAM_OOM" if on_gpu else "are refused before they start"
        narrate(
            "kv_cache_smaller_than_context",
            f"one job can be given {per_job} KV positions, the context is {context_length}: "
            f"jobs that may need more {refused}",
            # expected without --ctx-size (KV "capped to fit"); asked for, it is worth a look
            level="INFO" if cfg.ctx_size is None else "WARNING",
            context_length=context_length,
            kv_cache_tokens=per_job,
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
