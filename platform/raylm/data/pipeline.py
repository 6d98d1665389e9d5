"""The data-preparation pipeline: sources -> steps -> split -> tokenizer -> tokens -> packed
blocks, written as one dataset version.

A dataset version lives at `<root>/<name>/<version>/`:
  manifest.json        sources, config, counts per step, tokens, version id (written last)
  tokenizer/           a Hugging Face tokenizer directory
  docs/<split>/        parquet: one row per document (id, text, label, metadata, input_ids)
  packed/<split>/      parquet: `input_ids` blocks of `pack.seq_len` tokens, EOS between documents
  quarantine/          JSON lines: records that could not be parsed, with the reason
The version id is a hash of the source fingerprints and the config (not of when or where it
ran), so running again with the same inputs and config finds the version and reuses it.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

import raylm
from raylm import storage
from raylm.cluster import home
from raylm.data import sources
from raylm.data.augment import augment_table
from raylm.data.config import DataConfig
from raylm.data.steps import live as _live
from raylm.data.steps import mark_empty, prepare, run_step, stat_columns, step_keys
from raylm.data.tokenize import (
    SPLITS, assign_split, check_conversations, eos_of, load_pretrained, pack, save_hf, to_hf, tokenize_batch,
    pad, pad_pairs, pad_rated, tokenize_chat_batch, tokenize_pair_batch, tokenize_rated_batch, tokenizer_key, train_bpe,
    whole_documents, with_answers,
)

PIPELINE_VERSION = 4  # bump when a step's output changes for the same config (4: augment reads `label`'s column)
MANIFEST = "manifest.json"


def log(msg: str) -> None:
    print(f"[data] {msg}", flush=True)


def default_root() -> str:
    return str(home() / "datasets")


# fields added to a source's config after versions were built: left out of the version id at their defaults
_LATER_SOURCE_FIELDS = {"format": "text", "messages_field": "messages", "prompt_field": None, "response_field": None,
                        "system_prompt": None, "chosen_field": None, "rejected_field": None,
                        "completion_field": None, "rating_field": None}


def chat_spec(cfg: DataConfig) -> tuple[str, dict[str, Any]]:
    """A chat dataset's template and the special tokens it is rendered with (those of the tokenizer
    the dataset will have: a pretrained one's, or the BPE's from the config). A template that does
    not render is a config error, before anything runs."""
    from raylm import chat
    from raylm.config import ConfigError

    tcfg = cfg.tokenizer
    if tcfg.kind == "pretrained":
        tok = load_pretrained(tcfg.path)
        template, special = chat.template_of(tcfg.chat_template, tok.chat_template), dict(tok.special_tokens_map)
    else:
        template = chat.template_of(tcfg.chat_template, None)
        special = {"bos_token": tcfg.eos_token, "eos_token": tcfg.eos_token, "pad_token": tcfg.pad_token}
    try:
        chat.segments([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                      chat.renderer(template, special))
    except chat.ConversationError as e:
        raise ConfigError(f"tokenizer.chat_template: {e}") from None
    return template, special


def version_id(cfg: DataConfig, fingerprints: list[dict[str, Any]], chat_template: Optional[str] = None) -> str:
    """Content hash of the inputs and of everything in the config that shapes the output.
    chat_template: a chat dataset's resolved template, when the caller has it (`chat_spec`)."""
    conf = cfg.model_dump(mode="json", exclude={"output": True, "tokenize": True, "report": True})
    for s in conf["sources"]:
        s.pop("cache_dir", None)
        for k, default in _LATER_SOURCE_FIELDS.items():  # versions built before these fields keep their ids
            if k in s and s[k] == default:
                s.pop(k)
    if conf["tokenizer"].get("chat_template") is None:
        conf["tokenizer"].pop("chat_template", None)
    if not cfg.chat:  # how conversations are laid out: nothing to do with documents
        conf["pack"].pop("conversations", None)
    payload = {"pipeline": PIPELINE_VERSION, "config": conf, "sources": fingerprints}
    if cfg.chat:  # the template conversations are rendered with, wherever it comes from (a default too)
        payload["chat_template"] = chat_template or chat_spec(cfg)[0]
        if cfg.pack.conversations == "pack":  # blocks with position_ids (session 34): not the versions before
            payload["pack_positions"] = True
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return "v" + digest[:12]


