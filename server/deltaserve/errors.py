"""Typed errors shared by every layer.

Each class names the gRPC status code the service maps it to, so the engine,
the delta cache and the command-line tools raise domain errors and only the
gRPC edge (one interceptor) knows about status codes.
"""

from __future__ import annotations

import math

RETRY_AFTER_SECONDS = 1  # the retry-after of a retryable error that knows no better time
RETRYABLE_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})


class DeltaServeError(Exception):
    """Base class of every error deltaserve raises on purpose."""

    grpc_code: str = "INTERNAL"
    retry_after: float | None = None  # seconds until the same call may succeed, when the error knows


class InvalidArgumentError(DeltaServeError, ValueError):
    """Bad parameters: the caller must change the request."""

    grpc_code = "INVALID_ARGUMENT"


class NotFoundError(DeltaServeError, LookupError):
    """An unknown tenant, file or model."""

    grpc_code = "NOT_FOUND"


class FailedPreconditionError(DeltaServeError):
    """A delta built for another base model, or a state that forbids the call."""

    grpc_code = "FAILED_PRECONDITION"


class ResourceExhaustedError(DeltaServeError):
    """Queue full, quota reached or memory budget exhausted."""

    grpc_code = "RESOURCE_EXHAUSTED"


class UnavailableError(DeltaServeError):
    """The server is warming up or draining; retry later or elsewhere."""

    grpc_code = "UNAVAILABLE"


class DeltaFormatError(FailedPreconditionError):
    """A delta file that is truncated, corrupted or of an unknown format."""


class FingerprintMismatchError(FailedPreconditionError):
    """A delta applied to a base model other than the one it was built from."""

    def __init__(self, expected: str, actual: str, what: str = "delta") -> None:
        super().__init__(
            f"{what} was built for base fingerprint {expected}, but the loaded base has {actual}"
        )
        self.expected = expected
        self.actual = actual


class UnsupportedAdapterError(InvalidArgumentError):
    """A LoRA adapter (or a part of one) that cannot be imported as a delta the engine serves exactly
    (DoRA, LoRA outside the decoder-block linears, trained biases, ...)."""


class NonFiniteLogitsError(InvalidArgumentError):
    """A request whose logits left the finite range (e.g. an extreme delta strength): that
    request alone is stopped, every other request of the batch continues."""


def retry_after_seconds(exc: DeltaServeError) -> int | None:
    """The `retry-after` both doors send with `exc` (gRPC trailing metadata, HTTP header): its
    own `retry_after` rounded up to whole seconds (at least 1), RETRY_AFTER_SECONDS for other
    RESOURCE_EXHAUSTED / UNAVAILABLE errors, None for errors that retrying cannot fix."""
    if exc.grpc_code not in RETRYABLE_CODES:
        return None
    if exc.retry_after is None:
        return RETRY_AFTER_SECONDS
    return max(1, math.ceil(exc.retry_after - 1e-9))  # 1e-9: 30.000000000004 s is 30 s


class RequestInternalError(DeltaServeError):
    """A bug hit while serving one request; that request alone fails (INTERNAL)."""

    grpc_code = "INTERNAL"
