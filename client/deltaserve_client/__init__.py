"""deltaserve client: torch-free gRPC client, CLI and load generator.

from deltaserve_client import ClientConfig, DeltaServeClient
with DeltaServeClient(ClientConfig("127.0.0.1:50051")) as client:
    print(client.generate("Hello", tenant="acme").text)
"""

from .aio import AsyncDeltaServeClient
from .client import DeltaServeClient
from .config import ClientConfig, RetryPolicy
from .errors import DeltaServeClientError
from .types import (
    ChatMessage,
    DeltaInfo,
    FinishReason,
    GenerateResult,
    Limits,
    LoadResult,
    SamplingOptions,
    ServerInfo,
    StreamChunk,
    Tier,
    TokenLogprob,
    UnloadResult,
    Usage,
)

__all__ = [
    "AsyncDeltaServeClient",
    "ChatMessage",
    "ClientConfig",
    "DeltaInfo",
    "DeltaServeClient",
    "DeltaServeClientError",
    "FinishReason",
    "GenerateResult",
    "Limits",
    "LoadResult",
    "RetryPolicy",
    "SamplingOptions",
    "ServerInfo",
    "StreamChunk",
    "Tier",
    "TokenLogprob",
    "UnloadResult",
    "Usage",
]