# --- batch functions (run in Ray tasks) ----------------------------------------------------

def _only_live(t: pa.Table, label: str | None) -> pa.Table:
    t = t.filter(_live(t))
    t = t.drop_columns([c for c in t.column_names if c.startswith("_")])
    if label and label != "label":
        t = t.set_column(t.schema.get_field_index("label"), "label", t.column(label))
    return t


def _only_errors(t: pa.Table) -> pa.Table:
    t = t.filter(pc.is_valid(t.column("_error")))
    return pa.table({"where": t.column("id"), "source": t.column("source"), "step": t.column("_step"),
                     "reason": t.column("_error"), "raw": t.column("_raw")})


def _only_split(t: pa.Table, split: str) -> pa.Table:
    return t.filter(pc.equal(t.column("split"), split))


def _tally_docs(t: pa.Table) -> pa.Table:
    c: Counter = Counter()
    c["rows"] += len(t)
    for step, reason in zip(t.column("_step").to_pylist(), t.column("_error").to_pylist()):
        if reason is not None:
            c[f"quarantined.{step}|{reason.split(' (', 1)[0]}"] += 1
    for reason in t.column("_drop").drop_null().to_pylist():
        c[f"dropped.{reason}"] += 1
    for name in t.column_names:
        if name.startswith(("_stat", "_pii_")) or name == "_boiler_lines":
            c[name] += int(pc.sum(t.column(name)).as_py() or 0)
    if "_boiler_blocks" in t.column_names:
        for blocks in t.column("_boiler_blocks").to_pylist():
            for b in blocks or []:
                c["boilerplate_block." + b] += 1
    live = t.filter(_live(t))
    for split in live.column("split").to_pylist():
        c[f"split.{split}.documents"] += 1
    for lang in live.column("language").drop_null().to_pylist():
        c[f"language.{lang}"] += 1
    c["augmented"] += int(pc.sum(pc.cast(live.column("augmented"), pa.int64())).as_py() or 0)
    c["live.bytes"] += int(pc.sum(pc.binary_length(live.column("text"))).as_py() or 0)
    return pa.table({"tally": [json.dumps(c)]})


def _tally_tokens(t: pa.Table, seq_len: int) -> pa.Table:
    c: Counter = Counter()
    longest = t.column("longest_side" if "longest_side" in t.column_names else "num_tokens").to_pylist()
    for split, n, side in zip(t.column("split").to_pylist(), t.column("num_tokens").to_pylist(), longest):
        c[f"split.{split}.tokens"] += n
        c[f"split.{split}.longer_than_a_block"] += side > seq_len  # (a preference pair: its longer side)
    return pa.table({"tally": [json.dumps(c)]})


def _tally_desirable(t: pa.Table) -> pa.Table:
    return pa.table({"tally": [json.dumps({"desirable": int(pc.sum(pc.cast(t.column("desirable"), pa.int64())).as_py()
                                                            or 0)})]})


def _tally_trained(t: pa.Table) -> pa.Table:
    return pa.table({"tally": [json.dumps({"trained_tokens": int(pc.sum(t.column("trained_tokens")).as_py() or 0)})]})


def _lengths(t: pa.Table, vocab: int) -> pa.Table:
    """Per document: characters and tokens; per batch: how often each token id occurs."""
    counts = np.bincount(pc.list_flatten(t.column("input_ids")).to_numpy(zero_copy_only=False), minlength=vocab)
    return pa.table({"chars": pc.cast(pc.utf8_length(t.column("text")), pa.int64()), "tokens": t.column("num_tokens"),
                     "token_counts": [counts.tolist()] + [None] * (len(t) - 1)},
                    schema=pa.schema([("chars", pa.int64()), ("tokens", pa.int64()),
                                      ("token_counts", pa.list_(pa.int64()))]))


