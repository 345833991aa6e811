"""Typed errors -> HTTP status and OpenAI's error object, in one table.

Every error deltaserve raises on purpose names its gRPC status code (deltaserve.errors);
`STATUS` maps that code to the HTTP status, OpenAI's error `type` and whether a
Retry-After header is sent, so both doors report the same failure the same way. The body
is OpenAI's `{"error": {"message", "type", "param", "code"}}`, with `code` the gRPC
status name in lower case (e.g. "resource_exhausted").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from deltaserve.errors import RETRY_AFTER_SECONDS, DeltaServeError, InvalidArgumentError, retry_after_seconds


@dataclass(frozen=True)
class HttpStatus:
    status: int
    type: str  # OpenAI's error type
    retry_after: bool = False


STATUS: dict[str, HttpStatus] = {
    "INVALID_ARGUMENT": HttpStatus(400, "invalid_request_error"),
    "FAILED_PRECONDITION": HttpStatus(400, "invalid_request_error"),
    "UNAUTHENTICATED": HttpStatus(401, "authentication_error"),
    "PERMISSION_DENIED": HttpStatus(403, "permission_error"),
    "NOT_FOUND": HttpStatus(404, "not_found_error"),
    "RESOURCE_EXHAUSTED": HttpStatus(429, "rate_limit_error", retry_after=True),
    "CANCELLED": HttpStatus(499, "cancelled_error"),
    "INTERNAL": HttpStatus(500, "server_error"),
    "UNAVAILABLE": HttpStatus(503, "service_unavailable_error", retry_after=True),
    "DEADLINE_EXCEEDED": HttpStatus(504, "timeout_error"),
}


class InvalidParamError(InvalidArgumentError):
    """A bad request field; `param` names it as OpenAI's error object does ("messages[0].role")."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PayloadTooLargeError(InvalidArgumentError):
    """A request body over the server's message size limit (HTTP 413)."""


def status_of(code: str) -> HttpStatus:
    return STATUS.get(code, STATUS["INTERNAL"])


def error_object(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON for gRPC status `code` (also sent as a stream's last event)."""
    return {"error": {"message": message, "type": status_of(code).type, "param": param, "code": code.lower()}}


def error_of(exc: DeltaServeError) -> dict[str, Any]:
    return error_object(exc.grpc_code, str(exc), exc.param if isinstance(exc, InvalidParamError) else None)


def error_response(exc: DeltaServeError) -> JSONResponse:
    """The HTTP response for `exc`: status from STATUS, OpenAI's body, Retry-After when it applies."""
    st = status_of(exc.grpc_code)
    status = 413 if isinstance(exc, PayloadTooLargeError) else st.status
    seconds = retry_after_seconds(exc) or RETRY_AFTER_SECONDS  # a quota's own wait, else the default
    headers = {"Retry-After": str(seconds)} if st.retry_after else None
    return JSONResponse(error_of(exc), status_code=status, headers=headers)
