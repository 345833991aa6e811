"""Server lifecycle: warming -> serving -> draining, mirrored in grpc.health.v1 and a metric."""

from __future__ import annotations

from enum import StrEnum

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from deltaserve.errors import UnavailableError
from deltaserve.service.metrics import ServerMetrics

SERVICES = ("", "deltaserve.v1.Generation", "deltaserve.v1.Deltas")


class Phase(StrEnum):
    WARMING = "warming"
    SERVING = "serving"
    DRAINING = "draining"


class Lifecycle:
    """Holds the phase; health reports SERVING only in Phase.SERVING."""

    def __init__(self, metrics: ServerMetrics | None = None) -> None:
        self.health = HealthServicer()
        self.phase = Phase.WARMING
        self._metrics = metrics

    async def set(self, phase: Phase) -> None:
        self.phase = phase
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if phase is Phase.SERVING
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in SERVICES:
            await self.health.set(name, status)
        if self._metrics is not None:
            self._metrics.server_state.set(1 if phase is Phase.SERVING else 0)

    def check_accepting(self) -> None:
        """UnavailableError unless new requests are accepted."""
        if self.phase is Phase.WARMING:
            raise UnavailableError("the server is warming up; retry shortly")
        if self.phase is Phase.DRAINING:
            raise UnavailableError("the server is draining for shutdown; retry on another replica")
