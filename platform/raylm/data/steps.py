"""Row-level data steps: each is one function `(pyarrow.Table, step config) -> pyarrow.Table`
over a batch of live documents, listed by name in the data config's `steps` and run in that
order through Ray Data `map_batches` (datatrove style: steps are separate from the executor).
The steps that need the whole dataset (boilerplate, dedup_exact, dedup_near) live in
`boilerplate.py` and `dedup.py`; `pipeline.py` runs both kinds in the user's order.

A step may change `text`, add columns, add rows after the ones it was given (augment), and
drop a row by setting `_drop` to a reason; it never removes rows itself, so every drop is
counted by reason. `run_step` gives a step only the live rows, prefixes the reasons it set with
the step's key (`quality.too_few_words`), records per row whether the text changed and by how
many bytes, and sends any row the step raises on to quarantine with the step and the error.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from raylm.data.config import FixUnicodeStep, LanguageStep, NormalizeStep, QualityStep

RAW_KEEP = 1000
BOOKKEEPING = ("_error", "_raw", "_drop", "_step")  # every other `_` column is a per-step statistic


_PLANS: dict[str, Any] = {}


def shuffle_partitions(ds: Any) -> int:
    """How many partitions a whole-dataset `groupby` uses: one per block of its (materialized)
    input, at most Ray Data's `default_hash_shuffle_parallelism` (200). Ray's default is always
    that maximum, and each partition costs a task: 5 s of a 6 s groupby on a one-block dataset."""
    import ray.data

    cap = ray.data.DataContext.get_current().default_hash_shuffle_parallelism or 200
    try:
        blocks = ds.num_blocks()
    except Exception:  # noqa: BLE001 - not materialized: the block count is unknown
        return cap
    return max(1, min(cap, blocks))


def fetch_plan(plan_ref: Any) -> Any:
    """A whole-dataset step's plan, passed to a row function as an ObjectRef (or already
    resolved by Ray), fetched once per worker process; the last few plans are kept."""
    import ray

    if not isinstance(plan_ref, ray.ObjectRef):
        return plan_ref
    key = plan_ref.hex()
    if key not in _PLANS:
        if len(_PLANS) >= 4:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = ray.get(plan_ref)
    return _PLANS[key]


def live(t: pa.Table) -> pa.Array:
    """Rows neither quarantined nor dropped."""
    return pc.and_(pc.is_null(t.column("_error")), pc.is_null(t.column("_drop")))


def _set(t: pa.Table, name: str, values: Any) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, values)


def prepare(table: pa.Table, max_doc_chars: int) -> pa.Table:
    """Bookkeeping columns every step relies on, and the size guard: a document longer than
    `max_doc_chars` is quarantined (reason `too_large`) before any step holds it in memory."""
    n = len(table)
    step = pc.if_else(pc.is_valid(table.column("_error")), pa.scalar("read"), pa.scalar(None, pa.string()))
    too_large = pc.fill_null(pc.greater(pc.utf8_length(table.column("text")), max_doc_chars), False)
    too_large = pc.and_(too_large, pc.is_null(table.column("_error")))
    if pc.any(too_large).as_py():
        table = _set(table, "_error", pc.if_else(too_large, pa.scalar(f"too_large (> {max_doc_chars} characters)"),
                                                 table.column("_error")))
        raw = pc.utf8_slice_codeunits(pc.fill_null(table.column("text"), ""), 0, RAW_KEEP)
        table = _set(table, "_raw", pc.if_else(too_large, raw, table.column("_raw")))
        table = _set(table, "text", pc.if_else(too_large, pa.scalar(None, pa.string()), table.column("text")))
        step = pc.if_else(too_large, pa.scalar("limits"), step)
    return (table.append_column("_drop", pa.nulls(n, pa.string()))
            .append_column("_step", step)
            .append_column("language", pa.nulls(n, pa.string()))
            .append_column("language_score", pa.nulls(n, pa.float64()))
            .append_column("augmented", pa.array([False] * n, pa.bool_())))


# --- cleaning --------------------------------------------------------------------------------

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
    return _set(table, "text", text)


def fix_unicode(table: pa.Table, cfg: FixUnicodeStep) -> pa.Table:
    import ftfy

    config = ftfy.TextFixerConfig(unescape_html=cfg.unescape_html, uncurl_quotes=cfg.uncurl_quotes,
                                  fix_latin_ligatures=cfg.fix_latin_ligatures, normalization=None,
                                  explain=False)
    texts = [ftfy.fix_text(t, config) for t in table.column("text").to_pylist()]
    return _set(table, "text", pa.array(texts, pa.string()))


# --- quality (Gopher) ------------------------------------------------------------------------------

_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")


def quality_reason(text: str, cfg: QualityStep) -> str | None:
    """The first Gopher rule `text` fails, or None."""
    words = _WORD.findall(text)
    n = len(words)
    if cfg.min_words is not None and n < cfg.min_words:
        return "too_few_words"
    if cfg.max_words is not None and n > cfg.max_words:
        return "too_many_words"
    if n:
        mean = sum(map(len, words)) / n
        if cfg.min_mean_word_length is not None and mean < cfg.min_mean_word_length:
            return "mean_word_length_low"
        if cfg.max_mean_word_length is not None and mean > cfg.max_mean_word_length:
            return "mean_word_length_high"
    if cfg.max_symbol_word_ratio is not None and n:
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if symbols / n > cfg.max_symbol_word_ratio:
            return "symbol_ratio"
    if cfg.max_digit_ratio is not None:
        chars = len(text) - sum(text.count(c) for c in " \n\t")
        if chars and sum(c.isdigit() for c in text) / chars > cfg.max_digit_ratio:
            return "digit_ratio"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if lines and (cfg.max_duplicate_line_fraction is not None or cfg.max_duplicate_line_char_fraction is not None):
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for ln in lines:
            if ln in seen:
                dup_lines += 1
                dup_chars += len(ln)
            seen.add(ln)
        if cfg.max_duplicate_line_fraction is not None and dup_lines / len(lines) > cfg.max_duplicate_line_fraction:
            return "duplicate_lines"
        total = sum(map(len, lines))
        if (cfg.max_duplicate_line_char_fraction is not None and total
                and dup_chars / total > cfg.max_duplicate_line_char_fraction):
            return "duplicate_line_chars"
    if cfg.max_top_ngram_fraction and n:
        lower = [w.lower() for w in words]
        word_chars = sum(map(len, lower))
        for k, limit in sorted(cfg.max_top_ngram_fraction.items()):
            if n < k:
                continue
            top, count = Counter(zip(*(lower[i:] for i in range(k)))).most_common(1)[0]
            if count > 1 and count * sum(map(len, top)) / word_chars > limit:
                return f"top_{k}gram"
    if cfg.min_alpha_word_ratio is not None and n:
        if sum(1 for w in words if _ALPHA.search(w)) / n < cfg.min_alpha_word_ratio:
            return "alpha_word_ratio"
    return None


def quality(table: pa.Table, cfg: QualityStep) -> pa.Table:
    reasons = [quality_reason(t, cfg) for t in table.column("text").to_pylist()]
    return _set(table, "_drop", pa.array(reasons, pa.string()))


# --- language ------------------------------------------------------------------------------------

_IDENTIFIER = None


def _identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid import langid

        _IDENTIFIER = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def _sample(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    third = n // 3
    mid = len(text) // 2 - third // 2
    return "\n".join((text[:third], text[mid:mid + third], text[-third:]))


def language(table: pa.Table, cfg: LanguageStep) -> pa.Table:
    ident = _identifier()
    langs, scores, drops = [], [], []
    keep = set(cfg.languages) if cfg.languages else None
    for text in table.column("text").to_pylist():
        lang, score = ident.classify(_sample(text, cfg.sample_chars))
        langs.append(lang)
        scores.append(float(score))
        if keep is not None and lang not in keep:
            drops.append("not_in_languages")
        elif score < cfg.min_score:
            drops.append("low_score")
        else:
            drops.append(None)
    table = _set(table, "language", pa.array(langs, pa.string()))
    table = _set(table, "language_score", pa.array(scores, pa.float64()))
    return _set(table, "_drop", pa.array(drops, pa.string()))


def _pii(table: pa.Table, cfg: Any) -> pa.Table:
    from raylm.data.pii import redact_column

    return redact_column(table, cfg)


def _augment(table: pa.Table, cfg: Any) -> pa.Table:
    from raylm.data.augment import augment_table

    return augment_table(table, cfg)


STEPS: dict[str, Callable[[pa.Table, Any], pa.Table]] = {
    "normalize": normalize,
    "fix_unicode": fix_unicode,
    "quality": quality,
    "language": language,
    "pii": _pii,
    "augment": _augment,
}


# --- the wrapper ------------------------------------------------------------------------------------

def step_keys(steps: list[Any]) -> list[str]:
    """Each step's key in counts and reasons: its name, or name#i when it appears twice."""
    names = Counter(s.name for s in steps)
    return [s.name if names[s.name] == 1 else f"{s.name}#{i}" for i, s in enumerate(steps)]