def _report(tokenized: ray.data.Dataset, manifest: dict[str, Any], hf_tok, uri: str) -> None:
    from raylm.data import report

    vocab = len(hf_tok)
    chars, tokens = [], []
    token_counts = np.zeros(vocab, dtype=np.int64)
    for b in tokenized.map_batches(_lengths, fn_kwargs={"vocab": vocab}, batch_format="pyarrow",
                                   batch_size=None).iter_batches(batch_format="pyarrow"):
        chars.append(b.column("chars").to_numpy())
        tokens.append(b.column("tokens").to_numpy())
        for c in b.column("token_counts").drop_null().to_pylist():
            token_counts[: len(c)] += np.asarray(c[:vocab], dtype=np.int64)
    top = np.argsort(-token_counts)[:30]
    top_tokens = [(hf_tok.decode([int(i)]), int(token_counts[i])) for i in top if token_counts[i] > 0]
    report.write(manifest, {"chars": np.concatenate(chars), "tokens": np.concatenate(tokens)}, top_tokens, uri)


def _tally(ds: ray.data.Dataset, fn) -> Counter:
    total: Counter = Counter()
    for row in ds.map_batches(fn, batch_format="pyarrow", batch_size=None).take_all():
        total.update(json.loads(row["tally"]))
    return total


# --- whole-dataset steps: a plan computed over all rows, then applied per batch -----------------

WHOLE_DATASET_STEPS = ("boilerplate", "dedup_exact", "dedup_near")


def _plan(ds: ray.data.Dataset, step: Any) -> tuple[Any, dict[str, Any]]:
    """(the apply function with its plan bound, what the manifest records about the plan)."""
    from raylm.data import boilerplate, dedup

    if step.name == "boilerplate":
        p = boilerplate.plan(ds, step)
        ref = ray.put(p.pop("hashes"))
        return functools.partial(boilerplate.apply, plan_ref=ref), p
    p = dedup.exact_plan(ds, step) if step.name == "dedup_exact" else dedup.near_plan(ds, step)
    ref = ray.put(p.pop("drop"))
    return functools.partial(dedup.apply_plan, plan_ref=ref, reason=p["reason"]), p


def _plan_summary(name: str, p: dict[str, Any]) -> str:
    if name == "boilerplate":
        return f"windows in >= {p['min_docs']} of {p['documents']} documents are boilerplate"
    removed = sum((size - 1) * n for size, n in p["clusters"].items())
    extra = f", {p['bands']} bands x {p['rows']} rows, {p['candidates']} candidate pairs" if "bands" in p else ""
    return f"{removed} duplicates in {sum(p['clusters'].values())} clusters{extra}"


# --- the pipeline -------------------------------------------------------------------------

def _step_rows(cfg: DataConfig, keys: list[str], tally: Counter, plans: dict[str, Any]) -> list[dict[str, Any]]:
    """Per step: rows in, rows out, dropped per reason, quarantined per reason, rows changed,
    bytes changed, rows added, and what the step found (PII per type, duplicate clusters,
    boilerplate blocks). For every step rows_out = rows_in + added - dropped - quarantined."""
    quarantined: dict[str, dict[str, int]] = {}
    for k, v in tally.items():
        if k.startswith("quarantined."):
            step, reason = k[len("quarantined."):].split("|", 1)
            quarantined.setdefault(step, {})[reason] = v
    dropped: dict[str, dict[str, int]] = {}
    for k, v in tally.items():
        if k.startswith("dropped."):
            reason = k[len("dropped."):]
            step, _, why = reason.partition(".") if reason != "empty_text" else ("filter_empty", "", reason)
            dropped.setdefault(step, {})[why] = v
    added_total = sum(tally.get(stat_columns(i)[2], 0) for i in range(len(cfg.steps)))
    records = tally["rows"] - added_total
    q_read = {**quarantined.get("read", {}), **quarantined.get("limits", {})}
    rows = [{"step": "read", "rows_in": records, "rows_out": records - sum(q_read.values()),
             "quarantined": q_read}]
    for i, (step, key) in enumerate(zip(cfg.steps, keys)):
        col_changed, col_bytes, col_added = stat_columns(i)
        row: dict[str, Any] = {"step": key, "rows_in": rows[-1]["rows_out"], "dropped": dropped.get(key, {}),
                               "quarantined": quarantined.get(key, {}), "rows_added": tally.get(col_added, 0),
                               "rows_changed": tally.get(col_changed, 0), "bytes_delta": tally.get(col_bytes, 0)}
        row["rows_out"] = (row["rows_in"] + row["rows_added"] - sum(row["dropped"].values())
                           - sum(row["quarantined"].values()))
        if step.name == "pii":
            row["found"] = {k: tally.get(f"_pii_{k}", 0) for k in step.kinds}
        if step.name == "boilerplate":
            blocks = Counter({k[len("boilerplate_block."):]: v for k, v in tally.items()
                              if k.startswith("boilerplate_block.")})
            row["lines_removed"] = tally.get("_boiler_lines", 0)
            row["blocks"] = [{"documents": n, "sample": b} for b, n in blocks.most_common(10)]
        if step.name == "language":
            row["languages"] = {k.split(".", 1)[1]: v for k, v in tally.items() if k.startswith("language.")}
        row.update(plans.get(key, {}))
        rows.append(row)
    empty = dropped.get("filter_empty", {})
    rows.append({"step": "filter_empty", "rows_in": rows[-1]["rows_out"], "dropped": empty,
                 "rows_out": rows[-1]["rows_out"] - sum(empty.values())})
    if cfg.chat:  # conversations the steps left unreadable, or the template cannot render
        bad = quarantined.get("chat", {})
        rows.append({"step": "chat", "rows_in": rows[-1]["rows_out"], "quarantined": bad,
                     "rows_out": rows[-1]["rows_out"] - sum(bad.values())})
    return rows


