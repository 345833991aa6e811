"""Per-request composition through gRPC and the client CLI: the served greedy tokens equal
transformers on the merged base + sum_i alpha_i Delta_i; each tenant must be allowed."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from deltaserve.deltas.fingerprint import base_fingerprint
from deltaserve.deltas.load import load_tenant_delta
from deltaserve.deltas.merge import merge_state_dict
from deltaserve.engine.prompts import encode_prompt
from deltaserve.models.checkpoint import load_state_dict, read_config_dict, save_checkpoint
from deltaserve_client import DeltaServeClientError, SamplingOptions
from deltaserve_client._proto.deltaserve.v1 import generation_pb2, generation_pb2_grpc
from test_engine_support import hf_greedy
from test_service_support import PROMPTS, ServerThread, config_for, models

__all__ = ["models"]  # fixture

NEW = 6
GREEDY = SamplingOptions(max_new_tokens=NEW, ignore_eos=True)
MIX = [("alice", 0.6), ("bob", 0.7)]


@pytest.fixture(scope="module")
def srv(models):
    s = ServerThread(config_for(models, http_port=0))
    yield s
    s.stop()


def _merged(models, parts, out):
    fp, cfg = base_fingerprint(models.base), read_config_dict(models.base)
    state = load_state_dict(models.base)
    for tenant, alpha in parts:
        path = models.store / f"{tenant}.delta.safetensors"
        delta = load_tenant_delta(path, base_fingerprint=fp, base_config=cfg)
        state = merge_state_dict(state, delta, alpha)
    save_checkpoint(state, cfg, out, models.base)
    return out


def _prompt_ids(models, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(encode_prompt(AutoTokenizer.from_pretrained(models.base), {"prompt": prompt}, "request"))


def test_composition_equals_the_merged_model(srv, models, tmp_path):
    ref_dir = _merged(models, MIX, tmp_path / "mix")
    with srv.client() as c:
        for prompt in PROMPTS[:2]:
            got = c.generate(prompt, deltas=MIX, sampling=GREEDY)
            assert list(got.token_ids) == hf_greedy(ref_dir, [_prompt_ids(models, prompt)], NEW)[0]
            alone = c.generate(prompt, tenant="alice", alpha=0.6, sampling=GREEDY)
            assert got.token_ids != alone.token_ids
            # one entry is tenant + alpha; a zero weight drops that delta
            assert c.generate(prompt, deltas=[("alice", 0.6)], sampling=GREEDY).token_ids == alone.token_ids
            zero = c.generate(prompt, deltas=[("alice", 0.6), ("bob", 0.0)], sampling=GREEDY)
            assert zero.token_ids == alone.token_ids
        chunks = list(c.generate_stream(PROMPTS[0], deltas=MIX, sampling=GREEDY))
        assert [t for ch in chunks for t in ch.token_ids] == list(c.generate(PROMPTS[0], deltas=MIX,
                                                                            sampling=GREEDY).token_ids)


def test_composition_errors(srv, models):
    with grpc.insecure_channel(srv.target) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)

        def code(**kw) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(generation_pb2.GenerateRequest(prompt="t5", **kw), timeout=30)
            return err.value.code()

        dw = generation_pb2.DeltaWeight
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        assert code(tenant="alice", deltas=[dw(tenant="bob")]) == invalid
        assert code(deltas=[dw(tenant="alice"), dw(tenant="alice")]) == invalid
        assert code(deltas=[dw(tenant="alice"), dw(tenant="")]) == invalid
        assert code(deltas=[dw(tenant="alice"), dw(tenant="bob", alpha=50)]) == invalid
        assert code(deltas=[dw(tenant=f"t{i}") for i in range(5)]) == invalid
        assert code(deltas=[dw(tenant="alice"), dw(tenant="bad/id")]) == invalid
        assert code(deltas=[dw(tenant="alice"), dw(tenant="nobody")]) == grpc.StatusCode.NOT_FOUND


def test_every_composed_tenant_must_be_allowed(models, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[[key]]\nname = "a"\nkey = "key-aaaa-0001"\ntenants = ["alice"]\n')
    s = ServerThread(config_for(models, keys=keys, host="127.0.0.1"))
    try:
        with s.client(api_key="key-aaaa-0001") as c:
            c.generate("t5", deltas=[("alice", 1.0)], sampling=GREEDY)
            with pytest.raises(DeltaServeClientError) as err:
                c.generate("t5", deltas=[("alice", 0.5), ("bob", 0.5)], sampling=GREEDY)
            assert err.value.code == "PERMISSION_DENIED"
    finally:
        s.stop()


def test_client_cli_generates_a_composition(srv, models, tmp_path):
    ref_dir = _merged(models, MIX, tmp_path / "mix")
    cmd = [sys.executable, "-m", "deltaserve_client.cli", "--target", srv.target, "--json", "generate",
           PROMPTS[1], "--delta", "alice=0.6", "--delta", "bob=0.7", "--max-new-tokens", str(NEW),
           "--ignore-eos"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    want = hf_greedy(ref_dir, [_prompt_ids(models, PROMPTS[1])], NEW)[0]
    assert json.loads(out.stdout)["token_ids"] == want
    bad = subprocess.run([*cmd, "--tenant", "alice"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not both" in bad.stderr


def test_openai_api_composes_extra_deltas_with_the_model(srv):
    import openai

    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{srv.server.http_port}/v1", api_key="none", max_retries=0, timeout=60
    )
    extra = {"alpha": 0.6, "deltas": [{"tenant": "bob", "alpha": 0.7}], "return_token_ids": True,
             "ignore_eos": True}
    got = client.completions.create(model="alice", prompt=PROMPTS[1], max_tokens=NEW, temperature=0,
                                    extra_body=extra)
    with srv.client() as c:
        want = c.generate(PROMPTS[1], deltas=MIX, sampling=GREEDY)
    assert got.choices[0].model_extra["token_ids"] == list(want.token_ids)
    for model, deltas in (("base", [{"tenant": "bob"}]), ("alice", [{"tenant": "alice"}]),
                          ("alice", [{"tenant": "no/such"}])):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model, prompt="t5", max_tokens=2, extra_body={"deltas": deltas})
