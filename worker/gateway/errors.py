"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP
status, and the mapping of the worker's error codes (docs/protocol.md) onto those statuses."""

from __future__ import annotations

from typing import Final

import msgspec

from worker.errors import ErrorCode

_TYPES: Final = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the HTTP client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )

    def payload(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return msgspec.json.encode(self.payload())


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# The worker's error code -> HTTP status. A request the worker refused as it stands is the
# client's to fix (400); a worker that cannot serve (load failure, VRAM) is a 503; the
# worker's own time limit a 504; everything else a 500 carrying the worker's code.
_STATUS: Final = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.MODEL_LOAD_FAILED: 503,
    ErrorCode.INSUFFICIENT_VRAM: 503,
    ErrorCode.INFERENCE_TIMEOUT: 504,
    ErrorCode.VRAM_OOM: 500,
    ErrorCode.CUDA_ERROR: 500,
    ErrorCode.CANCELLED: 500,
    ErrorCode.INTERNAL: 500,
}


def from_worker(code: ErrorCode, message: str) -> APIError:
    """The HTTP error for a worker's `error` event."""
    status = _STATUS.get(code, 500)
    return APIError(status, message, code=code.value.lower())
