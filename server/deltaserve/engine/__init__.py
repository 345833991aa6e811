"""Generation engine: scheduler, paged KV, model runner, sampler."""
