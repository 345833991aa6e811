"""The OpenAI-compatible HTTP API: a second door onto the same request pipeline as gRPC.

    schemas.py  request bodies (pydantic), OpenAI's fields plus deltaserve's extra ones
    convert.py  body -> GenerateInput; engine outputs -> OpenAI response and chunk objects
    errors.py   typed errors -> HTTP status and OpenAI's error JSON (one table)
    app.py      the ASGI app (FastAPI): routes, keys, metrics, streaming, disconnects
    server.py   uvicorn on the server's own event loop, started and drained with it
"""
