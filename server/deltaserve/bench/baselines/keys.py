"""Engine tenant keys: the delta cache hands engines "<tenant>@<version>" keys (so a hot-swapped
delta never shares a key with its predecessor); baselines serve per tenant, so they map back."""

from __future__ import annotations


def tenant_of_key(key: str) -> str:
    """'alice@3' -> 'alice'; a key without a version is the tenant itself."""
    tenant, sep, version = key.rpartition("@")
    return tenant if sep and version.isdigit() else key