def stat_columns(index: int) -> tuple[str, str, str]:
    return f"_stat{index}_changed", f"_stat{index}_bytes", f"_stat{index}_added"


def _quarantine_rows(rows: pa.Table, key: str, errors: list[str]) -> pa.Table:
    rows = _set(rows, "_error", pa.array(errors, pa.string()))
    rows = _set(rows, "_step", pa.array([key] * len(rows), pa.string()))
    return _set(rows, "_raw", pc.utf8_slice_codeunits(pc.fill_null(rows.column("text"), ""), 0, RAW_KEEP))


def _apply(fn: Callable, live: pa.Table, cfg: Any, key: str) -> tuple[pa.Table, pa.Table | None, pa.Table]:
    """Run the step on the live rows; if the batch fails, row by row, quarantining the rows that
    raise. Returns (outputs of the rows that worked, the inputs they came from, quarantined rows)."""
    try:
        return fn(live, cfg), None, live.slice(0, 0)
    except Exception:  # noqa: BLE001 - find the rows that fail; the others go on
        pass
    outs, ins, bad, errors = [], [], [], []
    for i in range(len(live)):
        row = live.slice(i, 1)
        try:
            outs.append(fn(row, cfg))
            ins.append(row)
        except Exception as e:  # noqa: BLE001
            bad.append(row)
            errors.append(f"{type(e).__name__}: {e}"[:500])
    good_out = pa.concat_tables(outs, promote_options="default") if outs else fn(live.slice(0, 0), cfg)
    good_in = pa.concat_tables(ins) if ins else live.slice(0, 0)
    quarantined = _quarantine_rows(pa.concat_tables(bad), key, errors) if bad else live.slice(0, 0)
    return good_out, good_in, quarantined


