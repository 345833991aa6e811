"""Tiered tenant-delta cache: device (compute-ready in the engine), host (packed), disk (the store).

Contract:
- Every registered tenant has one *current* version. A request takes a `Lease`
  on it (`async with cache.lease(tenant) as key`), which makes the version
  resident in the engine under `key` and holds a reference until the request ends.
  A referenced or pinned version is never evicted.
- Loads are asynchronous and single-flight: concurrent leases of a cold tenant
  share one load; other tenants keep decoding while the file is read in a thread.
- Device tier: at most `device_bytes` (and `max_device_entries`) of deltas in
  the engine; room is made by evicting least-recently-used unreferenced, unpinned
  versions. A load that cannot fit yet waits for references to drop; one that
  can never fit (larger than the budget minus pinned bytes) raises ResourceExhaustedError.
- Host tier: packed copies kept in RAM (up to `host_bytes`, LRU) so that a
  version evicted from the device comes back without a disk read. The host tier
  is inclusive: a device-resident version may also hold a host copy.
- `load` of a registered tenant from the same file warms (and optionally pins) it;
  from another file it needs replace=True.
- Hot swap: `load(..., replace=True)` makes the new version resident first, then
  switches the current pointer; leases taken before the switch keep the old
  engine key, which is unloaded when its last lease ends. Engine keys are
  "<tenant>@<version>", so the engine never sees two deltas under one key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from deltaserve.deltas.types import DeltaMeta, TenantDelta
from deltaserve.errors import (
    DeltaServeError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from deltaserve.service.metrics import ServerMetrics

DELTA_SUFFIX = ".delta.safetensors"
log = logging.getLogger("deltaserve.cache")
_TENANT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class _Retired(Exception):
    """A version was replaced or unloaded while a load of it waited for room."""


class Tier(StrEnum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


class DeltaSink(Protocol):
    """The engine side of the cache: where compute-ready deltas live."""

    async def load_delta(self, key: str, delta: TenantDelta) -> int:
        """Make `delta` compute-ready under `key`; returns the bytes it occupies there."""
        ...

    async def unload_delta(self, key: str) -> None: ...


@dataclass(frozen=True)
class DeltaSource:
    """How the cache reads delta files: a cheap header check and a full load to host memory."""

    read_meta: Callable[[Path], DeltaMeta]
    load: Callable[[Path], TenantDelta]


@dataclass(frozen=True)
class CacheConfig:
    store: Path | None
    device_bytes: int
    host_bytes: int
    max_device_entries: int | None = None


@dataclass(frozen=True)
class DeltaStatus:
    """One tenant's cache state (what ListDeltas reports)."""

    tenant: str
    tier: Tier
    bytes: int
    pinned: bool
    in_flight: int
    hits: int
    last_used: float | None  # time.time() seconds
    load_seconds: float
    path: str
    codec: str
    version: int
    error: str = ""  # why the tenant cannot be served (its file failed to load); "" when healthy


def validate_tenant_id(tenant: str) -> str:
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
        raise InvalidArgumentError(
            f"invalid tenant id {tenant!r}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.'"
        )
    return tenant


def confine(store: Path | None, rel: str) -> Path:
    """Resolve `rel` inside `store`; refuse absolute paths, '..' escapes and symlinks leaving it."""
    if store is None:
        raise FailedPreconditionError("the server has no delta store (start it with --deltas DIR)")
    if not rel or "\x00" in rel:
        raise InvalidArgumentError("delta path must be a non-empty relative path inside the delta store")
    p = Path(rel)
    if p.is_absolute():
        raise InvalidArgumentError(f"delta path {rel!r} must be relative to the delta store, not absolute")
    root = store.resolve()
    try:
        resolved = (root / p).resolve()
        if not resolved.is_relative_to(root):
            raise InvalidArgumentError(f"delta path {rel!r} leaves the delta store; give a path inside it")
        found = resolved.is_file()
    except RuntimeError:  # Python < 3.13 reports a symlink loop this way
        raise InvalidArgumentError(f"delta path {rel!r} is a symlink loop") from None
    except OSError as exc:  # a name too long, a loop, a permission denied on the way
        raise InvalidArgumentError(f"delta path {rel!r} cannot be opened: {exc.strerror}") from None
    if not found:
        raise NotFoundError(f"no delta file {rel!r} in the delta store")
    return resolved


