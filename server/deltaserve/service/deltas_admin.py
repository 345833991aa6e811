"""Deltas servicer (admin): load / unload / list tenants and report server facts."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from deltaserve_client._proto.deltaserve.v1 import deltas_pb2 as dpb
from deltaserve_client._proto.deltaserve.v1 import deltas_pb2_grpc

from deltaserve.service import convert
from deltaserve.service.cache import DeltaCache


@dataclass(frozen=True)
class ServerFacts:
    """What ServerInfo reports; fixed at start-up."""

    base_model: str
    architecture: str
    base_fingerprint: str
    codecs: tuple[str, ...]
    version: str
    device: str
    dtype: str
    max_prompt_tokens: int
    max_new_tokens: int
    max_context_tokens: int
    max_queued_requests: int
    max_batch_requests: int
    max_message_bytes: int


class DeltasServicer(deltas_pb2_grpc.DeltasServicer):
    def __init__(self, cache: DeltaCache, facts: ServerFacts) -> None:
        self._cache = cache
        self._facts = facts

    async def LoadDelta(
        self, request: dpb.LoadDeltaRequest, context: grpc.aio.ServicerContext
    ) -> dpb.LoadDeltaResponse:
        status, replaced = await self._cache.load(
            request.tenant, request.path, pin=request.pin, replace=request.replace
        )
        return dpb.LoadDeltaResponse(delta=convert.delta_info_to_proto(status), replaced=replaced)

    async def UnloadDelta(
        self, request: dpb.UnloadDeltaRequest, context: grpc.aio.ServicerContext
    ) -> dpb.UnloadDeltaResponse:
        freed = await self._cache.unload(request.tenant)
        return dpb.UnloadDeltaResponse(tenant=request.tenant, freed_bytes=freed)

    async def ListDeltas(
        self, request: dpb.ListDeltasRequest, context: grpc.aio.ServicerContext
    ) -> dpb.ListDeltasResponse:
        return dpb.ListDeltasResponse(
            deltas=[convert.delta_info_to_proto(s) for s in self._cache.status(request.tenant or None)]
        )

    async def ServerInfo(
        self, request: dpb.ServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> dpb.ServerInfoResponse:
        f = self._facts
        return dpb.ServerInfoResponse(
            base_model=f.base_model,
            architecture=f.architecture,
            base_fingerprint=f.base_fingerprint,
            codecs=list(f.codecs),
            version=f.version,
            device=f.device,
            dtype=f.dtype,
            limits=dpb.Limits(
                max_prompt_tokens=f.max_prompt_tokens,
                max_new_tokens=f.max_new_tokens,
                max_context_tokens=f.max_context_tokens,
                max_queued_requests=f.max_queued_requests,
                max_batch_requests=f.max_batch_requests,
                max_message_bytes=f.max_message_bytes,
            ),
        )
