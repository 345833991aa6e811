"""The one error type the client raises: a gRPC status code name and its message."""

from __future__ import annotations

from collections.abc import Iterable

import grpc


class DeltaServeClientError(Exception):
    """A failed call. code is the gRPC status code name (e.g. "NOT_FOUND"), message the server's text.

    str(error) is "<CODE>: <message>", the line the CLI prints. retry_after: the seconds the
    server asked to wait before retrying (its `retry-after` trailing metadata, sent with
    RESOURCE_EXHAUSTED and UNAVAILABLE), else None.
    """

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> DeltaServeClientError:
        """Convert a grpc.RpcError (sync) or grpc.aio.AioRpcError (async) raised by a call."""
        if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
            code = error.code()
            return cls(
                code.name if code is not None else "UNKNOWN",
                error.details() or "",
                _retry_after(error.trailing_metadata()),
            )
        return cls("UNKNOWN", str(error))


def _retry_after(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    for key, value in metadata or ():
        if key == "retry-after":
            try:
                return float(value.decode() if isinstance(value, bytes) else value)
            except ValueError:
                return None
    return None
