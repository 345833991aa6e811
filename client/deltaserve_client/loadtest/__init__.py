"""Load generator for deltaserve servers (asyncio gRPC, no torch).

Modules: ``popularity`` (which tenant each request goes to), ``distributions``
(integer length distributions), ``workload`` (the deterministic request plan),
``transport`` (how one request is sent), ``runner`` (closed and open loops),
``stats`` / ``report`` (aggregation and rendering), ``cli`` (the command).
"""
