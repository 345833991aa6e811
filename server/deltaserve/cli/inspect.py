"""`deltaserve inspect`: describe a delta file (codec, sizes, ratios, fingerprint).

Exit status 1 when --base is given and its fingerprint differs from the delta's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="delta file (.delta.safetensors)")
    parser.add_argument("--base", type=Path, help="check the delta's fingerprint against this base")
    parser.add_argument("--tensors", action="store_true", help="list every stored tensor")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickle weights (*.bin, *.pt) with torch.load(weights_only=True); refused otherwise",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a summary")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def describe(
    path: Path, base: Path | None = None, tensors: bool = False, allow_pickle: bool = False
) -> dict:
    """The inspect report as a dict (what --json prints)."""
    from deltaserve.deltas.format import DENSE_PREFIX, LINEAR_PREFIX, read_delta_layout

    layout = read_delta_layout(path)
    sign = scale = other = dense = 0
    for key, info in layout.tensors.items():
        if key.startswith(DENSE_PREFIX):
            dense += info.nbytes
        elif key.startswith(LINEAR_PREFIX) and key.endswith("/signs"):
            sign += info.nbytes
        elif key.startswith(LINEAR_PREFIX) and key.endswith("/scale"):
            scale += info.nbytes
        else:
            other += info.nbytes
    linear_params = int(layout.stats.get("finetuned_linear_params") or 0)
    total_params = int(layout.stats.get("finetuned_total_params") or 0)
    fp16_linear, fp16_total = 2 * linear_params, 2 * total_params
    linear_part = sign + scale + other
    m = layout.meta
    report: dict = {
        "file": str(path),
        "format": "deltaserve.delta/1",
        "codec": m.codec,
        "codec_params": m.codec_params,
        "base_fingerprint": m.base_fingerprint,
        "base_architecture": m.base_architecture,
        "base_model_type": layout.base_model_type,
        "created_with": m.created_with,
        "linears": len(layout.linears),
        "dense_tensors": sum(k.startswith(DENSE_PREFIX) for k in layout.tensors),
        "file_bytes": layout.file_bytes,
        "bytes": {
            "sign_bits": sign,
            "scales": scale,
            "codec_other": other,
            "linear_part": linear_part,
            "dense_part": dense,
            "total_tensors": linear_part + dense,
        },
        "finetuned": {
            "linear_params": linear_params,
            "total_params": total_params,
            "linear_fp16_bytes": fp16_linear,
            "model_fp16_bytes": fp16_total,
        },
        "ratios": {
            "sign_bits_vs_linear_fp16": sign / fp16_linear if fp16_linear else None,
            "linear_fp16_over_linear_part": fp16_linear / linear_part if linear_part else None,
            "model_fp16_over_file": fp16_total / layout.file_bytes if layout.file_bytes else None,
        },
        "stats": layout.stats,
        "resident": _resident(path),
    }
    if base is not None:
        from deltaserve.deltas.fingerprint import base_fingerprint

        actual = base_fingerprint(base, allow_pickle=allow_pickle)
        report["base_check"] = {
            "base": str(base),
            "fingerprint": actual,
            "matches": actual == m.base_fingerprint,
        }
    if tensors:
        report["tensors"] = {
            k: {"dtype": v.dtype, "shape": list(v.shape), "bytes": v.nbytes}
            for k, v in sorted(layout.tensors.items())
        }
    return report


def _resident(path: Path) -> dict:
    """What the engine holds for this delta once loaded (fp32 compute dtype): total bytes and
    how its linears are held (1-bit planes, dense, low-rank)."""
    from collections import Counter

    from deltaserve.deltas.load import load_tenant_delta
    from deltaserve.deltas.types import SignDelta, SignPlanesDelta

    delta = load_tenant_delta(path, base_fingerprint=None, base_config=None)
    forms: Counter[str] = Counter()
    for d in delta.linears.values():
        if isinstance(d, SignPlanesDelta):
            forms[f"{d.num_planes} one-bit planes"] += 1
        elif isinstance(d, SignDelta):
            forms["1 one-bit plane"] += 1
        else:
            forms[type(d).__name__.removesuffix("Delta").lower()] += 1
    return {"bytes_fp32": delta.nbytes(), "linears": dict(forms)}


def _print_human(r: dict) -> None:
    from deltaserve.cli.compress_plan import short_params

    b, f, q = r["bytes"], r["finetuned"], r["ratios"]
    print(f"{r['file']}: {r['format']}, {human_bytes(r['file_bytes'])}")
    print(f"  codec            {r['codec']} {json.dumps(short_params(r['codec_params']))}")
    print(f"  base             {r['base_architecture']}  fingerprint {r['base_fingerprint']}")
    print(f"  created with     {r['created_with']}")
    print(f"  linears          {r['linears']} (sign bits {human_bytes(b['sign_bits'])}, "
          f"scales {human_bytes(b['scales'])}, other codec data {human_bytes(b['codec_other'])})")
    print(f"  dense part       {r['dense_tensors']} tensors, {human_bytes(b['dense_part'])}")
    if f["linear_fp16_bytes"]:
        sign_ratio = q["sign_bits_vs_linear_fp16"]
        print(f"  vs fine-tune     linears in fp16 {human_bytes(f['linear_fp16_bytes'])}: "
              f"compression {q['linear_fp16_over_linear_part']:.1f}x"
              + (f" (sign bits = 1/{1 / sign_ratio:.1f} of it)" if sign_ratio else ""))
        print(f"                   whole model in fp16 {human_bytes(f['model_fp16_bytes'])}: "
              f"compression {q['model_fp16_over_file']:.1f}x (whole file)")
    res = r["resident"]
    forms = ", ".join(f"{n} x {form}" for form, n in res["linears"].items())
    print(f"  resident         {human_bytes(res['bytes_fp32'])} in fp32 (linears: {forms})")
    distill = r["stats"].get("distill")
    if distill:
        print(f"  distilled        logit MSE {distill['mse_before']:.6g} -> {distill['mse_after']:.6g}")
    plan = r["stats"].get("allocation_plan")
    if plan:
        print(f"  bit allocation   {plan['bits_per_weight']:.4f} bits/weight "
              f"(budget {plan['budget_bits_per_weight']:g}), predicted dL {plan['predicted_estimate']:+.4g} "
              f"on {plan['samples']} calibration samples")
    check = r.get("base_check")
    if check is not None:
        verdict = "matches" if check["matches"] else "DOES NOT MATCH"
        print(f"  --base           {check['base']}: fingerprint {check['fingerprint']} {verdict}")
    for name, t in (r.get("tensors") or {}).items():
        print(f"    {name:70s} {t['dtype']:5s} {t['shape']!s:18s} {human_bytes(t['bytes'])}")


def run(args: argparse.Namespace) -> int:
    report = describe(args.file, args.base, args.tensors, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_human(report)
    check = report.get("base_check")
    return 1 if check is not None and not check["matches"] else 0