@dataclass(eq=False)
class _Version:
    tenant: str
    version: int
    path: Path
    rel_path: str
    meta: DeltaMeta
    disk_bytes: int
    pinned: bool = False
    on_device: bool = False
    device_bytes: int = 0
    host: TenantDelta | None = None
    host_bytes: int = 0
    refs: int = 0
    hits: int = 0
    last_used: float | None = None
    last_touch: float = 0.0  # monotonic, for LRU
    load_seconds: float = 0.0
    loading: asyncio.Task | None = None
    retired: bool = False

    @property
    def key(self) -> str:
        return f"{self.tenant}@{self.version}"

    @property
    def tier(self) -> Tier:
        if self.on_device:
            return Tier.DEVICE
        return Tier.HOST if self.host is not None else Tier.DISK


@dataclass(frozen=True)
class Lease:
    """A reference on one tenant version; `key` is what the engine knows it as."""

    tenant: str
    key: str
    version: int
    hit: bool
    held: _Version = field(repr=False, compare=False)


class DeltaCache:
    """See the module doc. Runs on one asyncio loop; file reads go to worker threads."""

    def __init__(
        self,
        config: CacheConfig,
        sink: DeltaSink,
        source: DeltaSource,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.config = config
        self._sink = sink
        self._source = source
        self._metrics = metrics
        self._current: dict[str, _Version] = {}
        self._all: set[_Version] = set()
        self._next_version: dict[str, int] = {}
        self._room = asyncio.Condition()
        self._device_reserved = 0
        self._reserved_entries = 0
        self._admin_lock = asyncio.Lock()
        self._broken: dict[str, tuple[str, str]] = {}  # tenant -> (store-relative path, cause)
        if metrics is not None:
            metrics.cache_budget.labels("device").set(config.device_bytes)
            metrics.cache_budget.labels("host").set(config.host_bytes)
        self._publish()

    # ----- queries -----------------------------------------------------------

    def tenants(self) -> list[str]:
        """Registered, servable tenants (broken ones are listed by `broken`)."""
        return sorted(self._current)

    def broken(self) -> dict[str, str]:
        """Tenants whose file could not be loaded: tenant -> cause."""
        return {t: cause for t, (_, cause) in sorted(self._broken.items())}

    def __contains__(self, tenant: str) -> bool:
        return tenant in self._current

    def tier_bytes(self) -> dict[str, int]:
        return {
            "device": sum(v.device_bytes for v in self._all if v.on_device),
            "host": sum(v.host_bytes for v in self._all if v.host is not None),
            "disk": sum(v.disk_bytes for v in self._current.values()),
        }

    def tier_entries(self) -> dict[str, int]:
        return {
            "device": sum(1 for v in self._all if v.on_device),
            "host": sum(1 for v in self._all if v.host is not None),
            "disk": len(self._current),
        }

    def status(self, tenant: str | None = None) -> list[DeltaStatus]:
        """Every tenant's state, sorted by id (broken tenants included, with their error)."""
        if tenant:
            if tenant in self._broken:
                return [self._broken_status(tenant)]
            if tenant not in self._current:
                raise NotFoundError(f"unknown tenant {tenant!r}")
            versions = [self._current[tenant]]
            out = []
        else:
            versions = [self._current[t] for t in sorted(self._current)]
            out = [self._broken_status(t) for t in self._broken if t not in self._current]
        for v in versions:
            tier = v.tier
            nbytes = {Tier.DEVICE: v.device_bytes, Tier.HOST: v.host_bytes, Tier.DISK: v.disk_bytes}[tier]
            in_flight = sum(o.refs for o in self._all if o.tenant == v.tenant)
            out.append(
                DeltaStatus(
                    v.tenant,
                    tier,
                    nbytes,
                    v.pinned,
                    in_flight,
                    v.hits,
                    v.last_used,
                    v.load_seconds,
                    v.rel_path,
                    v.meta.codec,
                    v.version,
                )
            )
        return sorted(out, key=lambda st: st.tenant)

    def _broken_status(self, tenant: str) -> DeltaStatus:
        rel, cause = self._broken[tenant]
        return DeltaStatus(tenant, Tier.DISK, 0, False, 0, 0, None, 0.0, rel, "", 0, error=cause)

    def _mark_broken(self, tenant: str, rel: str, exc: BaseException, stage: str) -> str:
        """Record that `tenant` cannot be served (its requests get FAILED_PRECONDITION with the cause)."""
        cause = str(exc) if isinstance(exc, DeltaServeError) else f"{type(exc).__name__}: {exc}"
        self._broken[tenant] = (rel, cause)
        log.warning("tenant %s is not served (%s): %s", tenant, stage, cause)
        if self._metrics is not None:
            self._metrics.delta_load_failures.labels(stage).inc()
        self._publish()
        return cause

    # ----- registration --------------------------------------------------------

    def scan_store(self) -> list[str]:
        """Register every `<tenant>.delta.safetensors` directly in the store (disk tier).

        Files whose header is invalid, built for another base or escaping the store
        are skipped; the result lists them as "file: reason" strings for the start-up log.
        """
        store = self.config.store
        if store is None:
            return []
        problems: list[str] = []
        for f in sorted(store.glob(f"*{DELTA_SUFFIX}")):
            tenant = f.name[: -len(DELTA_SUFFIX)]
            if tenant in self._current:
                continue
            try:
                validate_tenant_id(tenant)
            except InvalidArgumentError as exc:
                problems.append(f"{f.name}: {exc}")
                continue
            try:
                path = confine(store, f.name)
                meta = self._source.read_meta(path)
            except Exception as exc:  # a bad file must not stop the others from registering
                problems.append(f"{f.name}: {self._mark_broken(tenant, f.name, exc, 'startup')}")
                continue
            self._current[tenant] = self._register(tenant, path, f.name, meta, pinned=False)
        self._publish()
        return problems

    def _register(self, tenant: str, path: Path, rel: str, meta: DeltaMeta, pinned: bool) -> _Version:
        version = self._next_version.get(tenant, 0) + 1
        self._next_version[tenant] = version
        v = _Version(tenant, version, path, rel, meta, path.stat().st_size, pinned=pinned)
        self._all.add(v)
        return v

    async def warm(self) -> list[str]:
        """Promote registered tenants to the device (then host) while they fit, without evicting.

        A tenant whose file fails to load is taken out of service (see `broken`) and the
        others still warm; returns "file: cause" lines for those.
        """
        problems = []
        for tenant in sorted(self._current):
            v = self._current[tenant]
            try:
                if self._fits_device_now(v.disk_bytes, v):
                    v.refs += 1
                    try:
                        await self._ensure_device(v)
                    finally:
                        await self._release(v)
                elif v.host is None and self._host_used() + v.disk_bytes <= self.config.host_bytes:
                    delta = await asyncio.to_thread(self._source.load, v.path)
                    self._keep_host(v, delta)
            except Exception as exc:  # a bad file must not stop the server or the other tenants
                del self._current[tenant]
                v.retired = True
                await self._free_if_done(v)
                problems.append(f"{v.rel_path}: {self._mark_broken(tenant, v.rel_path, exc, 'startup')}")
        self._publish()
        return problems

    async def load(
        self, tenant: str, rel_path: str, *, pin: bool = False, replace: bool = False
    ) -> tuple[DeltaStatus, bool]:
        """Register and load a tenant (LoadDelta). Returns (status, replaced)."""
        validate_tenant_id(tenant)
        path = confine(self.config.store, rel_path or f"{tenant}{DELTA_SUFFIX}")
        rel = str(path.relative_to(self.config.store.resolve()))
        async with self._admin_lock:
            old = self._current.get(tenant)
            if old is not None and not replace and old.path == path:
                # the same file again (e.g. a tenant registered from the store): warm it, maybe pin it
                old.pinned = old.pinned or pin
                old.refs += 1
                try:
                    await self._ensure_device(old)
                finally:
                    await self._release(old)
                return self.status(tenant)[0], False
            if old is not None and not replace:
                raise FailedPreconditionError(
                    f"tenant {tenant!r} is already loaded (version {old.version}); "
                    "pass replace=true to swap it"
                )
            meta = await asyncio.to_thread(self._source.read_meta, path)
            new = self._register(tenant, path, rel, meta, pinned=pin)
            new.refs += 1  # keeps it from eviction until it is published
            try:
                await self._ensure_device(new)
            except BaseException:
                new.refs -= 1
                await self._drop(new)
                raise
            self._current[tenant] = new
            self._broken.pop(tenant, None)
            new.refs -= 1
            if old is not None:
                old.retired = True
                await self._free_if_done(old)
            self._publish()
            async with self._room:
                self._room.notify_all()
            return self.status(tenant)[0], old is not None

    async def unload(self, tenant: str) -> int:
        """Forget a tenant; returns the bytes freed now (in-flight versions free when they finish)."""
        async with self._admin_lock:
            v = self._current.pop(tenant, None)
            if v is None and self._broken.pop(tenant, None) is not None:
                self._publish()
                return 0
            if v is None:
                raise NotFoundError(f"unknown tenant {tenant!r}")
            freed = (v.device_bytes if v.on_device else 0) + (v.host_bytes if v.host is not None else 0)
            v.retired = True
            await self._free_if_done(v)
            self._publish()
            return freed

    # ----- leases --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, tenant: str) -> AsyncIterator[Lease]:
        """Hold the tenant's current version resident for the duration of the block."""
        lease = await self.acquire(tenant)
        try:
            yield lease
        finally:
            await self.release(lease)

    async def release(self, lease: Lease) -> None:
        """End a lease taken with `acquire` (exactly once)."""
        await self._release(lease.held)

    async def acquire(self, tenant: str) -> Lease:
        """Make the tenant's current version resident and hold it; pair with `release`.

        Cancelling the call (e.g. a deadline) while the delta loads leaves no reference
        behind; the shared load itself continues for the other waiters.
        """
        while True:
            v = self._current.get(tenant)
            if v is None and tenant in self._broken:
                rel, cause = self._broken[tenant]
                raise FailedPreconditionError(
                    f"tenant {tenant!r} cannot be served: its delta file {rel} failed to load: {cause}; "
                    "fix the file and load it again with LoadDelta"
                )
            if v is None:
                raise NotFoundError(
                    f"unknown tenant {tenant!r}: load it with LoadDelta or put {tenant}{DELTA_SUFFIX} "
                    "in the delta store"
                )
            v.refs += 1
            hit = v.on_device
            try:
                if not hit:
                    self._count_miss(v.tier)
                await self._ensure_device(v)
            except _Retired:
                await self._release(v)
                continue  # look up the replacement
            except BaseException:
                await self._release(v)
                raise
            if v.retired:
                await self._release(v)  # replaced or unloaded while we waited: look again
                continue
            v.hits += int(hit)
            if hit and self._metrics is not None:
                self._metrics.cache_hits.inc()
            v.last_used = time.time()
            v.last_touch = time.monotonic()
            return Lease(tenant, v.key, v.version, hit, v)

    async def _release(self, v: _Version) -> None:
        v.refs -= 1
        if v.refs == 0:
            v.last_touch = time.monotonic()
            await self._free_if_done(v)
            async with self._room:
                self._room.notify_all()
            self._publish()

    # ----- tier moves ------------------------------------------------------------

    async def _ensure_device(self, v: _Version) -> None:
        while not v.on_device:
            if v.loading is None:
                v.loading = asyncio.create_task(self._promote(v))
            task = v.loading
            await asyncio.shield(task)

    async def _promote(self, v: _Version) -> None:
        """Disk/host -> device; the single in-flight load of this version."""
        t0 = time.monotonic()
        source = v.tier
        try:
            delta = v.host if v.host is not None else await asyncio.to_thread(self._source.load, v.path)
            need = delta.nbytes()
            await self._reserve_device(need, v)
            try:
                resident = await self._sink.load_delta(v.key, delta)
            finally:
                self._device_reserved -= need
                self._reserved_entries -= 1
            v.on_device = True
            v.device_bytes = resident
            if v.host is None:
                self._keep_host(v, delta)
            v.load_seconds = time.monotonic() - t0
            if self._metrics is not None:
                self._metrics.delta_load.labels(source.value).observe(v.load_seconds)
        finally:
            v.loading = None
            self._publish()

    async def _reserve_device(self, need: int, v: _Version) -> None:
        budget = self.config.device_bytes
        async with self._room:
            while not self._fits_device_now(need, v):
                victim = self._device_victim()
                if victim is not None:
                    await self._evict_device(victim)
                    continue
                pinned = sum(o.device_bytes for o in self._all if o.on_device and o.pinned)
                if v.retired:
                    raise _Retired()  # nobody needs this version any more: do not make room for it
                if need > budget - pinned:
                    raise ResourceExhaustedError(
                        f"delta of tenant {v.tenant!r} needs {need} bytes on the device but the budget is "
                        f"{budget} with {pinned} pinned; raise --device-cache-bytes or unpin tenants"
                    )
                cap = self.config.max_device_entries
                if cap is not None and sum(1 for o in self._all if o.on_device and o.pinned) >= cap:
                    raise ResourceExhaustedError(
                        f"all {cap} device slots hold pinned tenants; unpin one or raise --tenant-slots"
                    )
                await self._room.wait()  # every resident delta is in use: wait for a release
            self._device_reserved += need
            self._reserved_entries += 1

    def _fits_device_now(self, need: int, v: _Version) -> bool:
        """Would `need` more bytes (and one more entry, `v`) fit the device tier now?"""
        used = sum(o.device_bytes for o in self._all if o.on_device) + self._device_reserved
        count = sum(1 for o in self._all if o.on_device and o is not v) + self._reserved_entries + 1
        cap = self.config.max_device_entries
        return used + need <= self.config.device_bytes and (cap is None or count <= cap)

    def _device_victim(self) -> _Version | None:
        candidates = [o for o in self._all if o.on_device and o.refs == 0 and not o.pinned]
        return min(candidates, key=lambda o: o.last_touch, default=None)

    async def _unload_device(self, v: _Version) -> None:
        """Take `v` off the device. It stops counting as resident *before* the await, so no new
        lease can pick it up mid-unload, while its bytes and slot stay reserved until the engine
        has let go."""
        if not v.on_device:
            return
        v.on_device = False
        freed, v.device_bytes = v.device_bytes, 0
        self._device_reserved += freed
        self._reserved_entries += 1
        try:
            await self._sink.unload_delta(v.key)
        finally:
            self._device_reserved -= freed
            self._reserved_entries -= 1

    async def _evict_device(self, v: _Version) -> None:
        await self._unload_device(v)
        if self._metrics is not None:
            self._metrics.cache_evictions.labels("device").inc()
        self._publish()

    def _host_used(self) -> int:
        return sum(o.host_bytes for o in self._all if o.host is not None)

    def _keep_host(self, v: _Version, delta: TenantDelta) -> None:
        """Keep a packed host copy if it fits the host budget after evicting LRU host copies."""
        need = delta.nbytes()
        if need > self.config.host_bytes:
            return
        while self._host_used() + need > self.config.host_bytes:
            holders = [o for o in self._all if o.host is not None and o is not v]
            victim = min(holders, key=lambda o: o.last_touch, default=None)
            if victim is None:
                return
            victim.host = None
            victim.host_bytes = 0
            if self._metrics is not None:
                self._metrics.cache_evictions.labels("host").inc()
        v.host = delta
        v.host_bytes = need

    async def _free_if_done(self, v: _Version) -> bool:
        """Free a retired version once nothing references it. True when it is gone."""
        if not v.retired or v.refs > 0:
            return False
        if v.loading is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(v.loading)
        await self._drop(v)
        return True

    async def _drop(self, v: _Version) -> None:
        await self._unload_device(v)
        v.host = None
        v.host_bytes = 0
        self._all.discard(v)
        if v.tenant not in self._current and all(o.tenant != v.tenant for o in self._all):
            self._next_version.pop(v.tenant, None)  # last version gone: forget its counter too
        self._publish()

    def _count_miss(self, tier: Tier) -> None:
        if self._metrics is not None:
            self._metrics.cache_misses.labels(tier.value).inc()

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.set_cache_tiers(self.tier_bytes(), self.tier_entries())
            self._metrics.broken_tenants.set(len(self._broken))
