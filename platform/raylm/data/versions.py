"""Reading dataset versions: what `raylm datasets list/show` and later stages use. A version
counts only once its manifest.json exists (the manifest is written last)."""

from __future__ import annotations

from typing import Any, Optional

from raylm import storage
from raylm.data.pipeline import MANIFEST, default_root


def list_versions(root: Optional[str] = None) -> list[dict[str, Any]]:
    root = storage.normalize(root or default_root())
    out = []
    for name in storage.listdir(root):
        if name.startswith(("_", ".")):
            continue
        for version in storage.listdir(storage.join(root, name)):
            uri = storage.join(root, name, version, MANIFEST)
            if not version.startswith(("_", ".")) and storage.exists(uri):
                out.append(storage.read_json(uri))
    return sorted(out, key=lambda m: m.get("created", ""), reverse=True)


def resolve(ref: str, root: Optional[str] = None) -> dict[str, Any]:
    """`name@version`, `name` (its newest version), or a version directory URI -> its manifest."""
    if "://" in ref or ref.startswith(("/", ".", "~")):
        uri = storage.join(ref, MANIFEST)
        if not storage.exists(uri):
            raise FileNotFoundError(f"no dataset version at {ref} (no {MANIFEST})")
        return storage.read_json(uri)
    name, _, version = ref.partition("@")
    candidates = [m for m in list_versions(root) if m["name"] == name and (not version or m["version"] == version)]
    if not candidates:
        known = sorted({m["id"] for m in list_versions(root)})
        raise FileNotFoundError(f"no dataset {ref!r} under {storage.normalize(root or default_root())}; "
                                f"known: {', '.join(known) or 'none'}")
    return candidates[0]


def read_split(m: dict[str, Any], view: str, split: str, columns: Optional[list[str]] = None):
    """One split of a version's `docs` or `packed` view as a pyarrow table, read in this process
    (for small reads in drivers, tests and benchmarks; jobs read through Ray Data)."""
    import pyarrow.dataset as pads

    fs, path = storage.arrow_fs(storage.join(m["uri"], view, split))
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)


def with_labels(batch, labels: list[str]):
    """The rows of a pyarrow batch of a docs view whose label is one of `labels` (rows with
    another label or none are left out; callers count them)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column("label"), value_set=pa.array(labels)))


def referenced_by_models(m: dict[str, Any], registry_root: Optional[str] = None) -> list[str]:
    """Registered models trained on this version (their card's `dataset` names it, alone or in a
    mixture)."""
    from raylm import registry

    return [c["id"] for c in registry.list_models(registry_root) if m["id"] in str(c.get("dataset") or "")]


def delete(ref: str, root: Optional[str] = None, registry_root: Optional[str] = None,
           force: bool = False) -> dict[str, Any]:
    """Delete a dataset version (its manifest first, so no reader takes it for a version half
    gone). A version a registered model was trained on is refused unless `force`: its models'
    cards, evaluations and reproductions name it. Building the same sources and config again
    recreates it under the same id. Returns its manifest."""
    m = resolve(ref, root)
    base = storage.join(storage.normalize(root or default_root()), m["name"], m["version"])
    if not storage.exists(storage.join(base, MANIFEST)):
        raise ValueError(f"{ref} is not a dataset version under {storage.normalize(root or default_root())}")
    used = referenced_by_models(m, registry_root)
    if used and not force:
        raise ValueError(f"{m['id']} is the training data of {', '.join(used)}; delete those models first, "
                         "or delete it with --force")
    storage.remove(storage.join(base, MANIFEST))
    storage.remove(base)
    return m


def prune(name: str, keep: int, root: Optional[str] = None, registry_root: Optional[str] = None,
          dry_run: bool = False) -> list[str]:
    """Delete every version of `name` but the newest `keep` and those a registered model was
    trained on; returns the ids deleted (or, with `dry_run`, that would be)."""
    if keep < 1:
        raise ValueError("keep at least 1 version")
    mine = [m for m in list_versions(root) if m["name"] == name]  # newest first
    if not mine:
        raise FileNotFoundError(f"no dataset {name!r} under {storage.normalize(root or default_root())}")
    doomed = [m["id"] for m in mine[keep:] if not referenced_by_models(m, registry_root)]
    if not dry_run:
        for ref in doomed:
            delete(ref, root, registry_root)
    return doomed