def run_step(table: pa.Table, cfg: Any, index: int, key: str, fn: Callable | None = None) -> pa.Table:
    """Apply step number `index` to the live rows of `table` and add its per-row stats columns
    (`changed`, `bytes` delta and `added` for the rows it created). Rows already dropped or
    quarantined pass through untouched. `fn` replaces the registered function (the apply phase
    of a whole-dataset step, with its plan bound)."""
    live_mask = live(table)
    rows, dead = table.filter(live_mask), table.filter(pc.invert(live_mask))
    out, inputs, quarantined = _apply(fn or STEPS[cfg.name], rows, cfg, key)
    before = (inputs if inputs is not None else rows).column("text")
    n_orig = len(before)
    # Reasons the step set get its key as a prefix.
    drop = out.column("_drop")
    out = _set(out, "_drop", pc.if_else(pc.is_valid(drop), pc.binary_join_element_wise(key, drop, "."), drop))
    out = _set(out, "_step", pc.if_else(pc.is_valid(drop), pa.scalar(key), out.column("_step")))
    if len(out) > n_orig:  # added rows carry no stats of earlier steps (they did not run on them)
        for name in out.column_names:
            if name.startswith("_") and name not in BOOKKEEPING:
                vals = out.column(name).combine_chunks()
                fill = pa.nulls(len(out) - n_orig, vals.type) if not pa.types.is_integer(vals.type) \
                    else pa.array([0] * (len(out) - n_orig), vals.type)
                out = _set(out, name, pa.concat_arrays([vals.slice(0, n_orig), fill]))
    after = out.column("text").slice(0, n_orig)
    changed = pc.fill_null(pc.not_equal(before, after), False)
    delta = pc.fill_null(pc.subtract(pc.binary_length(after), pc.binary_length(before)), 0)
    added = [0] * n_orig + [1] * (len(out) - n_orig)
    col_changed, col_bytes, col_added = stat_columns(index)
    zeros = pa.array([0] * (len(out) - n_orig), pa.int64())
    out = out.append_column(col_changed, pa.concat_arrays([pc.cast(changed, pa.int64()).combine_chunks(), zeros]))
    out = out.append_column(col_bytes, pa.concat_arrays([pc.cast(delta, pa.int64()).combine_chunks(), zeros]))
    out = out.append_column(col_added, pa.array(added, pa.int64()))
    rest = pa.concat_tables([dead, quarantined], promote_options="default")
    return pa.concat_tables([out, rest], promote_options="default")


def mark_empty(table: pa.Table) -> pa.Table:
    """Drop (with reason `empty_text`) live rows whose text is empty after the steps."""
    empty = pc.and_(live(table), pc.equal(pc.utf8_length(pc.fill_null(table.column("text"), "")), 0))
    table = _set(table, "_drop", pc.if_else(empty, pa.scalar("empty_text"), table.column("_drop")))
    return _set(table, "_step", pc.if_else(empty, pa.scalar("filter_empty"), table.column("_step")))
