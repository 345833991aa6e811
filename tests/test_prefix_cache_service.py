"""Prefix caching seen from the clients: usage reports cached prompt tokens (gRPC and the
OpenAI API), the metrics move, and `prefix_cache = false` turns it off."""

from __future__ import annotations

import openai
from deltaserve_client import SamplingOptions
from test_metrics_scrape import scrape, value
from test_service_support import ServerThread, config_for, models

__all__ = ["models"]  # fixture

LONG = " ".join(f"t{i}" for i in range(3, 40))  # a "system prompt" several KV blocks long
GREEDY = SamplingOptions(max_new_tokens=4, ignore_eos=True)


def test_second_request_reuses_the_prefix_and_reports_it(models):
    srv = ServerThread(config_for(models, http_port=0, block_size=4, warm_deltas=False))  # no warm-up request
    try:
        before = scrape(srv.server.metrics_port)
        with srv.client() as c:
            first = c.generate(LONG + " t50", tenant="alice", sampling=GREEDY)
            second = c.generate(LONG + " t51 t52", tenant="alice", sampling=GREEDY)
            other = c.generate(LONG + " t51 t52", tenant="bob", sampling=GREEDY)
        assert first.usage.cached_prompt_tokens == 0
        assert second.usage.cached_prompt_tokens >= 32  # the shared blocks of LONG
        assert second.usage.cached_prompt_tokens < second.usage.prompt_tokens
        assert other.usage.cached_prompt_tokens == 0  # another tenant never reuses alice's KV
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{srv.server.http_port}/v1", api_key="none", max_retries=0, timeout=60
        )
        got = client.completions.create(model="alice", prompt=LONG + " t60", max_tokens=3, temperature=0)
        assert got.usage.prompt_tokens_details.cached_tokens >= 32
        sample = scrape(srv.server.metrics_port)

        def moved(name: str) -> float:
            return value(sample, name) - value(before, name)

        assert moved("deltaserve:prefix_cache_queries_total") == 4
        assert moved("deltaserve:prefix_cache_hits_total") == 2
        assert moved("deltaserve:prefix_cache_hit_tokens_total") >= 64
        assert moved("deltaserve:prefix_cache_query_tokens_total") > 4 * 37
        assert value(sample, "deltaserve:kv_blocks_cached") > 0
        assert value(sample, "deltaserve:kv_blocks_used") == 0
    finally:
        srv.stop()


def test_prefix_cache_off_computes_every_prompt(models):
    srv = ServerThread(config_for(models, block_size=4, prefix_cache=False))
    try:
        with srv.client() as c:
            outs = [c.generate(LONG, tenant="alice", sampling=GREEDY) for _ in range(2)]
        assert [o.usage.cached_prompt_tokens for o in outs] == [0, 0]
        assert outs[0].token_ids == outs[1].token_ids
        sample = scrape(srv.server.metrics_port)
        assert value(sample, "deltaserve:prefix_cache_hits_total") == 0
        assert value(sample, "deltaserve:kv_blocks_cached") == 0
    finally:
        srv.stop()
