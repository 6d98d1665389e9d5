"""Boilerplate removal, learned from the data: line blocks that repeat across many documents
(licence headers and footers, legal notices, navigation) are found by counting, over the whole
dataset, how many documents hold each window of `window` consecutive non-blank lines. Nothing
is specific to one source.

  1. `map_batches`: hash every window of each live document (once per document) -> per-batch
     counts; Ray Data `groupby(...).sum()` adds them up across blocks and workers;
  2. the driver keeps the windows held by at least max(min_docs, min_doc_fraction x documents)
     documents;
  3. `map_batches`: in each document, lines covered by a kept window form runs; runs of at least
     `min_block_lines` lines are removed. The manifest lists the removed blocks, most common first.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from raylm.data.steps import fetch_plan, shuffle_partitions
from raylm.data.steps import live as _live
from raylm.data.config import BoilerplateStep

SAMPLE_CHARS = 400


def _windows(lines: list[str], window: int) -> list[tuple[int, bytes]]:
    """(index of the window's first non-blank line in `lines`, hash) for each window."""
    idx = [i for i, ln in enumerate(lines) if ln.strip()]
    out = []
    for k in range(len(idx) - window + 1):
        block = "\n".join(lines[i].strip() for i in idx[k:k + window])
        out.append((k, hashlib.blake2b(block.encode("utf-8"), digest_size=8).digest()))
    return out


def _count(t: pa.Table, cfg: BoilerplateStep) -> pa.Table:
    """Per-batch document counts per window hash, plus one row (empty hash) counting documents."""
    counts: Counter = Counter()
    live = t.filter(_live(t))
    for text in live.column("text").to_pylist():
        counts.update({h for _, h in _windows(text.split("\n"), cfg.window)})
    return pa.table({"h": pa.array([b""] + list(counts), pa.binary()),
                     "n": pa.array([len(live)] + list(counts.values()), pa.int64())})


def _frequent(t: pa.Table, need: int) -> pa.Table:
    keep = pc.and_(pc.greater_equal(t.column("sum(n)"), need), pc.not_equal(pc.binary_length(t.column("h")), 0))
    return t.filter(keep)


def _docs_row(t: pa.Table) -> pa.Table:
    return t.filter(pc.equal(pc.binary_length(t.column("h")), 0))


def plan(ds: ray.data.Dataset, cfg: BoilerplateStep) -> dict[str, Any]:
    totals = ds.map_batches(_count, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=None) \
        .groupby("h", num_partitions=shuffle_partitions(ds)).sum("n").materialize()
    n_docs = 0
    for batch in totals.map_batches(_docs_row, batch_format="pyarrow", batch_size=None).iter_batches(
            batch_format="pyarrow"):
        n_docs += int(pc.sum(batch.column("sum(n)")).as_py() or 0)
    need = max(cfg.min_docs, math.ceil(cfg.min_doc_fraction * n_docs))
    frequent = totals.map_batches(_frequent, fn_kwargs={"need": need}, batch_format="pyarrow",
                                  batch_size=None).take_all()
    return {"hashes": {r["h"] for r in frequent}, "min_docs": need, "documents": n_docs}


def strip_text(text: str, hashes: set[bytes], cfg: BoilerplateStep) -> tuple[str, list[str]]:
    """`text` without its boilerplate runs, and the removed blocks."""
    lines = text.split("\n")
    idx = [i for i, ln in enumerate(lines) if ln.strip()]
    covered = [False] * len(idx)
    for k, h in _windows(lines, cfg.window):
        if h in hashes:
            for j in range(k, k + cfg.window):
                covered[j] = True
    remove: set[int] = set()
    blocks: list[str] = []
    k = 0
    while k < len(idx):
        if not covered[k]:
            k += 1
            continue
        end = k
        while end < len(idx) and covered[end]:
            end += 1
        if end - k >= cfg.min_block_lines:
            first, last = idx[k], idx[end - 1]
            remove.update(range(first, last + 1))
            blocks.append("\n".join(lines[first:last + 1]))
        k = end
    if not remove:
        return text, []
    kept = [ln for i, ln in enumerate(lines) if i not in remove]
    return "\n".join(kept).strip("\n"), blocks


def apply(table: pa.Table, cfg: BoilerplateStep, plan_ref: Any) -> pa.Table:
    hashes = fetch_plan(plan_ref)
    texts, n_lines, samples = [], [], []
    for text in table.column("text").to_pylist():
        new, blocks = strip_text(text, hashes, cfg) if hashes else (text, [])
        texts.append(new)
        n_lines.append(sum(b.count("\n") + 1 for b in blocks))
        samples.append([b[:SAMPLE_CHARS] for b in blocks])
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    table = table.append_column("_boiler_lines", pa.array(n_lines, pa.int64()))
    return table.append_column("_boiler_blocks", pa.array(samples, pa.list_(pa.string())))
