"""Typed errors shared by every layer.

Each class names the gRPC status code the service maps it to, so the engine,
the delta cache and the command-line tools raise domain errors and only the
gRPC edge (one interceptor) knows about status codes.
"""

from __future__ import annotations


class DeltaServeError(Exception):
    """Base class of every error deltaserve raises on purpose."""

    grpc_code: str = "INTERNAL"


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


class NonFiniteLogitsError(InvalidArgumentError):
    """A request whose logits left the finite range (e.g. an extreme delta strength): that
    request alone is stopped, every other request of the batch continues."""


class RequestInternalError(DeltaServeError):
    """A bug hit while serving one request; that request alone fails (INTERNAL)."""

    grpc_code = "INTERNAL"
