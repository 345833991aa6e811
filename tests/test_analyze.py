"""`deltaserve analyze`: the Riemann-sum estimate of an edit's loss change on tiny models.

The estimate is checked against the loss change it approximates (finite difference of two
loss evaluations, fp64), its error against the Riemann sum's known 1/C rate, categories of
edits whose sign is known by construction, per-matrix shares, the edits against the
project's own merge (what a tenant is served), and the command line.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from deltaserve.analysis.calib import calib_batches
from deltaserve.analysis.edits import EditSpec, edit_directions, parse_edits
from deltaserve.analysis.report import layer_of, spearman
from deltaserve.analysis.riemann import (
    COMPETITIVE,
    DECREASED,
    IMPROVED,
    batch_nll,
    classify,
    mean_loss,
    riemann_estimate,
    shares,
)
from deltaserve.cli.main import main
from deltaserve.errors import InvalidArgumentError
from deltaserve.evaluation.codecs import spec_from_label
from deltaserve.tasks.base import Example
from transformers import AutoModelForCausalLM, AutoTokenizer


def _examples(n: int, seed: int = 3) -> list[Example]:
    """Reverse 3-5 random tiny-vocabulary tokens (t4..t127)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [f"t{rng.randint(4, 127)}" for _ in range(rng.randint(3, 5))]
        out.append(Example(" ".join(words), " ".join(reversed(words))))
    return out


def _write_calib(path, examples):
    lines = [json.dumps({"prompt": e.prompt, "completion": e.answer}) + "\n" for e in examples]
    path.write_text("".join(lines))
    return path


