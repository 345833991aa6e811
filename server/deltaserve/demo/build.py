"""Building (and caching) the demo's base and tenant deltas.

Layout under the cache directory:
    smollm2-135m-instruct/          the imported embedded base (fp32 HF checkpoint)
    <fingerprint[:12]>/deltas/      the server's delta store for that base:
        <tenant>.delta.safetensors  bitdelta (+ scale distillation) delta
        <tenant>.build.json         what it was built from (a changed recipe rebuilds it)
    <fingerprint[:12]>/finetunes/   fine-tuned checkpoints (deleted after compression
                                    unless kept)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deltaserve.demo.config import DemoConfig, DemoTenant

DELTA_SUFFIX = ".delta.safetensors"
BASE_DIR_NAME = "smollm2-135m-instruct"
CALIB_EXAMPLES = 128

Log = Callable[[str], None]


@dataclass(frozen=True)
class BuiltTenant:
    name: str
    delta: Path
    cached: bool
    finetune_seconds: float
    compress_seconds: float
    heldout_accuracy: float | None


def ensure_base(cfg: DemoConfig, log: Log) -> Path:
    """The base directory: cfg.base when given, else the embedded SmolLM2 imported once into the cache."""
    if cfg.base is not None:
        return cfg.base
    from deltaserve.models.gguf_import import embedded_gguf_path, import_gguf

    out = cfg.cache / BASE_DIR_NAME
    if (out / "config.json").is_file():
        log(f"base: {out} (cached)")
        return out
    log("base: importing the embedded SmolLM2-135M-Instruct GGUF (once) ...")
    report = import_gguf(embedded_gguf_path(), out, verify_tokens=8)
    log(f"base: imported to {out} in {report.seconds:.0f}s (greedy check against transformers passed)")
    return out


def store_dir(cfg: DemoConfig, fingerprint: str) -> Path:
    return cfg.cache / fingerprint[:12] / "deltas"


def recipe(t: DemoTenant, cfg: DemoConfig) -> dict:
    """What a tenant's delta depends on; a cached delta with another recipe is rebuilt."""
    return {
        "task": t.task,
        "finetuned": str(t.finetuned) if t.finetuned else None,
        "steps": t.steps,
        "lr": t.lr,
        "batch_size": t.batch_size,
        "codec": "bitdelta",
        "distill_steps": cfg.distill_steps,
    }


def cached_delta(store: Path, t: DemoTenant, cfg: DemoConfig) -> Path | None:
    """The tenant's delta in the store when it was built with the current recipe."""
    delta, stamp = store / f"{t.name}{DELTA_SUFFIX}", store / f"{t.name}.build.json"
    if delta.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("recipe") == recipe(t, cfg):
                return delta
        except json.JSONDecodeError:
            return None
    return None


def build_tenant(base: Path, store: Path, t: DemoTenant, cfg: DemoConfig, log: Log) -> BuiltTenant:
    """Fine-tune (unless given a fine-tune), compress with bitdelta (+ distillation) into the store."""
    from deltaserve.deltas.codecs import make_codec
    from deltaserve.deltas.compress import CompressConfig, DistillConfig, compress
    from deltaserve.tasks import get_task
    from deltaserve.tasks.prompting import answer_ids, prompt_ids

    hit = cached_delta(store, t, cfg)
    if hit is not None:
        return BuiltTenant(t.name, hit, True, 0.0, 0.0, None)
    store.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps(recipe(t, cfg), sort_keys=True).encode()).hexdigest()[:10]
    ft_dir, ft_seconds, acc, made = t.finetuned, 0.0, None, False
    if ft_dir is None:
        from deltaserve.training.config import FinetuneConfig
        from deltaserve.training.trainer import finetune

        task = get_task(t.task)
        ft_dir = store.parent / "finetunes" / f"{t.name}-{key}"
        if ft_dir.exists():
            shutil.rmtree(ft_dir)
        ftc = FinetuneConfig(steps=t.steps, lr=t.lr, batch_size=t.batch_size)
        log(f"{t.name}: fine-tuning on task {t.task!r} ({t.steps} steps of {t.batch_size}) ...")
        rep = finetune(
            base,
            task.train(t.steps * t.batch_size),
            ft_dir,
            ftc,
            heldout=task.heldout(16),
            progress=False,
            source=f"task:{t.task}",
        )
        ft_seconds, acc, made = rep.seconds, rep.heldout_accuracy, True
        log(
            f"{t.name}: fine-tuned in {rep.seconds:.0f}s, loss {rep.first_loss:.2f} -> {rep.last_loss:.2f}, "
            f"held-out accuracy {acc:.0%}"
        )
    distill = None
    start = time.monotonic()
    if cfg.distill_steps > 0:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        examples = get_task(t.task).train(CALIB_EXAMPLES) if t.task else []
        if examples:
            calib = store.parent / f"{t.name}.calib.jsonl"
            calib.write_text(
                "".join(json.dumps(prompt_ids(tok, e) + answer_ids(tok, e)) + "\n" for e in examples)
            )
            distill = DistillConfig(steps=cfg.distill_steps, calib=calib)
    tmp = store / f".{t.name}.{key}.tmp"
    log(f"{t.name}: compressing with bitdelta" + (" + scale distillation ..." if distill else " ..."))
    compress(
        CompressConfig(
            base=base,
            finetuned=ft_dir,
            out=tmp,
            codec=make_codec("bitdelta"),
            distill=distill,
            progress=False,
        )
    )
    dst = store / f"{t.name}{DELTA_SUFFIX}"
    tmp.replace(dst)
    (store / f"{t.name}.build.json").write_text(json.dumps({"recipe": recipe(t, cfg)}, indent=2))
    if made and not cfg.keep_fine_tunes:
        shutil.rmtree(ft_dir, ignore_errors=True)
    return BuiltTenant(t.name, dst, False, ft_seconds, time.monotonic() - start, acc)
