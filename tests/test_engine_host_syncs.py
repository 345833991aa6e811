"""Host syncs in one engine step, counted on the CPU by instrumenting the calls that would wait
for a device: Tensor.item / tolist / cpu / numpy and the implicit conversions (bool, int,
float, index) of a tensor. On CUDA each of these blocks until the device has caught up.

A plain-greedy step must make exactly one: the copy of the sampled tokens (greedy picks and
finiteness, one `.tolist()`), whatever the mix of prefill, decode and tenants."""

from __future__ import annotations

import traceback
from contextlib import contextmanager

import pytest
import torch
from deltaserve.engine.types import GenerationRequest
from test_engine_support import engine, greedy, load_delta, make_delta, random_prompts

PICKS = "tolist in llm_engine.py (_pick)"  # the sampled tokens: the step's one necessary sync
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def count_host_syncs(log: list[str]):
    """Record (method, caller) for every call of SYNC_METHODS on a torch.Tensor inside the block."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            frame = traceback.extract_stack(limit=2)[0]  # the caller
            log.append(f"{name} in {frame.filename.rsplit('/', 1)[-1]} ({frame.name})")
            return fn(self, *args, **kwargs)

        return counted

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        yield log
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def test_counter_sees_every_instrumented_call():
    log: list[str] = []
    t = torch.tensor([1.5])
    with count_host_syncs(log):
        t.item(), t.tolist(), t.cpu(), t.numpy(), bool(t), float(t), int(t)
    assert len(log) == 7


@pytest.fixture(scope="module")
def eng(tiny_dir, tmp_path_factory):
    base, ft = tiny_dir("llama")
    path = make_delta(base, ft, tmp_path_factory.mktemp("syncs") / "d.delta")
    e = engine(base, max_running=8, threads=1)
    e.load_delta("a", load_delta(base, path))
    e.load_delta("b", load_delta(base, path))
    return e


def _add(eng, tag: str, tenants: list[str | None], lengths: list[int]) -> None:
    for i, (t, p) in enumerate(zip(tenants, random_prompts(lengths, seed=len(tag)), strict=True)):
        eng.add_request(GenerationRequest(f"{tag}{i}", tuple(p), greedy(4), delta_key=t))


def _step_syncs(eng) -> tuple[list[str], int]:
    log: list[str] = []
    with count_host_syncs(log):
        outs = eng.step()
    return log, len(outs)


def _drain(eng) -> None:
    while eng.has_unfinished():
        eng.step()


def test_plain_greedy_steps_make_one_host_sync(eng):
    _add(eng, "r", [None, "a", "b", "a"], [5, 7, 3, 6])
    log, outs = _step_syncs(eng)  # prefill of every request (base + two tenants)
    assert outs == 4
    assert log == [PICKS], log
    for _ in range(2):  # decode steps, mixed tenants
        log, outs = _step_syncs(eng)
        assert outs == 4
        assert log == [PICKS], log
    _add(eng, "late", ["b"], [9])
    log, outs = _step_syncs(eng)  # a prefill joining running decodes
    assert outs == 5
    assert len(log) == 1 and log[0].startswith("tolist"), log
    _drain(eng)


def test_sampled_rows_add_only_their_logits_copy(eng):
    """Rows that sample on the host bring their logits rows over; still no per-row item()."""
    prompts = random_prompts([4, 6], seed=5)
    eng.add_request(GenerationRequest("s0", tuple(prompts[0]), greedy(3, temperature=0.8, seed=1)))
    eng.add_request(GenerationRequest("s1", tuple(prompts[1]), greedy(3), delta_key="a"))
    _step_syncs(eng)
    log, outs = _step_syncs(eng)
    assert outs == 2
    # the picks copy; on the CPU the sampled row's logits are already host memory (on CUDA one
    # gathered .cpu() of the sampled rows in _pick); the sampler converts host tensors only
    assert log.count(PICKS) == 1
    assert [e for e in log if e != PICKS and "sampler.py" not in e] == [], log
    _drain(eng)
