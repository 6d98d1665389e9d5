"""API keys: random tokens shown once, stored only as SHA-256 hashes, each with scopes and
its own rate limit.

The keys file (JSON, a URI like any other) holds `{"keys": [{"name", "sha256", "scopes",
"rate_limit_per_minute", "created"}]}`. A presented key is hashed and compared with every
stored hash in constant time (`hmac.compare_digest`, no early exit), so timing tells nothing
about which key or how much of it matched. Keys are long random tokens, so an unsalted fast
hash is the right tool (as for GitHub or cloud access tokens): there is nothing to brute-force.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Optional

from raylm import storage
from raylm.cluster import home

SCOPES = ("generate", "classify", "feedback", "admin")
PREFIX = "rlm-"


def default_keys_file() -> str:
    return str(home() / "serve" / "keys.json")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _load(uri: str) -> dict:
    return storage.read_json(uri) if storage.exists(uri) else {"keys": []}


def add(name: str, scopes: list[str], uri: Optional[str] = None, rate_limit_per_minute: Optional[int] = None) -> str:
    """Create a key; returns it (the only time it exists in clear)."""
    uri = uri or default_keys_file()
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(scopes) or 'none'}")
    data = _load(uri)
    if any(k["name"] == name for k in data["keys"]):
        raise ValueError(f"a key named {name!r} exists; revoke it first or pick another name")
    key = PREFIX + secrets.token_urlsafe(32)
    entry = {"name": name, "sha256": digest(key), "scopes": sorted(set(scopes)),
             "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if rate_limit_per_minute:
        entry["rate_limit_per_minute"] = int(rate_limit_per_minute)
    data["keys"].append(entry)
    storage.write_json(uri, data)
    if storage.is_local(uri):
        import os

        os.chmod(storage.normalize(uri).removeprefix("file://"), 0o600)
    return key


def revoke(name: str, uri: Optional[str] = None) -> bool:
    uri = uri or default_keys_file()
    data = _load(uri)
    kept = [k for k in data["keys"] if k["name"] != name]
    if len(kept) == len(data["keys"]):
        return False
    storage.write_json(uri, {"keys": kept})
    return True


def list_keys(uri: Optional[str] = None) -> list[dict]:
    return _load(uri or default_keys_file())["keys"]


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset
    rate_limit_per_minute: Optional[int]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class KeyStore:
    """The ingress's view of the keys file, re-read at most every `refresh_s` seconds, so keys
    added or revoked with `raylm keys` take effect without a redeploy."""

    def __init__(self, uri: str, refresh_s: float = 5.0):
        self.uri = uri
        self.refresh_s = refresh_s
        self._entries: list[dict] = []
        self._loaded_at = 0.0
        self._lock = threading.Lock()
        self.reload()

    def reload(self) -> None:
        entries = _load(self.uri)["keys"]
        with self._lock:
            self._entries = entries
            self._loaded_at = time.monotonic()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> Optional[Principal]:
        if time.monotonic() - self._loaded_at > self.refresh_s:
            try:
                self.reload()
            except Exception:  # noqa: BLE001 - keep serving with the last good copy
                pass
        presented = digest(key)
        found = None
        for e in self._entries:  # compare with every entry: the time does not depend on which matched
            if hmac.compare_digest(presented, e["sha256"]):
                found = e
        if found is None:
            return None
        return Principal(found["name"], frozenset(found["scopes"]), found.get("rate_limit_per_minute"))


class RateLimiter:
    """A token bucket per key: `per_minute` requests a minute, bursts up to the same number.
    One of `replicas` ingress replicas that a load balancer sends requests to in turn holds
    1/replicas of each key's limit (bursts at least 1), so together they allow the limit."""

    def __init__(self, default_per_minute: int, replicas: int = 1):
        self.default = default_per_minute
        self.replicas = max(1, replicas)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, who: str, per_minute: Optional[int] = None) -> float:
        """0.0 when allowed, else the seconds until the next request would be."""
        share = (per_minute or self.default) / self.replicas
        rate = share / 60.0
        cap = max(1.0, share)
        now = time.monotonic()
        tokens, last = self._buckets.get(who, (cap, now))
        tokens = min(cap, tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[who] = (tokens - 1.0, now)
            return 0.0
        self._buckets[who] = (tokens, now)
        return (1.0 - tokens) / rate
