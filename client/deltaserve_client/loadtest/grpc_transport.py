"""Transport over grpc.aio with the deltaserve.v1 stubs.

Every call carries the tenant id as ``x-deltaserve-tenant`` metadata (besides the
request field) so that an HTTP/2 proxy in front of several replicas can route on it
(consistent hashing: a tenant's requests land on the replica that has its delta warm;
see deploy/README.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from deltaserve_client._proto.deltaserve.v1 import (
    deltas_pb2,
    deltas_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)
from deltaserve_client.config import ClientConfig
from deltaserve_client.loadtest.transport import CallError, Chunk, Done
from deltaserve_client.loadtest.workload import LoadRequest


class GrpcTransport:
    """One channel to `target` (host:port of a server or a proxy)."""

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self.target = target
        self._channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self._gen = generation_pb2_grpc.GenerationStub(self._channel)
        self._deltas = deltas_pb2_grpc.DeltasStub(self._channel)
        # bearer key + tenant header, built exactly as the client library does
        self._config = ClientConfig(target, api_key=api_key)

    async def list_tenants(self) -> list[str]:
        try:
            resp = await self._deltas.ListDeltas(
                deltas_pb2.ListDeltasRequest(), metadata=self._config.metadata(), timeout=30.0
            )
        except grpc.aio.AioRpcError as exc:
            raise CallError(exc.code().name, exc.details() or "") from exc
        return sorted({d.tenant for d in resp.deltas})

    @staticmethod
    def _request(req: LoadRequest) -> generation_pb2.GenerateRequest:
        sampling = generation_pb2.SamplingParams(
            max_new_tokens=req.max_new_tokens, temperature=req.temperature
        )
        if req.seed is not None:
            sampling.seed = req.seed
        return generation_pb2.GenerateRequest(
            tenant=req.tenant, prompt=req.prompt, sampling=sampling, request_id=f"load-{req.index}"
        )

    async def generate(
        self, request: LoadRequest, stream: bool, timeout: float
    ) -> AsyncIterator[Chunk | Done]:
        msg = self._request(request)
        md = self._config.metadata(request.tenant)
        try:
            if not stream:
                r = await self._gen.Generate(msg, metadata=md, timeout=timeout)
                n = len(r.token_ids) or r.usage.completion_tokens
                yield Chunk(n)
                yield Done(
                    r.usage.completion_tokens or n,
                    r.usage.prompt_tokens,
                    generation_pb2.FinishReason.Name(r.finish_reason),
                    r.text,
                    r.usage.time_to_first_token_seconds if r.HasField("usage") else None,
                )
                return
            call = self._gen.GenerateStream(msg, metadata=md, timeout=timeout)
            n_seen = 0
            text = []
            async for r in call:
                if r.token_ids:
                    n_seen += len(r.token_ids)
                    yield Chunk(len(r.token_ids))
                text.append(r.text)
                if r.finished:
                    yield Done(
                        r.usage.completion_tokens or n_seen,
                        r.usage.prompt_tokens,
                        generation_pb2.FinishReason.Name(r.finish_reason),
                        "".join(text),
                    )
                    return
            raise CallError("INTERNAL", "stream ended without a final message")
        except grpc.aio.AioRpcError as exc:
            raise CallError(exc.code().name, exc.details() or "") from exc

    async def close(self) -> None:
        await self._channel.close()
