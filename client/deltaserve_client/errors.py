"""The one error type the client raises: a gRPC status code name and its message."""

from __future__ import annotations

import grpc


class DeltaServeClientError(Exception):
    """A failed call. code is the gRPC status code name (e.g. "NOT_FOUND"), message the server's text.

    str(error) is "<CODE>: <message>", the line the CLI prints.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> DeltaServeClientError:
        """Convert a grpc.RpcError (sync) or grpc.aio.AioRpcError (async) raised by a call."""
        if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
            code = error.code()
            return cls(code.name if code is not None else "UNKNOWN", error.details() or "")
        return cls("UNKNOWN", str(error))
