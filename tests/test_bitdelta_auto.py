"""bitdelta-auto: the knapsack against brute force, the loss-guided plan on a tiny fine-tune, the
codec's files, the compress command line and the engine serving a mixed allocation packed,
equal to transformers on base + decoded delta token for token."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from deltaserve.cli.main import main
from deltaserve.deltas.allocate import AllocateConfig, matrix_cost, plan_allocation, solve_plan
from deltaserve.deltas.codecs import codec_from_header, make_codec
from deltaserve.deltas.codecs.bitdelta_auto import BitDeltaAutoCodec
from deltaserve.deltas.compress import CompressConfig, compress
from deltaserve.deltas.format import read_delta
from deltaserve.deltas.knapsack import lower_hull, solve
from deltaserve.deltas.types import SignDelta, SignPlanesDelta
from deltaserve.engine.types import GenerationRequest
from deltaserve.errors import DeltaFormatError, InvalidArgumentError
from deltaserve.evaluation.codecs import spec_from_label
from deltaserve.tasks.base import Example
from test_engine_support import (
    engine,
    greedy,
    hf_greedy,
    load_delta,
    make_delta,
    merged_dir,
    random_prompts,
    run,
    token_ids,
)

OPTIONS = (0, 1, 2, 3)


def _instance(rng: random.Random, n: int) -> tuple[dict, dict]:
    costs, values = {}, {}
    for j in range(n):
        size = rng.randint(2, 12)
        costs[f"m{j}"] = {b: (1 + b) * size + rng.randint(0, 3) for b in OPTIONS}
        values[f"m{j}"] = {b: rng.uniform(-1.0, 3.0) for b in OPTIONS}
    return costs, values


def _total(choice: dict, table: dict) -> float:
    return sum(table[k][v] for k, v in choice.items())


def _brute_force(costs: dict, values: dict, budget: float) -> float:
    keys = list(costs)
    best = float("inf")
    for pick in itertools.product(OPTIONS, repeat=len(keys)):
        choice = dict(zip(keys, pick, strict=True))
        if _total(choice, costs) <= budget:
            best = min(best, _total(choice, values))
    return best


def test_knapsack_against_brute_force():
    rng = random.Random(0)
    exact_at_breakpoints = 0
    for _ in range(40):
        costs, values = _instance(rng, rng.randint(1, 4))
        hulls = {k: lower_hull([(costs[k][b], values[k][b], b) for b in OPTIONS]) for k in costs}
        segments = sorted(
            ((h[i + 1][1] - h[i][1]) / (h[i + 1][0] - h[i][0]), h[i + 1][0] - h[i][0], h[i][1] - h[i + 1][1])
            for h in hulls.values()
            for i in range(len(h) - 1)
        )
        largest_gain = max((s[2] for s in segments), default=0.0)
        cheapest = sum(min(c.values()) for c in costs.values())
        # breakpoints: every segment taken in order fits exactly (the Lagrangian solutions)
        breakpoints = set(itertools.accumulate((s[1] for s in segments), initial=cheapest))
        previous = float("inf")
        for budget in range(cheapest, sum(max(c.values()) for c in costs.values()) + 2):
            choice = solve(costs, values, budget)
            got, best = _total(choice, values), _brute_force(costs, values, budget)
            assert _total(choice, costs) <= budget
            assert best - 1e-12 <= got <= best + largest_gain + 1e-12
            assert got <= previous + 1e-12  # more budget never raises the total
            previous = got
            if budget in breakpoints:
                assert got == pytest.approx(best, abs=1e-12)
                exact_at_breakpoints += 1
    assert exact_at_breakpoints > 80
    with pytest.raises(InvalidArgumentError, match="over the budget"):
        solve({"m": {0: 10, 1: 20}}, {"m": {0: 1.0, 1: 0.0}}, 9)


def test_lower_hull_drops_dominated_and_concave_options():
    # b = 1 lies above the segment b = 0 -> b = 2; b = 3 costs more than b = 2 for a higher value
    hull = lower_hull([(10, 1.0, 0), (20, 0.9, 1), (30, 0.1, 2), (40, 0.2, 3)])
    assert [p[2] for p in hull] == [0, 2]


def _delta(n: int = 24, k: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, k, generator=g)


@pytest.mark.parametrize("levels", ["mean", "additive"])
def test_codec_encodes_each_matrix_with_its_bits_and_loads_packed(levels):
    codec = make_codec("bitdelta-auto", {"budget_bits_per_weight": 2, "allocation": {"a": 0, "b": 1, "c": 3},
                                         "levels": levels})
    assert codec.params() == {"budget_bits_per_weight": 2.0, "allocation": {"a": 0, "b": 1, "c": 3},
                              "levels": levels}
    again = codec_from_header("bitdelta-auto", json.dumps(codec.params()))
    assert again == codec
    old_header = {"budget_bits_per_weight": 2.0, "allocation": {"a": 0}}  # files written before `levels`
    assert codec_from_header("bitdelta-auto", json.dumps(old_header)).levels == "mean"
    for key, b in codec.allocation.items():
        delta = _delta(seed=b)
        parts = codec.encode(delta, key=key)
        lin = codec.load(parts, 24, 40, key=key, dtype=torch.float32)
        if b == 0:
            ref = make_codec("bitdelta")
            assert set(parts) == {"signs", "scale"} and isinstance(lin, SignDelta)
        else:
            ref = make_codec("bitdelta-mb", {"magnitude_bits": b, "levels": levels})
            assert parts["planes"].shape[0] == b and isinstance(lin, SignPlanesDelta)
            if levels == "additive":
                assert lin.num_planes == 1 + b  # levels linear in the code bits
            else:
                assert 2 <= lin.num_planes <= 2**b
        want = ref.load(ref.encode(delta, key=key), 24, 40, key=key, dtype=torch.float32).decode()
        assert torch.equal(lin.decode(), want)
        assert codec.sign_bytes(parts) == parts["signs"].numel() * 4
    with pytest.raises(InvalidArgumentError, match="compress --codec bitdelta-auto --calib FILE"):
        codec.encode(_delta(), key="d")
    with pytest.raises(DeltaFormatError, match="allocated 3"):  # stored with b = 1, the header says 3
        codec.load(codec.encode(_delta(), key="b"), 24, 40, key="c", dtype=torch.float32)
    with pytest.raises(InvalidArgumentError, match=">= 1"):
        make_codec("bitdelta-auto", {"budget_bits_per_weight": 0.5})
    with pytest.raises(InvalidArgumentError, match="outside"):
        BitDeltaAutoCodec(2.0, {"a": 4})
    with pytest.raises(InvalidArgumentError, match="--levels"):
        BitDeltaAutoCodec(2.0, {"a": 1}, levels="median")


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """(base, fine-tune trained on reversal examples, those examples as a chat calibration file)."""
    from deltaserve.training.config import FinetuneConfig
    from deltaserve.training.trainer import finetune

    base, _ = tiny_dir("llama")
    root = tmp_path_factory.mktemp("auto")
    rng = random.Random(3)
    examples = []
    for _ in range(16):
        words = [f"t{rng.randint(4, 127)}" for _ in range(rng.randint(3, 5))]
        examples.append(Example(" ".join(words), " ".join(reversed(words))))
    ft = root / "ft"
    finetune(base, examples, ft, FinetuneConfig(steps=30, lr=3e-3, batch_size=8), progress=False)
    calib = root / "calib.jsonl"
    lines = [json.dumps({"prompt": e.prompt, "completion": e.answer}) + "\n" for e in examples]
    calib.write_text("".join(lines))
    return base, ft, calib


@pytest.fixture(scope="module")
def plan(trained):
    base, ft, calib = trained
    return plan_allocation(base, ft, AllocateConfig(2.0, calib, samples=16, batch_size=8), progress=False)


def test_plan_respects_the_budget_and_more_budget_never_raises_the_estimate(plan):
    keys = set(plan.numel)
    assert len(keys) == 14  # 2 layers x 7 block linears
    assert set(plan.allocation) == keys and plan.loss == "completion tokens" and plan.samples == 16
    assert json.loads(json.dumps(plan.to_dict())) == plan.to_dict()
    weights = sum(plan.numel.values())
    assert plan.bits_per_weight <= 2.0
    spent = sum(matrix_cost(b, plan.numel[k]) for k, b in plan.allocation.items())
    assert plan.bits_per_weight == pytest.approx(spent / weights)
    estimates = {int(b): e for b, e in plan.estimates.items()}
    assert plan.predicted_estimate == pytest.approx(sum(estimates[b][k] for k, b in plan.allocation.items()))
    for b, e in estimates.items():  # per-matrix entries are the uniform edit's contributions
        assert set(e) == keys and sum(e.values()) == pytest.approx(plan.uniform_estimates[str(b)])
    # the trained fine-tune sits near a minimum: coarser edits cost more loss, estimated and measured
    assert plan.uniform_measured["0"] > plan.uniform_measured["3"] > 0
    assert plan.uniform_estimates["0"] > plan.uniform_estimates["3"]
    assert len(set(plan.allocation.values())) > 1  # a mixed allocation at 2 bits per weight
    assert plan.predicted_estimate <= plan.uniform_estimates["0"]

    previous = float("inf")
    for budget in (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0):
        choice = solve_plan(plan.numel, estimates, budget)
        bits = sum(matrix_cost(b, plan.numel[k]) for k, b in choice.items()) / weights
        predicted = sum(estimates[b][k] for k, b in choice.items())
        assert bits <= budget or set(choice.values()) == {0}  # B = 1: bitdelta's scales on top
        assert predicted <= previous + 1e-12
        previous = predicted
        if budget == 2.0:
            assert choice == plan.allocation
    assert solve_plan(plan.numel, estimates, 1.0) == dict.fromkeys(keys, 0)
    best = {k: min(OPTIONS, key=lambda b, k=k: estimates[b][k]) for k in keys}
    assert solve_plan(plan.numel, estimates, 5.0) == best  # room for every matrix's best choice


def test_planner_config_errors(tmp_path):
    calib = tmp_path / "c.json"
    with pytest.raises(InvalidArgumentError, match=">= 1"):
        AllocateConfig(0.9, calib)
    with pytest.raises(InvalidArgumentError, match="cheapest choice"):
        AllocateConfig(1.5, calib, choices=(1, 2))
    with pytest.raises(InvalidArgumentError, match=r"\[0, 3\]"):
        AllocateConfig(2.0, calib, choices=(0, 4))
    assert AllocateConfig(2.0, calib, choices=(2, 0)).choices == (0, 2)
    assert spec_from_label("bitdelta-auto").options == {"budget_bits_per_weight": 2.0}
    assert spec_from_label("bitdelta-auto-b1.5").options == {"budget_bits_per_weight": 1.5}
    assert spec_from_label("bitdelta-auto-b1.5-additive").options == {"budget_bits_per_weight": 1.5,
                                                                      "levels": "additive"}
    with pytest.raises(InvalidArgumentError, match="--levels"):
        AllocateConfig(2.0, calib, levels="median")
    with pytest.raises(InvalidArgumentError, match=">= 1"):
        spec_from_label("bitdelta-auto-b0.5")


def _ids_calib(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    path.write_text(json.dumps(torch.randint(4, 128, (6, 32), generator=g).tolist()))
    return path


def test_compress_cli_writes_the_plan_and_inspect_reads_it(tiny_dir, tmp_path, capsys):
    base, ft = tiny_dir("llama")
    calib = _ids_calib(tmp_path / "ids.json")
    out = tmp_path / "auto.delta.safetensors"
    common = ["compress", "--base", str(base), "--finetuned", str(ft), "--codec", "bitdelta-auto"]
    flags = ["--calib", str(calib), "--plan-steps", "1", "--plan-seq-len", "32", "--no-progress"]
    rc = main([*common, "--budget-bits-per-weight", "1.5", "--out", str(out), *flags, "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    allocation = report["plan"]["allocation"]
    want_params = {"budget_bits_per_weight": 1.5, "allocation": allocation, "levels": "mean"}
    assert report["codec_params"] == want_params
    assert report["plan"]["bits_per_weight"] <= 1.5 and report["plan"]["loss"] == "every token"
    assert report["plan"]["samples"] == 6 and report["plan"]["steps"] == 1
    enc = read_delta(out)
    assert enc.meta.codec_params["allocation"] == allocation
    assert enc.stats["allocation_plan"]["matrices_per_bits"] == {
        str(b): sum(v == b for v in allocation.values()) for b in OPTIONS
    }
    delta = load_delta(base, out)
    assert set(delta.linears) == set(allocation)
    for key, lin in delta.linears.items():
        b = allocation[key]
        parts = enc.linears[key].parts
        assert ("planes" in parts) == (b > 0)
        if b == 0:
            assert isinstance(lin, SignDelta)
        else:
            assert isinstance(lin, SignPlanesDelta) and lin.num_planes > 1 and parts["planes"].shape[0] == b

    rc = main([*common, "--out", str(tmp_path / "h.delta.safetensors"), *flags])
    text = capsys.readouterr().out
    assert rc == 0 and "bits/weight (budget 2)" in text and "matrices per b: b=0:" in text
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bitdelta-auto" in text and "bits/weight (budget 1.5)" in text
    assert main(["inspect", str(out), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["codec"] == "bitdelta-auto" and described["stats"]["allocation_plan"]["steps"] == 1


def test_compress_cli_errors(tiny_dir, tmp_path, capsys):
    base, ft = tiny_dir("llama")
    calib = _ids_calib(tmp_path / "ids.json")
    common = ["compress", "--base", str(base), "--finetuned", str(ft), "--out", str(tmp_path / "x.delta")]
    cases = [
        (["--codec", "bitdelta-auto"], "give --calib FILE"),
        (["--codec", "bitdelta-auto", "--calib", str(calib), "--budget-bits-per-weight", "0.5"], ">= 1"),
        (["--codec", "bitdelta-auto", "--calib", str(tmp_path / "none.json")], "does not exist"),
        (["--codec", "bitdelta-auto", "--calib", str(calib), "--distill-steps", "3"], "not bitdelta-auto"),
        (["--codec", "bitdelta", "--plan-steps", "2"], "only for --codec bitdelta-auto"),
        (["--codec", "bitdelta", "--budget-bits-per-weight", "2"], "does not take budget_bits_per_weight"),
    ]
    for extra, message in cases:
        assert main([*common, *extra, "--no-progress"]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "x.delta").exists()


def test_mixed_allocation_is_served_packed_and_equals_its_merge(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    keys = sorted(load_delta(base, make_delta(base, ft, tmp_path / "bd.delta")).linears)
    allocation = {k: OPTIONS[i % 4] for i, k in enumerate(keys)}  # every b, in every layer
    path = tmp_path / "auto.delta"
    compress(CompressConfig(base, ft, path, BitDeltaAutoCodec(2.5, allocation), progress=False))
    delta = load_delta(base, path)
    for key, lin in delta.linears.items():
        assert isinstance(lin, SignDelta) if allocation[key] == 0 else isinstance(lin, SignPlanesDelta)
    eng = engine(base, tenant_slots=2)
    eng.load_delta("auto", delta)
    eng.load_delta("bd", load_delta(base, tmp_path / "bd.delta"))
    prompts = random_prompts([6, 9, 3], seed=23)
    reqs = [GenerationRequest(f"{t}{i}", tuple(p), greedy(8), delta_key=t) for t in ("auto", "bd")
            for i, p in enumerate(prompts)]
    outs = run(eng, reqs)  # both tenants in every step: 1-bit pass for both, further planes for auto
    refs = {t: hf_greedy(merged_dir(base, p, tmp_path / f"m-{t}"), prompts, 8)
            for t, p in (("auto", path), ("bd", tmp_path / "bd.delta"))}
    assert refs["auto"] != refs["bd"]  # the extra bits change what the tenant says
    for tenant, ref in refs.items():
        for i, want in enumerate(ref):
            assert token_ids(outs[f"{tenant}{i}"]) == want, (tenant, i)


def test_eval_row_plans_on_the_eval_calibration_file(tiny_dir, tmp_path):
    base, ft = tiny_dir("llama")
    g = torch.Generator().manual_seed(4)
    prompts = [" ".join(f"t{int(i)}" for i in torch.randint(4, 128, (5,), generator=g)) for _ in range(4)]
    evalset = tmp_path / "set.jsonl"
    evalset.write_text("".join(json.dumps({"prompt": p, "answer": "t4 t5"}) + "\n" for p in prompts))
    out = tmp_path / "out"
    argv = ["eval", "--base", str(base), "--tenant", f"t={ft}", "--eval-set", f"t={evalset}", "--n", "4",
            "--logit-n", "2", "--max-new-tokens", "2", "--codecs",
            "bitdelta-auto-b1.5,bitdelta-auto,bitdelta-auto-additive", "--out", str(out), "--no-progress",
            "--json"]
    assert main(argv) == 0
    rows = {r["codec"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert list(rows) == ["base", "raw", "bitdelta-auto-b1.5", "bitdelta-auto", "bitdelta-auto-additive"]
    written = {label: read_delta(out / "deltas" / "t" / f"{label}.delta.safetensors")
               for label in ("bitdelta-auto-b1.5", "bitdelta-auto", "bitdelta-auto-additive")}
    additive = written.pop("bitdelta-auto-additive")
    # planned on the edits it makes: the uniform edits were encoded with additive levels too
    assert additive.meta.codec_params["levels"] == "additive"
    assert additive.stats["allocation_plan"]["levels"] == "additive"
    assert written["bitdelta-auto"].meta.codec_params["levels"] == "mean"
    assert written["bitdelta-auto-b1.5"].meta.codec_params["budget_bits_per_weight"] == 1.5
    assert written["bitdelta-auto"].meta.codec_params["budget_bits_per_weight"] == 2.0
    for enc in written.values():
        assert len(enc.meta.codec_params["allocation"]) == 14
        assert enc.stats["allocation_plan"]["samples"] >= 1
        # planned on the fine-tune's objective: the answers' tokens, not the prompts' text
        assert enc.stats["allocation_plan"]["loss"] == "completion tokens"
    assert rows["bitdelta-auto-b1.5"]["delta_bytes"] < rows["bitdelta-auto"]["delta_bytes"]