def find_existing(root: str, name: str, version: str) -> dict[str, Any] | None:
    uri = storage.join(root, name, version, MANIFEST)
    return storage.read_json(uri) if storage.exists(uri) else None


def existing_version(cfg: DataConfig) -> dict[str, Any] | None:
    """The manifest of the version `cfg` would build, when it exists already (None otherwise, or
    with output.rebuild)."""
    root = storage.normalize(cfg.output.root or default_root())
    version = version_id(cfg, [sources.fingerprint(s) for s in cfg.sources])
    return None if cfg.output.rebuild else find_existing(root, cfg.name, version)


def run(cfg: DataConfig) -> dict[str, Any]:
    """Build (or reuse) the dataset version that `cfg` describes; returns its manifest."""
    t0 = time.time()
    root = storage.normalize(cfg.output.root or default_root())
    fingerprints = [sources.fingerprint(s) for s in cfg.sources]
    chat = chat_spec(cfg) if cfg.chat else None  # (template, special tokens) of a dataset of conversations
    version = version_id(cfg, fingerprints, chat[0] if chat else None)
    final = storage.join(root, cfg.name, version)
    existing = find_existing(root, cfg.name, version)
    if existing and not cfg.output.rebuild:
        log(f"{cfg.name}@{version} already exists at {final}: reusing it (set output.rebuild=true to rebuild)")
        return {**existing, "reused": True}

    local = storage.is_local(root)
    # Where this run writes. Local: a staging directory, renamed into place at the end. Object
    # stores (no rename): an attempt directory of its own inside the version, which the
    # manifest (written last, with an exclusive create) points at: two jobs building the same
    # version at once never write into each other's files, and readers see one whole attempt.
    attempt = uuid.uuid4().hex[:8]
    work = storage.join(root, cfg.name, "_staging", f"{version}-{attempt}") if local else \
        storage.join(final, f"_attempt-{attempt}")
    data_uri = final if local else work  # where the published files live
    fs, _ = storage.arrow_fs(root)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs -> same rows in the same order

    # 1. read, parse, clean, split -------------------------------------------------------------
    log(f"building {cfg.name}@{version} from {len(cfg.sources)} source(s)")
    datasets = [sources.read(s) for s in cfg.sources]
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    ds = ds.map_batches(prepare, fn_kwargs={"max_doc_chars": cfg.limits.max_doc_chars}, batch_format="pyarrow",
                        batch_size=None)
    ds = ds.map_batches(assign_split, fn_kwargs={"cfg": cfg.split}, batch_format="pyarrow", batch_size=None)
    keys = step_keys(cfg.steps)
    plans: dict[str, dict[str, Any]] = {}
    for i, (step, key) in enumerate(zip(cfg.steps, keys)):
        fn = None
        if step.name in WHOLE_DATASET_STEPS:
            ds = ds.materialize()
            t_step = time.time()
            fn, plans[key] = _plan(ds, step)
            log(f"step {key}: planned over the whole dataset in {time.time() - t_step:.1f}s "
                f"({_plan_summary(step.name, plans[key])})")
        if step.name == "augment" and cfg.label and cfg.label != "label":  # only_labeled reads the label's column
            fn = functools.partial(augment_table, label_field=cfg.label)
        ds = ds.map_batches(run_step, fn_kwargs={"cfg": step, "index": i, "key": key, "fn": fn},
                            batch_format="pyarrow", batch_size=None)
    ds = ds.map_batches(mark_empty, batch_format="pyarrow", batch_size=None)
    if chat:
        ds = ds.map_batches(check_conversations, fn_kwargs={"template": chat[0], "special_tokens": chat[1],
                                                            "pairs": cfg.preference, "rated": cfg.rated},
                            batch_format="pyarrow", batch_size=None)
    ds = ds.materialize()
    tally = _tally(ds, _tally_docs)
    step_rows = _step_rows(cfg, keys, tally, plans)
    for row in step_rows:
        log(f"step {row['step']:<14} rows in {row['rows_in']:>7}  out {row['rows_out']:>7}"
            + "".join(f"  {what} {sum(row[what].values())}" for what in ("dropped", "quarantined")
                      if sum(row.get(what, {}).values()))
            + (f"  added {row['rows_added']}" if row.get("rows_added") else "")
            + (f"  changed {row['rows_changed']}" if row.get("rows_changed") else ""))
    n_quarantined = sum(v for k, v in tally.items() if k.startswith("quarantined."))

    quarantine_uri = storage.join(data_uri, "quarantine")
    if n_quarantined:
        ds.map_batches(_only_errors, batch_format="pyarrow", batch_size=None).write_json(
            storage.arrow_fs(storage.join(work, "quarantine"))[1], filesystem=fs)
    kept = ds.map_batches(_only_live, fn_kwargs={"label": cfg.label}, batch_format="pyarrow",
                          batch_size=None).materialize()
    n_kept = kept.count()
    if n_kept == 0:
        raise ValueError("no documents left after parsing and the steps: nothing to tokenize "
                         f"(quarantined {n_quarantined}; see the counts above)")
    n_train = tally.get("split.train.documents", 0)
    if n_train == 0:
        raise ValueError(f"the train split is empty ({n_kept} documents kept): adjust split ratios or add data")

    # 2. tokenizer ------------------------------------------------------------------------------
    tcfg = cfg.tokenizer
    if tcfg.kind == "bpe":
        log(f"training a byte-level BPE tokenizer (vocab {tcfg.vocab_size}) on {n_train} train documents")

        def train_texts() -> Iterator[str]:
            train_ds = kept.map_batches(_only_split, fn_kwargs={"split": "train"}, batch_format="pyarrow",
                                        batch_size=None)
            for batch in train_ds.iter_batches(batch_format="pyarrow", batch_size=64):
                yield from batch.column("text").to_pylist()

        backend = train_bpe(train_texts(), tcfg)
        hf_tok = to_hf(backend, tcfg)
    else:
        log(f"loading the tokenizer in {tcfg.path}")
        hf_tok = load_pretrained(tcfg.path)
        backend = hf_tok.backend_tokenizer
    eos_token, eos_id = eos_of(hf_tok)
    pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else eos_id  # chat blocks: after the end
    if chat:
        got = {k: hf_tok.special_tokens_map.get(k) for k in chat[1]}
        if got != chat[1]:
            raise RuntimeError(f"the tokenizer's special tokens {got} are not the ones conversations were checked "
                               f"with ({chat[1]})")
        hf_tok.chat_template = chat[0]  # saved with the tokenizer: models trained on this dataset are served with it
    save_hf(hf_tok, storage.join(work, "tokenizer"))

    # 3. tokenize in Ray Data tasks ---------------------------------------------------------------
    tc = cfg.tokenize
    backend, dropped = whole_documents(backend)
    if dropped:
        log(f"the tokenizer's {' and '.join(dropped)} are off for this job: documents are counted and "
            "packed whole (training and serving cut to their model's length)")
    log(f"tokenizing {n_kept} documents, {tc.concurrency} task(s) at once")
    tokenizer_json = backend.to_str()
    tok_kwargs: dict[str, Any] = {"tokenizer_json": tokenizer_json, "key": tokenizer_key(tokenizer_json)}
    if chat:
        tok_kwargs.update(template=chat[0], special_tokens=chat[1])
    tokenized = kept.map_batches(
        (tokenize_pair_batch if cfg.preference else tokenize_rated_batch if cfg.rated else tokenize_chat_batch)
        if chat else tokenize_batch,
        fn_kwargs=tok_kwargs,
        batch_size=tc.batch_size, batch_format="pyarrow", compute=ray.data.TaskPoolStrategy(size=tc.concurrency),
        num_cpus=tc.num_cpus,
    ).materialize()
    tok_tally = _tally(tokenized, functools.partial(_tally_tokens, seq_len=cfg.pack.seq_len))

    # 4. write the per-document view and the packed blocks, per split ------------------------------------
    splits: dict[str, dict[str, int]] = {}
    pack_rows: list[dict[str, Any]] = []
    for split in SPLITS:
        docs = tokenized.map_batches(_only_split, fn_kwargs={"split": split}, batch_format="pyarrow",
                                     batch_size=None)
        n_docs = tally.get(f"split.{split}.documents", 0)
        n_tokens = tok_tally.get(f"split.{split}.tokens", 0)
        n_blocks = 0
        if n_docs:
            docs.write_parquet(storage.arrow_fs(storage.join(work, "docs", split))[1], filesystem=fs)
            if chat and cfg.pack.conversations == "pad":  # a block per conversation
                blocks = docs.map_batches(pad_pairs if cfg.preference else pad_rated if cfg.rated else pad,
                                          fn_kwargs={"seq_len": cfg.pack.seq_len, "pad_id": pad_id},
                                          batch_format="pyarrow", batch_size=None).materialize()
            else:
                blocks = docs.map_batches(pack, fn_kwargs={"seq_len": cfg.pack.seq_len,
                                                           "eos_id": None if chat else eos_id},
                                          batch_format="pyarrow", batch_size=None).materialize()
            if chat:  # blocks with no answer token in them are left out (counted)
                n_all = blocks.count()
                blocks = blocks.map_batches(with_answers, batch_format="pyarrow", batch_size=None).materialize()
                n_blocks = blocks.count()
                # (a tally, not `Dataset.sum`: Ray Data's aggregate starts hash-shuffle actors, 3-4 s a split)
                chat_counts = {"blocks_without_answer": n_all - n_blocks,
                               "trained_tokens": _tally(blocks, _tally_trained)["trained_tokens"] if n_blocks else 0,
                               "conversations_cut": tok_tally.get(f"split.{split}.longer_than_a_block", 0)
                               if cfg.pack.conversations == "pad" else 0}
                if cfg.rated:  # KTO weighs the two kinds: how many of each the split trains on
                    good = _tally(blocks, _tally_desirable)["desirable"] if n_blocks else 0
                    chat_counts.update(desirable=good, undesirable=n_blocks - good)
            else:
                n_blocks = blocks.count()
            if n_blocks:
                blocks.write_parquet(storage.arrow_fs(storage.join(work, "packed", split))[1], filesystem=fs)
        # padding included (pad: a block per conversation; a preference pair is two blocks, one per side)
        packed_tokens = n_blocks * cfg.pack.seq_len * (2 if cfg.preference or cfg.rated else 1)
        tokens_in = n_tokens if chat else n_tokens + n_docs  # + the EOS after each document
        splits[split] = {"documents": n_docs, "tokens": n_tokens, "blocks": n_blocks, "packed_tokens": packed_tokens}
        pack_rows.append({"split": split, "tokens_in": tokens_in, "tokens_out": packed_tokens,
                          "tokens_dropped_tail": tokens_in - packed_tokens})
        line = f"{split}: {n_docs} documents, {n_tokens} tokens, {n_blocks} blocks of {cfg.pack.seq_len}"
        if chat:
            splits[split].update(chat_counts if n_docs else {"blocks_without_answer": 0, "trained_tokens": 0,
                                                             "conversations_cut": 0,
                                                             **({"desirable": 0, "undesirable": 0} if cfg.rated else {})})
            pack_rows[-1].update(mode=cfg.pack.conversations, **{k: splits[split][k] for k in (
                "blocks_without_answer", "conversations_cut")})
            if cfg.pack.conversations == "pad":  # tokens_out is padded; what is lost is in conversations_cut
                pack_rows[-1]["tokens_dropped_tail"] = 0
            line += (f" ({splits[split]['trained_tokens']} answer tokens trained on; "
                     f"{splits[split]['blocks_without_answer']} blocks without one left out"
                     + (f"; {splits[split]['desirable']} rated good, {splits[split]['undesirable']} bad" if cfg.rated else "")
                     + (f"; {splits[split]['conversations_cut']} {'pairs with a side' if cfg.preference else 'conversations'}"
                        " longer than a block cut"
                        if cfg.pack.conversations == "pad" else "") + ")")
        log(line)

    # 5. manifest, then publish -------------------------------------------------------------------
    step_rows.append({"step": "tokenize", "rows_in": n_kept, "rows_out": n_kept,
                      "tokens_out": sum(s["tokens"] for s in splits.values())})
    step_rows.append({"step": "pack", "seq_len": cfg.pack.seq_len, "per_split": pack_rows})
    manifest = {
        "id": f"{cfg.name}@{version}",
        "name": cfg.name,
        "version": version,
        "uri": data_uri,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "raylm_version": raylm.__version__,
        "pipeline_version": PIPELINE_VERSION,
        "sources": fingerprints,
        "config": cfg.model_dump(mode="json"),
        "counts": {
            "records_read": step_rows[0]["rows_in"],
            "augmented": tally.get("augmented", 0),
            "quarantined": n_quarantined,
            "dropped": {k.split(".", 1)[1]: v for k, v in tally.items() if k.startswith("dropped.")},
            "documents": n_kept,
            "tokens": sum(s["tokens"] for s in splits.values()),
        },
        "steps": step_rows,
        "splits": splits,
        "tokenizer": {"kind": tcfg.kind, "path": "tokenizer", "vocab_size": len(hf_tok),
                      "eos_token": eos_token, "eos_id": eos_id},
        "files": {"docs": "docs/{split}", "packed": "packed/{split}", "tokenizer": "tokenizer",
                  "quarantine": "quarantine" if n_quarantined else None,
                  "report": "report/index.html" if cfg.report else None},
        "quarantine": {"uri": quarantine_uri if n_quarantined else None, "count": n_quarantined},
        "label": cfg.label,
        "format": cfg.format,
        "chat_template": chat[0] if chat else None,
        "seconds": round(time.time() - t0, 1),
    }
    if cfg.report:
        _report(tokenized, manifest, hf_tok, storage.join(work, "report"))
        log(f"data report: {storage.join(data_uri, 'report', 'index.html')}")
    storage.write_json(storage.join(work, MANIFEST), manifest)
    published = _publish(work, final, manifest, replace=cfg.output.rebuild)
    if published["uri"] != manifest["uri"]:
        log(f"another job published {manifest['id']} first: using its files at {published['uri']}")
        return {**published, "reused": True}
    log(f"wrote {manifest['id']} to {data_uri} in {manifest['seconds']}s")
    return manifest


