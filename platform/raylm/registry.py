"""The model registry: where finished models live and how later stages find them.

`<registry>/<name>/v<N>/` holds one consolidated Hugging Face directory (config.json,
model.safetensors, tokenizer files) plus `model_card.json` (task, base, dataset version,
strategy, metrics, config). Versions count up per name; the card is written last, so a
directory without one is not (yet) a model. `name@N`, `name@vN` or `name` (newest) refer to one.
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
    """`name`, `name@3` / `name@v3`, or a model directory URI -> its card."""
    if "://" in ref or ref.startswith(("/", ".", "~")):
        card = storage.join(ref, CARD)
        if not storage.exists(card):
            raise FileNotFoundError(f"no model at {ref} (no {CARD})")
        return storage.read_json(card)
    name, _, version = ref.partition("@")
    cards = [c for c in list_models(root) if c["name"] == name]
    if version:
        cards = [c for c in cards if f"v{c['version']}" == version or str(c["version"]) == version]
    if not cards:
        known = sorted({c["id"] for c in list_models(root)})
        raise FileNotFoundError(f"no model {ref!r} in the registry; known: {', '.join(known) or 'none'}")
    return cards[-1]


def local_path(card: dict[str, Any], cache: Optional[str | Path] = None) -> Path:
    """A local directory with the model's files (downloaded once for remote registries)."""
    uri = card["uri"]
    if storage.is_local(uri):
        return Path(uri)
    target = Path(cache or Path(default_root()).parent / "cache" / "models") / card["name"] / f"v{card['version']}"
    if not (target / CARD).exists():
        storage.download_dir(uri, target)
    return target
