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
