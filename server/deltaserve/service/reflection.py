"""gRPC server reflection, v1 and v1alpha (grpcurl and current tools ask v1 first).

grpcio-reflection implements only `grpc.reflection.v1alpha.ServerReflection`. The v1
service has the same messages with the same field numbers (only the proto package
differs), so one servicer answers both: v1 calls are decoded and encoded with the
v1alpha message classes, which read and write the same bytes. The v1 file descriptor
(the v1alpha one with its package renamed) is added to the default descriptor pool, so
the v1 service can itself be described.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
    old = fdp.package
    fdp.name, fdp.package = V1_FILE, "grpc.reflection.v1"
    for msg in fdp.message_type:
        for f in msg.field:
            if f.type_name.startswith(f".{old}."):
                f.type_name = ".grpc.reflection.v1." + f.type_name[len(old) + 2 :]
    for svc in fdp.service:
        for m in svc.method:
            m.input_type = m.input_type.replace(f".{old}.", ".grpc.reflection.v1.")
            m.output_type = m.output_type.replace(f".{old}.", ".grpc.reflection.v1.")
    pool.AddSerializedFile(fdp.SerializeToString())


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> tuple[str, ...]:
    """Serve reflection v1 and v1alpha for `service_names` (plus both reflection services).
    Returns every name reflection lists."""
    _register_v1_descriptor()
    names = (*service_names, reflection.SERVICE_NAME, V1_SERVICE)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": handler}),)
    )
    return names

