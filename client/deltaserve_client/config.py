"""Client configuration: where to connect, how to authenticate, deadlines and retries."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

# gRPC caps maxAttempts at 5 whatever the service config asks for.
_GRPC_MAX_ATTEMPTS = 5


# Metadata key carrying the tenant id on generation calls (proxies hash on it).
TENANT_HEADER = "x-deltaserve-tenant"

@dataclass(frozen=True)
class RetryPolicy:
    """Retry of calls that fail with UNAVAILABLE (server draining, warming up or unreachable).

    Implemented by gRPC's own retry machinery (service config): attempt n waits a random
    time in [0, min(initial_backoff * multiplier**(n-1), max_backoff)] seconds. Streams are
    retried only until their first response arrives. The call's deadline bounds all attempts.
    max_attempts = 1 disables retries.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= _GRPC_MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be in [1, {_GRPC_MAX_ATTEMPTS}], got {self.max_attempts}")
        if not (math.isfinite(self.initial_backoff) and self.initial_backoff > 0):
            raise ValueError("initial_backoff must be a finite number > 0")
        if not (math.isfinite(self.max_backoff) and self.max_backoff >= self.initial_backoff):
            raise ValueError("max_backoff must be finite and >= initial_backoff")
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ValueError("multiplier must be a finite number >= 1")


@dataclass(frozen=True)
class ClientConfig:
    """How a DeltaServeClient / AsyncDeltaServeClient connects.

    target: "host:port" of the server. api_key: sent as "authorization: Bearer <key>"
    metadata on every call when set. timeout: default deadline of each call in seconds
    (a whole stream included); each method also takes its own timeout. tls: use TLS with
    the system roots (else plaintext). max_message_bytes: receive/send limit.
    """

    target: str = "127.0.0.1:50051"
    api_key: str | None = None
    timeout: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls: bool = False
    max_message_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.target or self.target != self.target.strip():
            raise ValueError(f"target must be a non-empty host:port, got {self.target!r}")
        if self.api_key is not None and (not self.api_key or any(c.isspace() for c in self.api_key)):
            raise ValueError("api_key must be non-empty and contain no whitespace")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {self.timeout}")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be >= 1024")

    def metadata(self, tenant: str = "") -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer key when one is configured, and the tenant id as
        TENANT_HEADER so a proxy in front of several replicas can route by tenant affinity."""
        auth = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        return (*auth, (TENANT_HEADER, tenant)) if tenant else auth

    def channel_options(self) -> list[tuple[str, object]]:
        """gRPC channel options: message limits and the UNAVAILABLE retry policy for every method."""
        r = self.retry
        service_config = {
            "methodConfig": [
                {
                    "name": [{}],  # every service and method
                    "retryPolicy": {
                        "maxAttempts": r.max_attempts,
                        "initialBackoff": f"{r.initial_backoff:.6f}s",
                        "maxBackoff": f"{r.max_backoff:.6f}s",
                        "backoffMultiplier": r.multiplier,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
        if r.max_attempts == 1:
            service_config = {"methodConfig": []}
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.enable_retries", 1 if r.max_attempts > 1 else 0),
            ("grpc.service_config", json.dumps(service_config)),
        ]
