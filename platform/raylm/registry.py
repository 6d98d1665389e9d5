"""The model registry: where finished models live and how later stages find them.

`<registry>/<name>/v<N>/` holds one consolidated Hugging Face directory (config.json,
model.safetensors, tokenizer files) plus `model_card.json` (task, base, dataset version,
strategy, metrics, config). Versions count up per name; the card is written last, so a
directory without one is not (yet) a model. `name@N`, `name@vN` or `name` (newest) refer to one.

Aliases name a version for the stages that read it: `name@production` is whatever version the
alias `production` points at (`<registry>/<name>/aliases/<alias>.json`, which keeps the alias's
history). `set_alias` moves one (the CLI's `raylm models alias`, or the evaluation job's `promote`,
which moves it only to a version that scores at least as well as the one it holds).

`delete` / `prune` remove versions' files (never a version an alias points at, unless forced); a
`deleted.json` keeps the number taken.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any, Optional

from raylm import storage
from raylm.cluster import home

CARD = "model_card.json"
ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,62}$"  # and not a version (v3): see `check_alias`
_VERSION = re.compile(r"v?(\d+)")


def check_alias(alias: str) -> str:
    """`alias` if it can name an alias; ValueError (with what is allowed) otherwise."""
    if not re.fullmatch(ALIAS_PATTERN, alias) or _VERSION.fullmatch(alias) or alias == "latest":
        raise ValueError(f"alias {alias!r} is not allowed: a letter, then up to 62 letters, digits, '-' or '_', "
                         "and not a version (v3) or 'latest'")
    return alias


def default_root() -> str:
    return str(home() / "registry")


def _versions(root: str, name: str) -> list[int]:
    out = []
    for entry in storage.listdir(storage.join(root, name)):
        m = re.fullmatch(r"v(\d+)", entry)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def _claim(root: str, name: str) -> int:
    """The next free version number, claimed so that two writers never get the same one.
    Local: an atomic mkdir. Object stores: a `.claim` object created with a conditional PUT
    (`storage.create_exclusive`); the loser of a race moves on to the next number."""
    n = (max(_versions(root, name)) if _versions(root, name) else 0) + 1
    if not storage.is_local(root):
        stamp = storage.json_bytes({"claimed": dt.datetime.now(dt.timezone.utc).isoformat(), "pid": os.getpid()})
        while not storage.create_exclusive(storage.join(root, name, f"v{n}", ".claim"), stamp):
            n += 1
        return n
    base = storage.join(root, name)
    os.makedirs(base, exist_ok=True)
    while True:
        try:
            os.mkdir(os.path.join(base, f"v{n}"))
            return n
        except FileExistsError:
            n += 1


def register(local_dir: str | Path, name: str, card: dict[str, Any], root: Optional[str] = None) -> dict[str, Any]:
    """Copy a model directory into the registry as the next version of `name`; returns its card."""
    root = storage.normalize(root or default_root())
    n = _claim(root, name)
    uri = storage.join(root, name, f"v{n}")
    storage.upload_dir(local_dir, uri)
    card = {**card, "name": name, "version": n, "id": f"{name}@v{n}", "uri": uri,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    storage.write_json(storage.join(uri, CARD), card)
    return card


def list_models(root: Optional[str] = None) -> list[dict[str, Any]]:
    root = storage.normalize(root or default_root())
    out = []
    for name in storage.listdir(root):
        for n in _versions(root, name):
            card = storage.join(root, name, f"v{n}", CARD)
            if storage.exists(card):
                out.append(storage.read_json(card))
    return sorted(out, key=lambda c: (c["name"], c["version"]))


def resolve(ref: str, root: Optional[str] = None) -> dict[str, Any]:
    """`name` or `name@latest` (newest), `name@3` / `name@v3`, `name@ALIAS`, or a model directory
    URI -> its card."""
    if "://" in ref or ref.startswith(("/", ".", "~")):
        card = storage.join(ref, CARD)
        if not storage.exists(card):
            raise FileNotFoundError(f"no model at {ref} (no {CARD})")
        return storage.read_json(card)
    name, _, version = ref.partition("@")
    if version and version != "latest" and not _VERSION.fullmatch(version):
        if not re.fullmatch(ALIAS_PATTERN, version):
            raise FileNotFoundError(f"no model {ref!r}: {version!r} is neither a version (vN) nor an alias name")
        held = alias_of(name, version, root)
        if held is None:
            names = sorted(aliases(name, root))
            raise FileNotFoundError(f"model {name!r} has no alias {version!r}; its aliases: "
                                    f"{', '.join(names) or 'none'} (set one: raylm models alias {name}@vN {version})")
        version = str(held["version"])
    cards = [c for c in list_models(root) if c["name"] == name]
    if version and version != "latest":
        cards = [c for c in cards if c["version"] == int(_VERSION.fullmatch(version).group(1))]
    if not cards:
        known = sorted({c["id"] for c in list_models(root)})
        raise FileNotFoundError(f"no model {ref!r} in the registry; known: {', '.join(known) or 'none'}")
    return cards[-1]


# --- deleting --------------------------------------------------------------------------------------

DELETED = "deleted.json"  # what is left of a deleted version: its number is never given out again


def delete(ref: str, root: Optional[str] = None, force: bool = False, reason: str = "",
           served: Optional[dict[str, list[str]]] = None) -> dict[str, Any]:
    """Delete one registered version's files (its card first, so no reader takes it for a model
    half gone); a `deleted.json` stays in its place, so the number is not given to another model
    (a pipeline ledger or a report that names `NAME@vN` never finds a different model there). A
    version an alias points at, or one Serve serves (`served`: model URI -> where, from
    `serve.job.served_versions`), is refused unless `force` (then the alias is removed too).
    Returns the deleted card."""
    root = storage.normalize(root or default_root())
    card = resolve(ref, root)
    if "name" not in card or "version" not in card or not storage.exists(storage.join(root, card["name"],
                                                                                       f"v{card['version']}", CARD)):
        raise ValueError(f"{ref} is not a version in the registry at {root}")
    serving = (served or {}).get(storage.normalize(card["uri"]))
    if serving and not force:
        raise ValueError(f"{card['id']} is being served ({'; '.join(serving)}): a replica that restarts would "
                         "find no model; deploy another version or undeploy first, or delete with --force")
    held = sorted(a for a, v in aliases(card["name"], root).items() if v == card["version"])
    if held and not force:
        raise ValueError(f"{card['id']} is what {', '.join(card['name'] + '@' + a for a in held)} point(s) at; "
                         "point the alias elsewhere first (raylm models alias), or delete with --force")
    for a in held:
        remove_alias(card["name"], a, root)
    uri = storage.join(root, card["name"], f"v{card['version']}")
    storage.remove(storage.join(uri, CARD))  # first: from here on it is not a model
    storage.write_json(storage.join(uri, DELETED), {  # the directory never goes away (see above)
        "id": card["id"], "deleted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "reason": reason, "aliases_removed": held})
    for entry in storage.listdir(uri):
        if entry != DELETED:
            storage.remove(storage.join(uri, entry))
    return card


def prune(name: str, keep: int, root: Optional[str] = None, dry_run: bool = False,
          served: Optional[dict[str, list[str]]] = None) -> list[str]:
    """Delete every version of `name` but the newest `keep`, those an alias points at and those
    Serve serves (`served`, as `delete` takes it); returns the ids deleted (or, with `dry_run`,
    that would be)."""
    if keep < 1:
        raise ValueError("keep at least 1 version")
    cards = [c for c in list_models(root) if c["name"] == name]
    if not cards:
        raise FileNotFoundError(f"no model {name!r} in the registry")
    aliased = set(aliases(name, root).values())
    doomed = [c["id"] for c in cards[:-keep] if c["version"] not in aliased
              and storage.normalize(c["uri"]) not in (served or {})]
    if not dry_run:
        for ref in doomed:
            delete(ref, root, reason=f"prune: keep the newest {keep} and the aliased")
    return doomed


# --- aliases -----------------------------------------------------------------------------------

def _alias_uri(root: Optional[str], name: str, alias: str) -> str:
    return storage.join(storage.normalize(root or default_root()), name, "aliases", f"{alias}.json")


def alias_of(name: str, alias: str, root: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The alias's record ({alias, name, version, id, set, reason, history}) or None."""
    uri = _alias_uri(root, name, alias)
    return storage.read_json(uri) if storage.exists(uri) else None


