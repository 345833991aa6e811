"""Serving baselines for `deltaserve bench serve`: the alternatives users would pick instead.

Each baseline implements deltaserve.engine.core.EngineCore (add_request / abort / step /
has_unfinished / requests / stats, load_delta / unload_delta / delta_bytes, tokenizer,
max_model_len, slot_capacity), the interface AsyncEngine drives, so it runs behind the very same
gRPC server, pipeline and delta cache as deltaserve itself:

- ``swap``:   one merged fine-tune resident at a time, swapped in from safetensors on disk
              when the next request's tenant differs; batches only the resident tenant.
- ``merged``: every tenant's merged model resident at once, one engine per tenant.
- ``hf``:     transformers ``generate`` on each tenant's merged checkpoint, loading the
              model per tenant, batched per tenant, the whole output returned at the end.

Tenants are still registered through the delta cache (so unknown tenants get NOT_FOUND
exactly as in deltaserve); the baselines ignore the delta tensors and serve the merged
checkpoint `checkpoints[tenant]` instead ("" = the base model).
"""
