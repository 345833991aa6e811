"""Channel construction for the sync and asyncio clients (one place for credentials and options)."""

from __future__ import annotations

import grpc

from .config import ClientConfig


def sync_channel(config: ClientConfig) -> grpc.Channel:
    """A blocking channel to config.target (TLS with system roots when config.tls)."""
    options = config.channel_options()
    if config.tls:
        return grpc.secure_channel(config.target, grpc.ssl_channel_credentials(), options=options)
    return grpc.insecure_channel(config.target, options=options)


def aio_channel(config: ClientConfig) -> grpc.aio.Channel:
    """An asyncio channel to config.target; create it inside the event loop that uses it."""
    options = config.channel_options()
    if config.tls:
        return grpc.aio.secure_channel(config.target, grpc.ssl_channel_credentials(), options=options)
    return grpc.aio.insecure_channel(config.target, options=options)
