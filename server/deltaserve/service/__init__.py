"""gRPC service, delta cache, metrics and auth."""
