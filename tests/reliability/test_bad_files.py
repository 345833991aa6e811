"""Bad delta files through LoadDelta: truncated at many offsets, bit flips everywhere, a foreign
base, wrong shapes. Each is refused with a documented code and leaves the cache as it was;
a flip that the format cannot notice (header padding, an informational string) must still
serve exactly the original tenant."""

from __future__ import annotations

import json
import random
import shutil
import struct
import time

import pytest
from deltaserve_client import DeltaServeClientError, SamplingOptions
from test_service_support import PROMPTS, ServerThread, config_for, models

__all__ = ["models"]  # fixture

REFUSED = {"FAILED_PRECONDITION", "INVALID_ARGUMENT", "NOT_FOUND"}


def _edit_header(raw: bytes, edit) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def _swap_shape(h: dict) -> None:
    shapes = json.loads(h["__metadata__"]["linears"])
    module = next(m for m, (n, k) in shapes.items() if n != k)
    shapes[module] = shapes[module][::-1]
    h["__metadata__"]["linears"] = json.dumps(shapes)


@pytest.mark.slow
def test_bad_files_are_refused_and_change_nothing(models, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    good = (models.store / "alice.delta.safetensors").read_bytes()
    shutil.copy(models.store / "alice.delta.safetensors", store)
    shutil.copy(models.store / "other" / "foreign.delta.safetensors", store / "foreign.delta.safetensors")
    rng = random.Random(5)
    n_header = 8 + struct.unpack("<Q", good[:8])[0]
    cases: dict[str, bytes] = {}
    for i, cut in enumerate(
        sorted(
            {0, 1, 7, 8, 9, n_header - 1, n_header, len(good) - 1}
            | {rng.randrange(len(good)) for _ in range(40)}
        )
    ):
        cases[f"trunc{i}"] = good[:cut]
    for i in range(120):  # a third in the header, the rest in tensor data
        pos = rng.randrange(n_header) if i % 3 == 0 else rng.randrange(n_header, len(good))
        data = bytearray(good)
        data[pos] ^= 1 << rng.randrange(8)
        cases[f"flip{i}"] = bytes(data)
    cases["shape"] = _edit_header(good, _swap_shape)
    cases["empty"] = b""
    cases["text"] = b"not a delta file at all\n" * 10
    for name, data in cases.items():
        (store / f"{name}.bin").write_bytes(data)
    srv = ServerThread(config_for(models, deltas=store))
    outcomes: dict[str, int] = {}
    try:
        with srv.client() as c:
            sampling = SamplingOptions(max_new_tokens=6, ignore_eos=True)
            want = list(c.generate(PROMPTS[2], tenant="alice", sampling=sampling).token_ids)
            before = sorted((d.tenant, d.version, d.error) for d in c.list_deltas())
            t0 = time.monotonic()
            for name in [*cases, "foreign"]:
                path = "foreign.delta.safetensors" if name == "foreign" else f"{name}.bin"
                try:
                    c.load_delta("victim", path)
                except DeltaServeClientError as exc:
                    assert exc.code in REFUSED, (name, exc)
                    if name in ("foreign", "shape") or name.startswith("trunc"):
                        assert exc.code == "FAILED_PRECONDITION", (name, exc)
                    outcomes[exc.code] = outcomes.get(exc.code, 0) + 1
                    assert sorted((d.tenant, d.version, d.error) for d in c.list_deltas()) == before
                    continue
                # accepted: the flip hit bytes the format does not depend on; it must serve alice
                assert name.startswith("flip"), name
                got = list(c.generate(PROMPTS[2], tenant="victim", sampling=sampling).token_ids)
                assert got == want, name
                c.unload_delta("victim")
                outcomes["OK"] = outcomes.get("OK", 0) + 1
            seconds = time.monotonic() - t0
            assert list(c.generate(PROMPTS[2], tenant="alice", sampling=sampling).token_ids) == want
        assert srv.metric("deltaserve:delta_cache_entries", tier="device") >= 1
        print(
            f"\nbad files: {len(cases) + 1} loads in {seconds:.1f} s, "
            f"outcomes {dict(sorted(outcomes.items()))}"
        )
    finally:
        srv.stop()