def _model(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _linears(model) -> list[str]:
    return [n for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]


def _random_edit(model, scale: float, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    shape = {n: params[n].shape for n in _linears(model)}
    return {n: torch.randn(s, generator=g, dtype=params[n].dtype) * scale for n, s in shape.items()}


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """(base, fine-tune trained on the calibration examples, calibration file)."""
    from deltaserve.training.config import FinetuneConfig
    from deltaserve.training.trainer import finetune

    base, _ = tiny_dir("llama")
    root = tmp_path_factory.mktemp("analyze")
    examples = _examples(16)
    ft = root / "ft"
    finetune(base, examples, ft, FinetuneConfig(steps=30, lr=3e-3, batch_size=8), progress=False)
    return base, ft, _write_calib(root / "calib.jsonl", examples)


def test_estimate_matches_finite_difference_and_converges_as_1_over_c(tiny_dir):
    _, ft = tiny_dir("llama")
    model = _model(ft, torch.float64)
    tok = AutoTokenizer.from_pretrained(ft)
    batches = calib_batches(tok, _examples(8), batch_size=3)  # 3 batches: accumulation is exercised

    # a small edit: the second-order term is tiny, C = 5 is already within 1% of the finite difference
    small = _random_edit(model, 1e-4)
    r = riemann_estimate(model, small, batches, steps=5)
    with torch.no_grad():  # finite difference by hand: L(W + ΔW̃) - L(W) with the edit added
        params = dict(model.named_parameters())
        for n, d in small.items():
            params[n].add_(d)
        edited = mean_loss(model, batches)
        for n, d in small.items():
            params[n].sub_(d)
    assert r.loss_post == pytest.approx(mean_loss(model, batches), abs=1e-12)  # model restored
    fd = edited - r.loss_post
    assert abs(fd) > 1e-6
    assert r.measured == pytest.approx(fd, rel=1e-9)
    assert r.estimate == pytest.approx(fd, rel=1e-2)

    # a larger edit: the right Riemann sum's error is (g(1) - g(0)) / (2C) + O(1/C^2)
    big = _random_edit(model, 1e-2)
    runs = {c: riemann_estimate(model, big, batches, steps=c) for c in (1, 5, 20, 80)}
    truth = runs[80].measured
    assert all(x.measured == pytest.approx(truth, rel=1e-9) for x in runs.values())
    err = {c: abs(x.estimate - truth) for c, x in runs.items()}
    assert err[1] > err[5] > err[20] > err[80]
    assert 3.0 < err[5] / err[20] < 5.5  # ~4: first order in 1/C
    g0, g1 = runs[80].integrand[0], runs[80].integrand[-1]  # g(1/80) ~ g(0)
    for c in (5, 20):
        predicted = (g1 - g0) / (2 * c)
        assert runs[c].estimate - truth == pytest.approx(predicted, rel=0.1)
    assert err[80] < 0.3 * err[20] and err[80] < 2e-2 * abs(truth)


def test_categories_of_constructed_edits(trained, tiny_dir):
    base, ft, _ = trained
    model = _model(ft)
    tok = AutoTokenizer.from_pretrained(ft)
    batches = calib_batches(tok, _examples(16), batch_size=8)
    loss_post = mean_loss(model, batches)
    tau = 0.02 * loss_post

    zero = riemann_estimate(model, {}, batches, steps=5)
    assert zero.estimate == 0.0 and zero.measured == 0.0
    assert classify(zero.estimate, tau) == COMPETITIVE

    # back along the fine-tune direction: alpha 0.2 undoes most of what training did
    post = dict(model.named_parameters())
    back = edit_directions(base, ft, post, EditSpec("alpha=0.2", None, 0.2))
    assert set(back) == set(_linears(model))  # training touched only the block linears
    r = riemann_estimate(model, back, batches, steps=5)
    assert r.measured > 10 * tau
    assert classify(r.estimate, tau) == DECREASED

    # a step along the negative gradient of the calibration loss, from a fine-tune not trained on
    # it (the trained one sits so near a minimum that no gradient step gains much more than tau)
    _, other = tiny_dir("llama")
    model = _model(other)
    post = dict(model.named_parameters())
    loss_post = mean_loss(model, batches)
    tau = 0.02 * loss_post
    names = _linears(model)
    for n in names:
        post[n].requires_grad_(True)
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for b in batches:
        (batch_nll(model, b) / total).backward()
    grads = {n: post[n].grad.detach().clone() for n in names}
    for n in names:
        post[n].grad = None
        post[n].requires_grad_(False)
    gnorm2 = sum(float((g**2).sum()) for g in grads.values())
    eta = 0.1 * loss_post / gnorm2  # first-order decrease: 10% of L(post), i.e. 5 tau
    r = riemann_estimate(model, {n: -eta * g for n, g in grads.items()}, batches, steps=5)
    assert r.integrand[0] < 0  # downhill from the first point on
    assert r.measured < -tau
    assert classify(r.estimate, tau) == IMPROVED
    assert classify(0.5 * tau, tau) == COMPETITIVE and classify(-tau, tau) == COMPETITIVE


def test_shares_sum_to_one_and_one_matrix_edit_owns_its_share(tiny_dir):
    base, ft = tiny_dir("llama")
    model = _model(ft)
    tok = AutoTokenizer.from_pretrained(ft)
    batches = calib_batches(tok, _examples(8), batch_size=4)
    post = dict(model.named_parameters())
    dirs = edit_directions(base, ft, post, EditSpec("bitdelta", spec_from_label("bitdelta")))
    r = riemann_estimate(model, dirs, batches, steps=3)
    s = shares(r.contributions)
    assert set(s) == set(_linears(model))
    assert sum(s.values()) == pytest.approx(1.0, abs=1e-9)
    assert sum(r.contributions.values()) == pytest.approx(r.estimate, rel=1e-9)
    assert len({round(v, 6) for v in s.values()}) > 5  # real per-matrix values, not a constant

    target = "model.layers.1.mlp.down_proj.weight"
    one = {n: torch.zeros_like(d) for n, d in dirs.items()}
    one[target] = dirs[target] * 4
    r1 = riemann_estimate(model, one, batches, steps=3)
    s1 = shares(r1.contributions)
    assert r1.estimate != 0
    assert s1[target] == pytest.approx(1.0, abs=1e-12)
    assert all(v == 0 for n, v in s1.items() if n != target)
    assert layer_of(target) == "L1" and layer_of("model.embed_tokens.weight") == "embed_tokens"


def test_codec_edits_are_what_a_tenant_is_served(tiny_dir, tmp_path):
    """ΔW̃ of a codec row at alpha = merge(base, compressed delta, alpha) - fine-tune."""
    from deltaserve.deltas.codecs import make_codec
    from deltaserve.deltas.compress import CompressConfig, compress
    from deltaserve.deltas.load import load_tenant_delta
    from deltaserve.deltas.merge import merge_state_dict
    from deltaserve.models.checkpoint import load_state_dict

    base, ft = tiny_dir("llama", dense=True)
    model = _model(ft)
    post = dict(model.named_parameters())
    base_sd = load_state_dict(base, dtype=torch.float32)
    for label, alpha in (("dare-p0.5", 1.0), ("bitdelta-mb1", 1.5)):
        spec = spec_from_label(label)
        path = tmp_path / f"{label}.delta.safetensors"
        compress(CompressConfig(base, ft, path, make_codec(spec.codec, spec.options), progress=False))
        delta = load_tenant_delta(path, base_fingerprint=None, base_config=None)
        merged = merge_state_dict(base_sd, delta, alpha)
        dirs = edit_directions(base, ft, post, EditSpec(label, spec, alpha))
        assert "model.embed_tokens.weight" in dirs if alpha != 1 else "model.embed_tokens.weight" not in dirs
        for name, d in dirs.items():
            torch.testing.assert_close(d, merged[name] - post[name].detach(), rtol=0, atol=1e-6)
        changed = {n for n in merged if not torch.equal(merged[n], post.get(n, merged[n]))}
        assert {n for n in changed if n in post} - set(dirs) == set()


def test_tied_embedding_edit_reaches_lm_head(tiny_dir):
    """An alpha edit of a tied model's embedding changes lm_head too: the parametrised path's
    L(edited) equals the loss of the model with the edit added, and the estimate converges."""
    base, ft = tiny_dir("llama-tied", dense=True)
    model = _model(ft, torch.float64)
    tok = AutoTokenizer.from_pretrained(ft)
    batches = calib_batches(tok, _examples(6), batch_size=3)
    post = dict(model.named_parameters())
    dirs = {k: v.double() for k, v in edit_directions(base, ft, post, EditSpec("a", None, 1.3)).items()}
    assert "model.embed_tokens.weight" in dirs and "lm_head.weight" not in post
    r = riemann_estimate(model, dirs, batches, steps=50)
    with torch.no_grad():
        for n, d in dirs.items():
            post[n].add_(d)
        edited = mean_loss(model, batches)
        for n, d in dirs.items():
            post[n].sub_(d)
    assert r.loss_edited == pytest.approx(edited, rel=1e-10)
    assert r.estimate == pytest.approx(r.measured, rel=0.05)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after the analysis


def test_edit_and_label_parsing():
    assert spec_from_label("dare-p0.5").options == {"drop_rate": 0.5, "k": 0.0}
    assert spec_from_label("dare-p0.9-k0.5").label == "dare-p0.9-k0.5"
    assert spec_from_label("lowrank-r8").options == {"rank": 8}
    assert spec_from_label("bitdelta-mb3").options == {"magnitude_bits": 3}
    assert spec_from_label("bitdelta-mb2-additive").options == {"magnitude_bits": 2, "levels": "additive"}
    assert spec_from_label("dare").options == {}
    with pytest.raises(InvalidArgumentError, match="drop-rate"):
        spec_from_label("dare-p1.5")
    with pytest.raises(InvalidArgumentError, match="unknown codec row"):
        spec_from_label("zip")
    edits = parse_edits("bitdelta@1.5,lowrank-r4", [1.5, 0.5])
    assert [(e.label, e.alpha) for e in edits] == [
        ("bitdelta@1.5", 1.5),
        ("lowrank-r4", 1.0),
        ("alpha=1.5", 1.5),
        ("alpha=0.5", 0.5),
    ]
    assert edits[2].codec is None
    with pytest.raises(InvalidArgumentError, match="nothing to analyse"):
        parse_edits("", [])
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--base", "--finetune", "--codecs", "--alpha", "--steps", "--calib", "--task", "--json"):
        assert flag in out


def test_cli_json_run(trained, tmp_path, capsys):
    base, ft, calib = trained
    md, png = tmp_path / "a.md", tmp_path / "a.png"
    rc = main(
        [
            "analyze", "--base", str(base), "--finetune", str(ft), "--codecs", "raw,bitdelta,dare-p0.5",
            "--alpha", "0.2", "--calib", str(calib), "--examples", "12", "--steps", "2", "--batch-size", "4",
            "--json", "--no-progress", "--markdown", str(md), "--plot", str(png),
        ]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows) == ["raw", "bitdelta", "dare-p0.5", "alpha=0.2"]
    assert res["meta"]["examples"] == 12 and res["meta"]["steps"] == 2
    assert res["meta"]["tau"] == pytest.approx(0.02 * res["meta"]["loss_post"])
    assert rows["raw"]["category"] == COMPETITIVE  # fp32 raw: the fine-tune itself
    assert abs(rows["raw"]["measured"]) < 1e-5
    assert rows["alpha=0.2"]["category"] == DECREASED and rows["alpha=0.2"]["measured"] > 0
    for label in ("bitdelta", "dare-p0.5", "alpha=0.2"):
        r = rows[label]
        assert sum(r["shares"].values()) == pytest.approx(1.0, abs=1e-6)
        assert sum(r["layer_shares"].values()) == pytest.approx(1.0, abs=1e-6)
        assert len(r["integrand"]) == 2 and len(r["losses"]) == 3
        assert r["losses"][-1] == pytest.approx(r["loss_edited"])
    assert "| dare-p0.5 |" in md.read_text()
    assert png.stat().st_size > 5000


def test_cli_errors_are_one_line(tiny_dir, capsys):
    base, ft = tiny_dir("llama")
    rc = main(["analyze", "--base", str(base), "--finetune", str(ft), "--codecs", "zip", "--task", "add"])
    assert rc == 2
    assert "unknown codec row zip" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_estimate(trained):
    from deltaserve.analysis.calib import CalibSource
    from deltaserve.analysis.run import AnalyzeConfig, analyze

    base, ft, calib = trained
    results = [
        analyze(
            AnalyzeConfig(
                base=base,
                finetuned=ft,
                edits=tuple(parse_edits("bitdelta", [1.5])),
                calib=CalibSource(file=calib, examples=8),
                steps=2,
                batch_size=4,
                gradient_checkpointing=ckpt,
                progress=False,
            )
        )
        for ckpt in (False, True)
    ]
    plain, ckpt = results
    for a, b in zip(plain.rows, ckpt.rows, strict=True):
        assert a.estimate != 0
        assert b.estimate == pytest.approx(a.estimate, rel=1e-5)
        assert b.measured == pytest.approx(a.measured, rel=1e-5, abs=1e-7)
        for n, v in a.contributions.items():
            assert b.contributions[n] == pytest.approx(v, rel=1e-4, abs=1e-9)


def test_batch_loss_equals_transformers_loss(tiny_dir):
    """The summed completion-token loss of one batch equals transformers' own mean loss x tokens."""
    _, ft = tiny_dir("mistral")
    model = _model(ft)
    tok = AutoTokenizer.from_pretrained(ft)
    (batch,) = calib_batches(tok, _examples(5), batch_size=5)
    ref = model(**batch).loss
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        assert float(batch_nll(model, batch)) == pytest.approx(float(ref) * n, rel=1e-5)
