"""PNG plots of a serving benchmark result (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def write_plots(result: dict, out: Path) -> list[Path]:
    """throughput.png: generated tok/s vs distinct tenants, per mode, one panel per popularity;
    ttft_cdf.png: TTFT CDF per mode at the largest tenant count with distinct popularity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["modes"]
    pops = result["config"]["popularity"]
    fig, axes = plt.subplots(1, len(pops), figsize=(6 * len(pops), 4), squeeze=False)
    for ax, pop in zip(axes[0], pops, strict=True):
        for mode, m in modes.items():
            pts = [p for p in m.get("points", []) if p["popularity"] in (pop, "-")]
            if mode == "base" and pts:
                xs = result["config"]["tenants"]
                ax.plot(xs, [pts[0]["tok_per_s"]] * len(xs), "k--", label="base (no deltas)")
                continue
            if pts:
                ax.plot([p["n_tenants"] for p in pts], [p["tok_per_s"] for p in pts], "o-", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct active tenants")
        ax.set_ylabel("generated tokens/s")
        ax.set_title(f"throughput, popularity {pop}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths = [out / "throughput.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    n = max(result["config"]["tenants"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, m in modes.items():
        for p in m.get("points", []):
            at_n = mode == "base" or (p["n_tenants"] == n and p["popularity"] == "distinct")
            if at_n and p.get("ttft_ms"):
                xs = p["ttft_ms"]
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=mode)
                break
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT CDF, {n} distinct tenants")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "ttft_cdf.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
