"""Data steps: each is one function `(pyarrow.Table, step config) -> pyarrow.Table` over a
batch of documents, listed by name in the data config's `steps` and run in that order through
Ray Data `map_batches` (datatrove style: steps are separate from the executor).

A step may change `text` and may drop a row by setting `_drop` to a reason; it never removes
rows itself, so the job can count every drop by reason. `run_step` wraps each step and records,
per row, whether the step changed the text and by how many bytes, summed into the manifest.
"""

from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from raylm.data.config import NormalizeStep


def normalize(table: pa.Table, cfg: NormalizeStep) -> pa.Table:
    """Unicode normalization and whitespace cleanup, vectorized with Arrow compute kernels."""
    text = table.column("text")
    if cfg.unicode_form != "none":
        text = pc.utf8_normalize(text, form=cfg.unicode_form)
    if cfg.newlines:
        text = pc.replace_substring_regex(text, pattern=r"\r\n?", replacement="\n")
    if cfg.strip_control:
        # C0 controls except \t and \n, DEL, and C1 controls.
        text = pc.replace_substring_regex(text, pattern=r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", replacement="")
    if cfg.collapse_spaces:
        text = pc.replace_substring_regex(text, pattern=r"[ \t]{2,}", replacement=" ")
    if cfg.strip_trailing:
        text = pc.replace_substring_regex(text, pattern=r"[ \t]+(\n|$)", replacement=r"\1")
    keep = cfg.max_blank_lines + 1
    text = pc.replace_substring_regex(text, pattern=r"\n{%d,}" % (keep + 1), replacement="\n" * keep)
    text = pc.utf8_trim_whitespace(text)
    return table.set_column(table.schema.get_field_index("text"), "text", text)


STEPS: dict[str, Callable[[pa.Table, Any], pa.Table]] = {
    "normalize": normalize,
}


def stat_columns(index: int, name: str) -> tuple[str, str]:
    return f"_stat{index}_{name}_changed", f"_stat{index}_{name}_bytes"


def run_step(table: pa.Table, cfg: Any, index: int) -> pa.Table:
    """Apply step number `index` to the rows that are still live (not quarantined or dropped)
    and add its per-row stats columns."""
    live = pc.and_(pc.is_null(table.column("_error")), pc.is_null(table.column("_drop")))
    before = table.column("text")
    out = STEPS[cfg.name](table, cfg)
    after = out.column("text")
    # Quarantined / dropped rows keep their text untouched.
    after = pc.if_else(live, after, before)
    out = out.set_column(out.schema.get_field_index("text"), "text", after)
    changed = pc.fill_null(pc.and_(live, pc.not_equal(before, after)), False)
    delta = pc.fill_null(pc.subtract(pc.binary_length(after), pc.binary_length(before)), 0)
    col_changed, col_bytes = stat_columns(index, cfg.name)
    out = out.append_column(col_changed, pc.cast(changed, pa.int64()))
    return out.append_column(col_bytes, pc.cast(delta, pa.int64()))


def mark_empty(table: pa.Table) -> pa.Table:
    """Drop (with reason `empty_text`) live rows whose text is empty after the steps."""
    live = pc.and_(pc.is_null(table.column("_error")), pc.is_null(table.column("_drop")))
    empty = pc.and_(live, pc.equal(pc.utf8_length(pc.fill_null(table.column("text"), "")), 0))
    drop = pc.if_else(empty, pa.scalar("empty_text"), table.column("_drop"))
    return table.set_column(table.schema.get_field_index("_drop"), "_drop", drop)