def _publish(work: str, final: str, manifest: dict[str, Any], replace: bool = False) -> dict[str, Any]:
    """Commit a finished build; returns the manifest that stands. Local: rename the staged
    directory into place (atomic); a concurrent writer that got there first wins and ours is
    discarded, unless `replace` (a rebuild), which swaps the old version out. Object stores:
    create the version's manifest (pointing at our attempt) only if none exists; when another
    job's manifest is there first, ours is discarded and theirs stands (a rebuild overwrites)."""
    if not storage.is_local(final):
        uri = storage.join(final, MANIFEST)
        if replace:
            storage.write_json(uri, manifest)
            return manifest
        if storage.create_exclusive(uri, storage.json_bytes(manifest)):
            return manifest
        storage.remove(work)
        return storage.read_json(uri)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if replace and os.path.exists(final):
        old = f"{work}.old"
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final) and not os.path.exists(os.path.join(final, MANIFEST)):
        shutil.rmtree(final, ignore_errors=True)  # a stale, incomplete version
    try:
        os.rename(work, final)
    except OSError:
        if os.path.exists(os.path.join(final, MANIFEST)):
            shutil.rmtree(work, ignore_errors=True)  # someone published the same version first
        else:
            raise
    staging = os.path.dirname(work)
    if os.path.isdir(staging) and not os.listdir(staging):
        os.rmdir(staging)
    return manifest