def aliases(name: str, root: Optional[str] = None) -> dict[str, int]:
    """alias -> version, for every alias of `name`."""
    base = storage.join(storage.normalize(root or default_root()), name, "aliases")
    out = {}
    for entry in storage.listdir(base):
        if entry.endswith(".json"):
            rec = storage.read_json(storage.join(base, entry))
            out[rec["alias"]] = int(rec["version"])
    return out


def set_alias(ref: str, alias: str, root: Optional[str] = None, reason: str = "") -> dict[str, Any]:
    """Point `alias` of the model `ref` names at that version (its history keeps where it pointed
    before); returns the alias's record."""
    check_alias(alias)
    card = resolve(ref, root)
    if "name" not in card or "version" not in card:
        raise ValueError(f"{ref} is not a registry model (a model directory has no aliases)")
    uri = _alias_uri(root, card["name"], alias)
    old = alias_of(card["name"], alias, root)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    history = (old or {}).get("history", [])
    rec = {"alias": alias, "name": card["name"], "version": card["version"], "id": card["id"], "set": now,
           "reason": reason, "history": [*history, {"version": card["version"], "set": now, "reason": reason}][-50:]}
    storage.write_json(uri, rec)
    return rec


def remove_alias(name: str, alias: str, root: Optional[str] = None) -> bool:
    """Delete the alias; False when there was none."""
    uri = _alias_uri(root, name, alias)
    if not storage.exists(uri):
        return False
    storage.remove(uri)
    return True


def local_path(card: dict[str, Any], cache: Optional[str | Path] = None) -> Path:
    """A local directory with the model's files (downloaded once for remote registries)."""
    uri = card["uri"]
    if storage.is_local(uri):
        return Path(uri)
    target = Path(cache or Path(default_root()).parent / "cache" / "models") / card["name"] / f"v{card['version']}"
    if not (target / CARD).exists():
        storage.download_dir(uri, target)
    return target
