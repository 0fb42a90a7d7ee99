"""Error codes (docs/protocol.md) and the exception that carries them.

Every failure that reaches a client is a `WorkerError` with one of these codes; anything
else that escapes a job is reported as `INTERNAL`.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    CONTEXT_LENGTH_EXCEEDED = "CONTEXT_LENGTH_EXCEEDED"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    INSUFFICIENT_VRAM = "INSUFFICIENT_VRAM"
    VRAM_OOM = "VRAM_OOM"
    CUDA_ERROR = "CUDA_ERROR"
    INFERENCE_TIMEOUT = "INFERENCE_TIMEOUT"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


# Codes a client may retry as-is (another worker or a later attempt may succeed).
RETRIABLE: frozenset[ErrorCode] = frozenset(
    {ErrorCode.VRAM_OOM, ErrorCode.CUDA_ERROR, ErrorCode.INFERENCE_TIMEOUT, ErrorCode.INTERNAL}
)


class WorkerError(Exception):
    """A failure with an error code and a message fit for the client."""

    def __init__(self, code: ErrorCode, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retriable = code in RETRIABLE if retriable is None else retriable


class ModelLoadError(WorkerError):
    """The model file cannot be used: names the file and the problem."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(ErrorCode.MODEL_LOAD_FAILED, f"{path}: {problem}", retriable=False)
        self.path = path
        self.problem = problem


class InsufficientVram(WorkerError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INSUFFICIENT_VRAM, message, retriable=False)


class VramOom(WorkerError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.VRAM_OOM, message, retriable=True)


class ContextLengthExceeded(WorkerError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.CONTEXT_LENGTH_EXCEEDED, message, retriable=False)


class Cancelled(WorkerError):
    def __init__(self, message: str = "job cancelled", reason: str | None = None) -> None:
        super().__init__(ErrorCode.CANCELLED, message, retriable=False)
        self.reason = reason  # e.g. client_gone: the error event's `reason` field


class CudaError(WorkerError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.CUDA_ERROR, message, retriable=True)
