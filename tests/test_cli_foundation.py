"""compress / inspect / merge from the command line: the foundation's done-check, end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from deltaserve.cli.main import main


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_compress_inspect_merge_done_check(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base, ft = tiny_dir("llama", dense=True)
    delta = tmp_path / "tenant.delta.safetensors"
    rc, out, _ = _run(capsys, "compress", "--base", base, "--finetuned", ft, "--codec", "bitdelta",
                      "--out", delta, "--json", "--no-progress")
    assert rc == 0 and json.loads(out)["codec"] == "bitdelta"

    rc, out, _ = _run(capsys, "inspect", delta, "--json", "--base", base, "--tensors")
    report = json.loads(out)
    assert rc == 0 and report["base_check"]["matches"] is True
    b, f = report["bytes"], report["finetuned"]
    assert b["sign_bits"] + b["scales"] <= f["linear_fp16_bytes"] / 16 + 4 * report["linears"]
    assert b["scales"] == 4 * report["linears"] == 4 * 14
    assert b["dense_part"] > 0 and report["dense_tensors"] == 7
    assert report["ratios"]["sign_bits_vs_linear_fp16"] <= 1 / 16
    assert len(report["tensors"]) == 2 * 14 + 7
    assert report["resident"]["linears"] == {"1 one-bit plane": 14}
    dense = [t["shape"] for k, t in report["tensors"].items() if k.startswith("dense/")]
    dense_fp32 = sum(4 * math.prod(shape) for shape in dense)
    assert report["resident"]["bytes_fp32"] == b["sign_bits"] + b["scales"] + dense_fp32
    mb = tmp_path / "mb.delta.safetensors"
    rc, _, _ = _run(capsys, "compress", "--base", base, "--finetuned", ft, "--codec", "bitdelta-mb",
                    "--magnitude-bits", "1", "--out", mb, "--json", "--no-progress")
    rc, out, _ = _run(capsys, "inspect", mb, "--json")
    assert rc == 0 and json.loads(out)["resident"]["linears"] == {"2 one-bit planes": 14}  # packed, not dense

    merged = tmp_path / "merged"
    rc, out, _ = _run(capsys, "merge", "--base", base, "--delta", delta, "--out", merged, "--json")
    assert rc == 0 and json.loads(out)["alpha"] == 1.0
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.generate(torch.tensor([[1, 9, 10]]), max_new_tokens=3, do_sample=False).shape == (1, 6)

    other, _ = tiny_dir("mistral")
    rc, out, _ = _run(capsys, "inspect", delta, "--json", "--base", other)
    report = json.loads(out)
    assert rc == 1 and report["base_check"]["matches"] is False
    assert report["base_check"]["fingerprint"] != report["base_fingerprint"]
    rc, out, _ = _run(capsys, "inspect", delta, "--base", other)
    assert rc == 1 and "DOES NOT MATCH" in out


@pytest.mark.parametrize(
    ("codec", "options", "params"),
    [
        ("bitdelta-mb", ["--magnitude-bits", "2"], {"magnitude_bits": 2, "levels": "mean"}),
        (
            "dare",
            ["--drop-rate", "0.8", "--dare-k", "0", "--seed", "4"],
            {"drop_rate": 0.8, "k": 0.0, "seed": 4, "dtype": "float16"},
        ),
        ("lowrank", ["--rank", "4", "--dtype", "float32"], {"rank": 4, "dtype": "float32", "svd": "exact"}),
        ("raw", ["--dtype", "float32"], {"dtype": "float32"}),
    ],
)
def test_other_codecs_from_the_command_line(tiny_dir, tmp_path, capsys, codec, options, params):
    base, ft = tiny_dir("qwen2")
    delta = tmp_path / f"{codec}.delta.safetensors"
    rc, out, _ = _run(capsys, "compress", "--base", base, "--finetuned", ft, "--codec", codec, *options,
                      "--out", delta, "--no-progress")
    assert rc == 0 and f"wrote {delta}" in out
    rc, out, _ = _run(capsys, "inspect", delta)
    assert rc == 0 and codec in out
    rc, out, _ = _run(capsys, "inspect", delta, "--json")
    report = json.loads(out)
    assert report["codec"] == codec and report["codec_params"] == params
    assert report["bytes"]["sign_bits"] == (7680 if codec == "bitdelta-mb" else 0)


def test_errors_exit_non_zero_with_one_line(tiny_dir, tmp_path, capsys):
    base, ft = tiny_dir("llama")
    out_file = tmp_path / "x.delta.safetensors"
    io = ["--base", base, "--finetuned", ft, "--out", out_file]
    cases = [
        ["compress", "--base", tmp_path / "nope", "--finetuned", ft, "--codec", "raw", "--out", out_file],
        ["compress", *io, "--codec", "zip"],
        ["compress", *io, "--codec", "bitdelta", "--rank", "2"],
        ["compress", *io, "--codec", "bitdelta", "--distill-steps", "3"],
        ["compress", *io, "--codec", "dare", "--drop-rate", "1.0"],
        ["inspect", tmp_path / "missing.delta.safetensors"],
        ["merge", "--base", base, "--delta", tmp_path / "missing.delta.safetensors", "--out", tmp_path / "m"],
    ]
    for argv in cases:
        rc, _, err = _run(capsys, *argv)
        assert rc == 2, argv
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and lines[0].startswith(f"deltaserve {argv[0]}: error: "), err
    assert not out_file.exists() and not (tmp_path / "m").exists()
