"""API keys: who may call, which tenants they may use, who may administer deltas.

Keys file (TOML, or YAML when named .yaml/.yml):

    [[key]]
    name = "acme"                     # shown in logs, never the key itself
    sha256 = "9f86d08..."             # hex sha256 of the key (or: key = "plaintext")
    tenants = ["acme-chat", "acme-sql"]   # "*" = every tenant
    base = true                       # may use the base model (no tenant); default true
    admin = false                     # may call the Deltas service; default false
    requests_per_minute = 60          # quotas (service.quotas); 0 or absent = unlimited
    tokens_per_minute = 100000        # prompt + max_new_tokens reserved per request

In YAML the same entries form a list under `keys:` (or `key:`). Clients send
`authorization: Bearer <key>`. Without a keys file every caller is
an anonymous admin, which is why the server then binds to loopback by default.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from deltaserve.errors import DeltaServeError, InvalidArgumentError


class UnauthenticatedError(DeltaServeError):
    """No key, or a key the server does not know."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(DeltaServeError):
    """A known key that may not do this (tenant not allowed, admin call without admin role)."""

    grpc_code = "PERMISSION_DENIED"


@dataclass(frozen=True)
class Quota:
    """A key's quotas per minute (0 = unlimited), enforced by service.quotas."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @property
    def limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller. key_id (the sha256 of its key) tells keys apart even when
    they share a name; it is never shown."""

    name: str
    tenants: frozenset[str]
    all_tenants: bool = False
    base: bool = True
    admin: bool = False
    quota: Quota = Quota()
    key_id: str = field(default="", repr=False)

    def may_use(self, tenant: str | None) -> bool:
        if not tenant:
            return self.base
        return self.all_tenants or tenant in self.tenants


ANONYMOUS = Principal("anonymous", frozenset(), all_tenants=True, base=True, admin=True)


class Authenticator:
    """Maps `authorization` metadata to a Principal. keys: sha256 hex digest -> Principal."""

    def __init__(self, keys: dict[str, Principal] | None) -> None:
        self._keys = keys

    @property
    def enabled(self) -> bool:
        return self._keys is not None

    @property
    def key_count(self) -> int:
        return len(self._keys or {})

    @property
    def principals(self) -> tuple[Principal, ...]:
        """Every key's Principal (none without a keys file)."""
        return tuple((self._keys or {}).values())

    @classmethod
    def from_file(cls, path: Path | None) -> Authenticator:
        return cls(None if path is None else read_keys_file(path))

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """Return the caller's Principal; raise UnauthenticatedError when the key is missing or unknown."""
        if self._keys is None:
            return ANONYMOUS
        header = None
        for k, v in metadata or ():
            if k.lower() == "authorization":
                header = v.decode() if isinstance(v, bytes) else v
                break
        if header is None:
            raise UnauthenticatedError("missing 'authorization: Bearer <key>' metadata")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError("authorization metadata must be 'Bearer <key>'")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        for known, principal in self._keys.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise UnauthenticatedError("unknown API key")

    @staticmethod
    def require_admin(principal: Principal) -> None:
        if not principal.admin:
            raise PermissionDeniedError(
                f"key {principal.name!r} has no admin role (needed for the Deltas service)"
            )

    @staticmethod
    def require_tenant(principal: Principal, tenant: str | None) -> None:
        if not principal.may_use(tenant):
            what = f"tenant {tenant!r}" if tenant else "the base model"
            raise PermissionDeniedError(f"key {principal.name!r} may not use {what}")


_QUOTA_FIELDS = ("requests_per_minute", "tokens_per_minute")  # in Quota's field order


def read_keys_file(path: Path) -> dict[str, Principal]:
    """Parse a keys file into {sha256 hex: Principal}; raise InvalidArgumentError on any mistake."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read keys file {path}: {exc.strerror}") from exc
    if path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgumentError(f"keys file {path} is not valid TOML: {exc}") from exc
    entries = raw.get("key", raw.get("keys", [])) if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise InvalidArgumentError(f"keys file {path} must hold a list of [[key]] entries")
    out: dict[str, Principal] = {}
    for i, e in enumerate(entries):
        where = f"keys file {path}, entry {i}"
        if not isinstance(e, dict):
            raise InvalidArgumentError(f"{where}: must be a table")
        unknown = set(e) - {"name", "key", "sha256", "tenants", "base", "admin", *_QUOTA_FIELDS}
        if unknown:
            raise InvalidArgumentError(f"{where}: unknown fields {sorted(unknown)}")
        if ("key" in e) == ("sha256" in e):
            raise InvalidArgumentError(f"{where}: give exactly one of 'key' or 'sha256'")
        if "key" in e:
            if not isinstance(e["key"], str) or len(e["key"]) < 8:
                raise InvalidArgumentError(f"{where}: key must be a string of at least 8 characters")
            digest = hashlib.sha256(e["key"].encode()).hexdigest()
        else:
            digest = str(e["sha256"]).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise InvalidArgumentError(f"{where}: sha256 must be 64 hex digits")
        tenants = e.get("tenants", [])
        if not isinstance(tenants, list) or not all(isinstance(t, str) and t for t in tenants):
            raise InvalidArgumentError(f'{where}: tenants must be a list of tenant ids (or ["*"])')
        if digest in out:
            raise InvalidArgumentError(f"{where}: duplicate key")
        for f in _QUOTA_FIELDS:
            v = e.get(f, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidArgumentError(f"{where}: {f} must be an integer >= 0 (0 = unlimited)")
        out[digest] = Principal(
            name=str(e.get("name", f"key{i}")),
            tenants=frozenset(t for t in tenants if t != "*"),
            all_tenants="*" in tenants,
            base=bool(e.get("base", True)),
            admin=bool(e.get("admin", False)),
            quota=Quota(*(int(e.get(f, 0)) for f in _QUOTA_FIELDS)),
            key_id=digest,
        )
    return out
