"""gRPC server reflection answers on v1 (what grpcurl asks first) and on v1alpha."""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2 as rpb
from test_service_support import models, served

__all__ = ["models", "served"]  # fixtures

OURS = {"deltaserve.v1.Generation", "deltaserve.v1.Deltas", "grpc.health.v1.Health"}


def ask(target: str, version: str, request: rpb.ServerReflectionRequest) -> rpb.ServerReflectionResponse:
    """One reflection call; v1 and v1alpha messages have the same bytes, so v1alpha classes read both."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=rpb.ServerReflectionRequest.SerializeToString,
            response_deserializer=rpb.ServerReflectionResponse.FromString,
        )
        return next(iter(call(iter([request]), timeout=10)))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_and_describes_services(served, version):
    from google.protobuf import descriptor_pb2

    listed = ask(served.target, version, rpb.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert OURS | {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
    for symbol in ("deltaserve.v1.Generation", "grpc.reflection.v1.ServerReflection"):
        found = ask(served.target, version, rpb.ServerReflectionRequest(file_containing_symbol=symbol))
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in found.file_descriptor_response.file_descriptor_proto
        ]
        assert any(symbol.rsplit(".", 1)[0] == f.package for f in files), symbol
