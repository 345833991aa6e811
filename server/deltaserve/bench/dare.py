"""DARE deltas served as stored (bitmask + kept values) against a dense and a CSR product.

For each matrix shape, drop rate p and segment length: one tenant's delta applied to its tokens
by (a) `F.linear` over the dense fp32 delta, (b) torch's sparse CSR product (int32 indices, fp32
values), (c) kernels/masked_ops.py over the mask and fp16 values as the file stores them. The
three run interleaved, `repeats` times each, median reported, with each form's resident bytes.
On the CPU the times include the Python call (what the engine pays per tenant segment).

    deltaserve bench dare [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

SHAPES = ((4096, 4096), (576, 1536))  # (K, N)
DROP_RATES = (0.5, 0.9, 0.99)
TOKENS = (1, 16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _forms(k: int, n: int, p: float, seed: int):
    from deltaserve.deltas.packing import pack_bits
    from deltaserve.deltas.types import MaskedDelta

    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, k, generator=g) >= p
    values = (torch.randn(int(keep.sum()), generator=g) * 0.01).to(torch.float16)
    masked = MaskedDelta.build(pack_bits(keep), values, n, k)
    dense = masked.decode()
    with warnings.catch_warnings():  # torch labels sparse CSR "beta"
        warnings.simplefilter("ignore", UserWarning)
        full = dense.to_sparse_csr()  # int64 indices; the engine's CSR form had int32 ones
        index = (full.crow_indices().int(), full.col_indices().int())
        csr = torch.sparse_csr_tensor(*index, full.values(), (n, k))
    return dense, csr, masked


def _nbytes(t: torch.Tensor) -> int:
    if t.layout == torch.sparse_csr:
        return sum(_nbytes(p) for p in (t.values(), t.col_indices(), t.crow_indices()))
    return t.numel() * t.element_size()


def measure(k: int, n: int, p: float, tokens: int, repeats: int) -> dict:
    """Median seconds of each form for one segment of `tokens` tokens, and their bytes."""
    from deltaserve.kernels.masked_ops import masked_delta_matmul

    dense, csr, masked = _forms(k, n, p, seed=k + n)
    x = torch.randn(tokens, k)
    y = torch.zeros(tokens, n)
    fns = {
        "dense": lambda: y.add_(torch.nn.functional.linear(x, dense)),
        "csr": lambda: y.add_((csr @ x.T).T),
        "masked": lambda: masked_delta_matmul(x, y, masked, 0, tokens, 1.0),
    }
    want = x @ dense.T
    for name, fn in fns.items():  # warm up and check
        y.zero_()
        fn()
        if not torch.allclose(y, want, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"{name} differs from the dense product")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    row = {"k": k, "n": n, "p": p, "tokens": tokens}
    for name, t in times.items():
        row[f"{name}_ms"] = round(statistics.median(t) * 1e3, 4)
    sizes = {"dense_mib": _nbytes(dense), "csr_mib": _nbytes(csr), "masked_mib": masked.nbytes()}
    for key, nbytes in sizes.items():
        row[key] = round(nbytes / 2**20, 2)
    row["masked_over_dense"] = round(row["masked_ms"] / row["dense_ms"], 3)
    row["masked_over_csr"] = round(row["masked_ms"] / row["csr_ms"], 3)
    return row


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    shapes = ((256, 384),) if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    cases = [(k, n, p, t) for k, n in shapes for p in DROP_RATES for t in TOKENS]
    progress = tqdm(cases, desc="dare forms", disable=args.json)
    rows = [measure(k, n, p, t, repeats) for k, n, p, t in progress]
    report = {"threads": torch.get_num_threads(), "repeats": repeats, "rows": rows}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"threads {report['threads']}, median of {repeats}")
    print("| K×N | p | tokens | dense ms (MiB) | CSR ms (MiB) | masked ms (MiB) | masked/dense "
          "| masked/CSR |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['k']}×{r['n']} | {r['p']} | {r['tokens']} | {r['dense_ms']} ({r['dense_mib']}) | "
              f"{r['csr_ms']} ({r['csr_mib']}) | {r['masked_ms']} ({r['masked_mib']}) | "
              f"{r['masked_over_dense']} | {r['masked_over_csr']} |")
    sys.stdout.flush()
    return 0
