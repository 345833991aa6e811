"""Server configuration: one frozen dataclass, read from TOML or YAML, overridden by flags.

A config file may be flat or grouped in tables ([server], [cache], [limits],
[engine], [metrics]); table names are only for readability and keys are the
field names below. Byte sizes accept integers or strings such as "512MiB".
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field, fields
from pathlib import Path
from typing import Any

from deltaserve.errors import InvalidArgumentError

MODES = ("deltas", "swap")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: per host (engine.config)
LINEAR_BACKENDS = ("auto", "torch", "onednn")
SCHEDULERS = ("vtc", "fcfs")  # admission policies (engine/fair.py, engine/scheduler.py)
LOOPBACK = "127.0.0.1"
DEPRECATED_KEYS = {"max_device_tenants": "tenant_slots"}  # former name -> current name
_SECTIONS = ("server", "cache", "limits", "engine", "metrics", "auth")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | str) -> int:
    """Parse 123, "64MiB", "1.5 GB" into a byte count (>= 0)."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"not a byte size: {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise InvalidArgumentError(f"not a byte size: {value!r} (use e.g. 1048576, 512MiB, 2GB)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 0:
        raise InvalidArgumentError(f"byte size must be >= 0, got {value!r}")
    return n


@dataclass(frozen=True)
class ServerConfig:
    """Everything `deltaserve serve` needs; validated on construction.

    host None means: loopback when there is no keys file, all interfaces with one.
    metrics_host None means: the same address as the gRPC port (`bind_host`), so a server
    reachable from outside (a container, a pod) can also be scraped.
    metrics_port None disables the /metrics endpoint; 0 picks a free port.
    http_port None disables the OpenAI-compatible HTTP API; 0 picks a free port. It binds
    `bind_host`, like gRPC, and checks the same keys.
    tenant_slots: tenant deltas compute-resident at once (the engine's slots; default 8).
    `max_device_tenants` is its former name, still accepted (by the constructor and in files).
    mode "deltas" serves one base + compressed deltas; "swap" is the baseline
    that keeps one merged fine-tune resident at a time (engine chosen by the factory).
    scheduler: which waiting requests the engine admits first when the batch has room. "vtc"
    (the default) gives every tenant a fair share of served tokens (the Virtual Token Counter,
    engine/fair.py): a multi-tenant server exists to share one base among tenants, and under
    "fcfs" (arrival order) one tenant's burst fills the batch and starves the rest. The tokens
    each request gets are the same under both; with a single tenant the order is the same too.
    tenant_weights: tenant -> VTC share weight (> 0; absent tenants 1, "" = base-model
    requests); a weight-2 tenant gets twice the tokens of a weight-1 one while both wait.
    They apply under "vtc" only (kept, unused, under "fcfs", so a flag can switch policies
    without editing the file; the start-up summary says so).
    """

    base: Path
    deltas: Path | None = None
    host: str | None = None
    port: int = 50051
    metrics_host: str | None = None
    metrics_port: int | None = 9400
    http_port: int | None = None
    mode: str = "deltas"
    device: str = "cpu"
    dtype: str = "auto"
    linear_backend: str = "auto"  # base projections: oneDNN prepacked (CPU) or F.linear
    lut_table_bits: int | None = None  # CPU 1-bit lookup tables: 16 (exact), 8 (faster); None = by dtype
    threads: int = 0  # CPU intra-op threads; 0 = chosen online by measured step times
    keys: Path | None = None
    # scheduler / engine
    max_running: int = 16  # requests decoded together (the batch)
    max_tokens_per_step: int | None = None
    kv_blocks: int | None = None
    block_size: int | None = None
    prefix_cache: bool = True  # reuse KV blocks of equal prompt prefixes (same tenant version and alpha)
    scheduler: str = "vtc"
    tenant_weights: dict[str, float] = field(default_factory=dict)
    # delta cache budgets (bytes)
    device_cache_bytes: int = 2 * 2**30
    host_cache_bytes: int = 4 * 2**30
    tenant_slots: int | None = None
    # admission and request limits
    max_queue: int = 256
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 2048
    max_message_bytes: int = 4 * 2**20
    # lifecycle and metrics
    drain_grace_s: float = 30.0
    metrics_max_tenants: int = 100
    warm_deltas: bool = True
    max_device_tenants: InitVar[int | None] = None  # former name of tenant_slots

    def __post_init__(self, max_device_tenants: int | None) -> None:
        if max_device_tenants is not None:
            if self.tenant_slots is not None and self.tenant_slots != max_device_tenants:
                raise InvalidArgumentError(
                    "config: give tenant_slots only (max_device_tenants is its former name)"
                )
            object.__setattr__(self, "tenant_slots", max_device_tenants)

        def req(cond: bool, msg: str) -> None:
            if not cond:
                raise InvalidArgumentError(f"config: {msg}")

        req(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        req(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        req(self.threads >= 0, f"threads must be >= 0 (0 = chosen by measurement), got {self.threads}")
        req(
            self.linear_backend in LINEAR_BACKENDS,
            f"linear_backend must be one of {', '.join(LINEAR_BACKENDS)}, got {self.linear_backend!r}",
        )
        req(self.lut_table_bits in (None, 8, 16),
            f"lut_table_bits must be 8 or 16, got {self.lut_table_bits!r}")
        req(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        req(
            self.metrics_port is None or 0 <= self.metrics_port <= 65535,
            f"metrics_port must be in [0, 65535], got {self.metrics_port}",
        )
        req(
            self.http_port is None or 0 <= self.http_port <= 65535,
            f"http_port must be in [0, 65535], got {self.http_port}",
        )
        req(self.max_running >= 1, "max_running must be >= 1")
        req(
            self.scheduler in SCHEDULERS,
            f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}",
        )
        req(isinstance(self.tenant_weights, Mapping), "tenant_weights must be a table of tenant = weight")
        for tenant, w in self.tenant_weights.items():
            ok = isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w > 0
            req(isinstance(tenant, str) and ok, f"tenant_weights: {tenant!r} needs a weight > 0, got {w!r}")
        object.__setattr__(self, "tenant_weights", {t: float(w) for t, w in self.tenant_weights.items()})
        req(self.max_queue >= 1, "max_queue must be >= 1")
        req(self.max_prompt_tokens >= 1, "max_prompt_tokens must be >= 1")
        req(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        req(self.max_message_bytes >= 1024, "max_message_bytes must be >= 1024")
        req(self.device_cache_bytes >= 0 and self.host_cache_bytes >= 0, "cache budgets must be >= 0")
        req(self.tenant_slots is None or self.tenant_slots >= 1, "tenant_slots must be >= 1")
        req(self.drain_grace_s >= 0, "drain_grace_s must be >= 0")
        req(self.metrics_max_tenants >= 0, "metrics_max_tenants must be >= 0")

    @property
    def bind_host(self) -> str:
        """The address the gRPC port binds: loopback unless keys protect the server."""
        if self.host is not None:
            return self.host
        return "[::]" if self.keys is not None else LOOPBACK

    @property
    def metrics_bind_host(self) -> str:
        """The address /metrics binds: `metrics_host`, else the gRPC port's address."""
        return self.metrics_host if self.metrics_host is not None else self.bind_host

    @classmethod
    def from_sources(cls, file: Path | None = None, **overrides: Any) -> ServerConfig:
        """Build from an optional config file, then `overrides` (None values are ignored)."""
        values: dict[str, Any] = read_config_file(file) if file is not None else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServerConfig:
        known = {f.name for f in fields(cls)} | set(DEPRECATED_KEYS)
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidArgumentError(f"config: unknown keys {unknown}; known keys: {sorted(known)}")
        if "base" not in values:
            raise InvalidArgumentError("config: base (the base model directory) is required")
        out = dict(values)
        for key in ("base", "deltas", "keys"):
            if out.get(key) is not None:
                out[key] = Path(out[key]).expanduser()
        for key in ("device_cache_bytes", "host_cache_bytes", "max_message_bytes"):
            if key in out:
                out[key] = parse_bytes(out[key])
        return cls(**out)


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) config into a flat dict of field values."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read config file {path}: {exc.strerror}") from exc
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise InvalidArgumentError(f"config file {path} is not valid YAML: {exc}") from exc
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgumentError(f"config file {path} is not valid TOML: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidArgumentError(f"config file {path} must hold a mapping")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    base_dir = path.parent
    for key in ("base", "deltas", "keys"):
        if isinstance(flat.get(key), str) and not Path(flat[key]).expanduser().is_absolute():
            flat[key] = str(base_dir / flat[key])  # relative paths are relative to the config file
    return flat
