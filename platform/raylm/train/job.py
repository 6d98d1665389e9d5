"""`jobs/train.py`: train a model on a dataset version with Ray Train and register it."""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from raylm import config, reruns, storage, tracking
from raylm.train.config import TrainConfig
from raylm.train.resume import finished, run_storage, start_or_resume


MATERIALIZE_BYTES = 2 << 30  # packed datasets up to this size are read before training starts


def _tokenizer_digest(m: dict[str, Any]) -> str:
    return tokenizer_digest(storage.join(m["uri"], m["tokenizer"]["path"]))


def tokenizer_digest(base: str) -> str:
    """What makes two tokenizers (directories) the same: the model (vocabulary, merges) and the
    added tokens of `tokenizer.json`, not how the file happens to be formatted (nor the chat
    template beside it); every file's bytes otherwise."""
    import hashlib

    names = sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in storage.listdir(base))
    if "tokenizer.json" in names:
        doc = json.loads(storage.read_bytes(storage.join(base, "tokenizer.json")))
        added = sorted((t.get("id"), t.get("content")) for t in doc.get("added_tokens") or [])
        return hashlib.sha256(json.dumps([doc.get("model"), added], sort_keys=True).encode()).hexdigest()
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + storage.read_bytes(storage.join(base, name)))
    return h.hexdigest()


def _resolve(ref: str, root: Optional[str], what: str) -> dict[str, Any]:
    from raylm.data import versions

    try:
        return versions.resolve(ref, root)
    except FileNotFoundError as e:
        raise config.ConfigError(f"{what}: {e}") from None


def _label_counts(m: dict[str, Any], split: str) -> dict[str, int]:
    from raylm.data.versions import read_split

    if not m["splits"][split]["documents"]:
        return {}
    col = read_split(m, "docs", split, ["label"]).column("label")
    counts: dict[str, int] = {}
    for value in col.to_pylist():
        key = "<none>" if value is None else str(value)
        counts[key] = counts.get(key, 0) + 1
    return counts


def dataset_meta(cfg: TrainConfig) -> dict[str, Any]:
    """What the workers need to know about the dataset version(s) (a user error if missing)."""
    if cfg.model.task == "classification":
        return _classification_meta(cfg)
    refs = cfg.data.refs()
    found = [_resolve(ref, cfg.data.root, "data.dataset" if len(refs) == 1 else f"data.mixture[{i}]")
             for i, (ref, _) in enumerate(refs)]
    for m in found:
        if not m["splits"]["train"]["blocks"]:
            raise config.ConfigError(f"data: {m['id']} has no packed train blocks")
    # preference pairs, or rated answers (KTO): both two blocks a row (a rated answer's second block is
    # its prompt with another record's answer: KTO's reference point), trained alone
    pairs = [x["id"] for x in found if x.get("format") in ("preference", "rated")]
    what = "rated answers" if found[0].get("format") == "rated" else "preference pairs"
    if pairs and len(found) > 1:
        raise config.ConfigError(f"data.mixture: {', '.join(pairs)} holds {what}, which train alone "
                                 "(data.dataset with preference); a mixture is of documents and conversations")
    if pairs and cfg.preference is None:
        raise config.ConfigError(f"data.dataset: {pairs[0]} holds {what}: add a `preference:` section "
                                 + ("with loss: kto (KTO" if what == "rated answers" else "(DPO")
                                 + "; README \"Preference tuning\"), or train on a chat dataset")
    if cfg.preference is not None and not pairs:
        raise config.ConfigError(f"preference: {found[0]['id']} holds {found[0].get('format', 'text')} records; "
                                 "preference tuning needs a dataset of preference pairs (sources with format: "
                                 "preference), KTO one of rated answers (format: rated)")
    if pairs and (cfg.preference.loss == "kto") != (what == "rated answers"):
        raise config.ConfigError(
            f"preference.loss: {pairs[0]} holds rated answers, one answer each: preference.loss kto trains on them "
            f"({cfg.preference.loss} needs pairs of answers: `raylm feedback pairs`)" if what == "rated answers" else
            f"preference.loss: kto trains on answers rated one at a time (a dataset with format: rated, from `raylm "
            f"feedback ratings`); {pairs[0]} holds preference pairs (loss sigmoid, ipo, orpo or simpo)")
    m = found[0]
    meta = {
        "dataset_id": m["id"], "uri": m["uri"], "seq_len": m["config"]["pack"]["seq_len"],
        "vocab_size": m["tokenizer"]["vocab_size"], "eos_id": m["tokenizer"]["eos_id"], "pad_id": None,
        "tokenizer_uri": storage.join(m["uri"], m["tokenizer"]["path"]),
        "has_validation": any(x["splits"]["validation"]["blocks"] for x in found),
        "train_blocks": sum(x["splits"]["train"]["blocks"] for x in found),
        "validation_blocks": sum(x["splits"]["validation"]["blocks"] for x in found),
        # conversations (a loss mask: only answers trained on) in any of the datasets
        "format": "preference" if pairs else "chat" if any(x.get("format") == "chat" for x in found) else "text",
    }
    if what == "rated answers" and pairs:  # (KTO weighs the two kinds: the job says how they balance)
        meta["rated"] = {k: m["splits"]["train"].get(k, 0) for k in ("desirable", "undesirable")}
    if len(found) > 1:
        digest = _tokenizer_digest(m)
        for x in found[1:]:
            if x["config"]["pack"]["seq_len"] != meta["seq_len"]:
                raise config.ConfigError(f"data.mixture: {x['id']} has blocks of {x['config']['pack']['seq_len']} "
                                         f"tokens, {m['id']} of {meta['seq_len']}: a mixture needs one seq_len")
            if _tokenizer_digest(x) != digest:
                raise config.ConfigError(f"data.mixture: {x['id']} and {m['id']} have different tokenizers; build "
                                         "them with the same tokenizer (tokenizer.kind: pretrained, one path)")
        templates = {x.get("chat_template") for x in found if x.get("format") == "chat"}
        if len(templates) > 1:
            raise config.ConfigError("data.mixture: its chat datasets render conversations with different chat "
                                     "templates; build them with one tokenizer.chat_template")
        if meta["format"] == "chat":  # the exported tokenizer carries the conversations' template (serving uses it)
            first = next(x for x in found if x.get("format") == "chat")
            meta["tokenizer_uri"] = storage.join(first["uri"], first["tokenizer"]["path"])
        total = sum(x["splits"]["train"]["blocks"] for x in found)
        wsum = sum(w for _, w in refs)
        meta["mixture"] = [{"dataset": x["id"], "uri": x["uri"], "weight": w / wsum,
                            "available_blocks": x["splits"]["train"]["blocks"],
                            "blocks_per_epoch": max(1, round(w / wsum * total))}
                           for x, (_, w) in zip(found, refs)]
        meta["dataset_id"] = " + ".join(f"{x['dataset']} ({x['weight']:.0%})" for x in meta["mixture"])
        meta["train_blocks"] = sum(x["blocks_per_epoch"] for x in meta["mixture"])
        meta["validation_uris"] = [x["uri"] for x in found if x["splits"]["validation"]["blocks"]]
    return meta


def kto_balance(cfg: TrainConfig, counts: dict[str, int]) -> str:
    """What a KTO run trains on and how the two kinds weigh against each other, with a hint when
    that is outside what KTO's authors recommend (desirable_weight x good / (undesirable_weight x
    bad) within 1 to 4/3)."""
    p, good, bad = cfg.preference, counts.get("desirable", 0), counts.get("undesirable", 0)
    line = f"KTO on {good} answers rated good and {bad} rated bad (the train split)"
    if not good or not bad:
        return line + f": no answer rated {'good' if not good else 'bad'}, so the loss only pushes the other kind"
    ratio = p.desirable_weight * good / (p.undesirable_weight * bad)
    line += f"; desirable_weight x good / (undesirable_weight x bad) = {ratio:.2f}"
    if not 1 <= ratio <= 4 / 3:
        line += (f" (KTO's authors keep it within 1 to 4/3: preference.desirable_weight="
                 f"{p.undesirable_weight * bad / good:.3g} makes it 1)")
    return line


def _classification_meta(cfg: TrainConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    if cfg.data.mixture:
        raise config.ConfigError("data.mixture is for causal LM training; for classification build one dataset "
                                 "with several sources")
    m = _resolve(cfg.data.dataset, cfg.data.root, "data.dataset")
    if m.get("format") in ("chat", "preference", "rated"):
        raise config.ConfigError(f"data.dataset: {m['id']} holds conversations, which train a causal LM "
                                 "(model.task: causal_lm), not a classifier")
    counts = {split: _label_counts(m, split) for split in ("train", "validation")}
    train = {k: v for k, v in counts["train"].items() if k != "<none>"}
    if len(train) < 2:
        raise config.ConfigError(f"data.dataset: classification needs at least 2 labels in the train split of "
                                 f"{m['id']}; found {sorted(train) or 'none'} (set the data config's `label`)")
    labels = sorted(train)
    unusable = {split: sum(v for k, v in c.items() if k not in train) for split, c in counts.items()}
    path = cfg.model.local_path()
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except OSError as e:
        raise config.ConfigError(f"model.path: no tokenizer at {path}: {e}") from None
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    return {
        "dataset_id": m["id"], "uri": m["uri"], "seq_len": cfg.model.max_length, "vocab_size": len(tok),
        "eos_id": tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id,
        "pad_id": tok.pad_token_id, "cls_id": cls_id if cls_id is not None else 0, "tokenizer_path": path,
        "labels": labels, "label_counts": train, "unlabeled": unusable,
        "has_validation": any(k in train for k in counts["validation"]),
        "train_blocks": sum(train.values()), "validation_blocks": 0,
    }


_TOKENIZERS: dict[str, Any] = {}


def encode_texts(batch, tokenizer_path: str, max_length: int, labels: list[str], keep_text: bool = False,
                 windows: int = 1):
    """docs rows (text, label) -> fixed-length input_ids, attention_mask (the text's first
    `max_length` tokens) and label ids (and the `text`, with keep_text: for scoring a model that
    reads long texts in windows); rows whose label the model does not know (or none) are left out
    (counted in the driver). windows > 1 (`model.long_texts: windows`): also `window_ids` and
    `window_mask`, the text's consecutive windows of `max_length` tokens (at most `windows`, each a
    whole input: the tokenizer's own overflow, as the serving engine cuts them) end to end, from
    which training draws one a step and validation reads them all."""
    import numpy as np
    import pyarrow as pa

    from raylm.data.versions import with_labels

    if tokenizer_path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[tokenizer_path] = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    tok = _TOKENIZERS[tokenizer_path]
    batch = with_labels(batch, labels)
    texts = batch.column("text").to_pylist()
    index = {label: i for i, label in enumerate(labels)}
    offsets = pa.array(np.arange(0, (batch.num_rows + 1) * max_length, max_length, dtype=np.int32))

    def as_list(a, offs=offsets):
        return pa.ListArray.from_arrays(offs, pa.array(np.asarray(a, dtype=np.int32).ravel()))

    if windows > 1:
        enc = tok(texts, truncation=True, max_length=max_length, padding="max_length", return_overflowing_tokens=True,
                  return_tensors="np")
        owner = np.asarray(enc["overflow_to_sample_mapping"])
        rank = np.arange(len(owner)) - np.searchsorted(owner, owner)  # each window's place in its text
        keep = rank < windows
        ids, mask, owner = enc["input_ids"][keep], enc["attention_mask"][keep], owner[keep]
        first = np.searchsorted(owner, np.arange(batch.num_rows))  # a text's first window (texts give >= 1)
        per_text = np.bincount(owner, minlength=batch.num_rows)
        win_offsets = pa.array(np.concatenate([[0], np.cumsum(per_text) * max_length]).astype(np.int32))
        extra = {"window_ids": as_list(ids, win_offsets), "window_mask": as_list(mask, win_offsets)}
        ids, mask = ids[first], mask[first]
    else:
        enc = tok(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
        ids, mask, extra = enc["input_ids"], enc["attention_mask"], {}
    out = pa.table({"input_ids": as_list(ids), "attention_mask": as_list(mask),
                    "labels": pa.array([index[x] for x in batch.column("label").to_pylist()], pa.int64()), **extra})
    return out.append_column("text", batch.column("text")) if keep_text else out


def _train_windows(cfg: TrainConfig) -> int:
    """The windows a text gives training and validation: `model.max_windows` for a classifier that
    reads long texts in windows, else 1 (its first `max_length` tokens)."""
    return cfg.model.max_windows if cfg.model.long_texts == "windows" else 1


def _read(uri: str, *parts: str):
    import ray

    fs, path = storage.arrow_fs(storage.join(uri, *parts))
    return ray.data.read_parquet(path, filesystem=fs)


def with_loss_mask(blocks):
    """Packed blocks with a `loss_mask` and `position_ids` (and nothing else but `input_ids`): a
    chat dataset's own, or every token trained on (1s) and one sequence a block (positions 0..n-1)
    for a text dataset's blocks and padded conversations, so they all mix in one batch."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = blocks.column("input_ids").combine_chunks()
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if "loss_mask" not in blocks.column_names:
        ones = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(np.ones(offsets[-1], np.int8)))
        blocks = blocks.append_column("loss_mask", ones)
    if "position_ids" not in blocks.column_names:
        positions = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        blocks = blocks.append_column("position_ids", pa.ListArray.from_arrays(
            pa.array(offsets.astype(np.int32)), pa.array(positions.astype(np.int32), pa.int32())))
    return blocks.select(["input_ids", "loss_mask", "position_ids"])


def _read_blocks(uri: str, split: str, masked: bool):
    ds = _read(uri, "packed", split)
    return ds.map_batches(with_loss_mask, batch_format="pyarrow", batch_size=None) if masked else ds


def _datasets(cfg: TrainConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """The train (and validation) Ray Datasets: packed blocks, a weighted mixture of packed
    blocks, or tokenized labeled texts."""
    if cfg.model.task == "classification":
        out = {}
        for split in ("train", "validation"):
            if split == "train" or meta["has_validation"]:
                out[split] = _read(meta["uri"], "docs", split).select_columns(["text", "label"]).map_batches(
                    encode_texts, fn_kwargs={"tokenizer_path": meta["tokenizer_path"],
                                             "max_length": cfg.model.max_length, "labels": meta["labels"],
                                             "windows": _train_windows(cfg)},
                    batch_format="pyarrow", batch_size=256)
        return out
    if meta.get("mixture"):
        parts = []
        masked = meta.get("format") == "chat"
        for x in meta["mixture"]:
            ds, want = _read_blocks(x["uri"], "train", masked), x["blocks_per_epoch"]
            repeats = -(-want // x["available_blocks"])  # upsampling repeats a small dataset
            if repeats > 1:
                ds = ds.union(*[ds] * (repeats - 1))
            parts.append(ds.limit(want))
        out = {"train": parts[0].union(*parts[1:]).random_shuffle(seed=cfg.train.seed)}  # always: interleave
        if meta["validation_uris"]:
            vals = [_read_blocks(u, "validation", masked) for u in meta["validation_uris"]]
            out["validation"] = vals[0].union(*vals[1:]) if len(vals) > 1 else vals[0]
        return out
    out = {"train": _read(meta["uri"], "packed", "train")}
    if meta["has_validation"]:
        out["validation"] = _read(meta["uri"], "packed", "validation")
    return out


def read_tables(cfg: TrainConfig, meta: dict[str, Any], shuffle: Optional[bool] = None) -> dict[str, Any]:
    """The train (and validation) rows of `_datasets` as pyarrow tables read in this process:
    the same rows in the same order, without a Ray Data execution per split (~5 s of start-up
    on a laptop, for a few MB). For datasets small enough to hold in memory (MATERIALIZE_BYTES).
    shuffle: seeded like `_datasets` + `random_shuffle` (default: `train.shuffle`)."""
    import numpy as np
    import pyarrow as pa

    from raylm.data.versions import read_split

    def rows(uri: str, view: str, split: str, columns=None) -> pa.Table:
        return read_split({"uri": uri}, view, split, columns)

    t = cfg.train
    out: dict[str, pa.Table] = {}
    if cfg.model.task == "classification":
        for split in ("train", "validation"):
            if split == "train" or meta["has_validation"]:
                out[split] = encode_texts(rows(meta["uri"], "docs", split, ["text", "label"]),
                                          meta["tokenizer_path"], cfg.model.max_length, meta["labels"],
                                          keep_text="windows" in (cfg.model.long_texts, meta.get("long_texts")),
                                          windows=_train_windows(cfg))
    elif meta.get("mixture"):
        rng = np.random.default_rng(t.seed)
        parts = []
        masked = meta.get("format") == "chat"
        for x in meta["mixture"]:
            table, want = rows(x["uri"], "packed", "train"), x["blocks_per_epoch"]
            table = with_loss_mask(table) if masked else table
            repeats = -(-want // max(1, table.num_rows))  # upsampling repeats a small dataset
            parts.append(pa.concat_tables([table] * repeats).slice(0, want))
        train = pa.concat_tables(parts)
        out["train"] = train.take(rng.permutation(train.num_rows))  # always: interleave
        if meta["validation_uris"]:
            vals = [rows(u, "packed", "validation") for u in meta["validation_uris"]]
            out["validation"] = pa.concat_tables([with_loss_mask(v) for v in vals] if masked else vals)
    else:
        out["train"] = rows(meta["uri"], "packed", "train")
        if meta["has_validation"]:
            out["validation"] = rows(meta["uri"], "packed", "validation")
    if t.shuffle if shuffle is None else shuffle:
        rng = np.random.default_rng(t.seed)
        out = {k: tb if (k == "train" and meta.get("mixture")) else tb.take(rng.permutation(tb.num_rows))
               for k, tb in out.items()}
    return {k: tb.combine_chunks() for k, tb in out.items()}


def rank_shards(tables: dict[str, Any], world: int) -> dict[str, list]:
    """Each split cut into `world` equal contiguous slices (the remainder left out, as Ray
    Data's equal split does), each put in the object store: rank i fetches only its own."""
    import ray

    out = {}
    for name, tb in tables.items():
        per = tb.num_rows // world
        if per:
            out[name] = [ray.put(tb.slice(r * per, per).combine_chunks()) for r in range(world)]
    return out


def _trainer_class(torch_trainer: type) -> type:
    """TorchTrainer, less Ray Data's dataset manager when the run is given no Ray Dataset (the
    small-set path: each rank gets its object-store slice). Ray Train starts that actor for every
    run, datasets or not: one more process per run (~2 CPU-s to start, 14 of them in a test
    session) that nothing asks for a shard."""

    class Trainer(torch_trainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "DatasetsCallback"]

    Trainer.__name__ = Trainer.__qualname__ = torch_trainer.__name__
    return Trainer


def build_trainer(cfg: TrainConfig, meta: dict[str, Any], tables: Optional[dict[str, Any]] = None,
                  callbacks: Optional[list] = None, log_label: Optional[str] = None):
    """The TorchTrainer of a run: the dataset version's splits (or `tables`, pyarrow tables
    already prepared: a Tune trial's fold or sample), checkpoints under `output.storage`.
    `log_label` goes on the loop's lines ("[train] trial 1a2b_00003: step ...")."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylm.train.loop import train_loop
    from raylm.train.reference import reference_mode, with_reference_logps
    from raylm.train.session import set_ray_train_env

    set_ray_train_env()
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same data order every run
    t = cfg.train
    precompute = cfg.preference is not None and reference_mode(cfg) == "precomputed"  # (DPO's reference)
    # Small datasets are read here with pyarrow and handed to the workers as one object-store
    # slice per rank: no Ray Data execution, dataset manager or split coordinator to start (three
    # processes, ~8 s of a short run on a laptop), and ingest never waits for a CPU that
    # training holds (2 workers on a 2-CPU laptop). Larger ones stream through Ray Data
    # (`get_dataset_shard`), which needs a CPU left over.
    packed_bytes = 4 * meta["seq_len"] * (meta["train_blocks"] + meta.get("validation_blocks", 0))
    small = packed_bytes <= MATERIALIZE_BYTES
    materialize = tables is None and (t.ingest == "memory" or (t.ingest == "auto" and small))
    datasets = None
    if tables is None and not materialize:
        spare = ray.cluster_resources().get("CPU", 0) - t.num_workers * t.cpus_per_worker
        if spare < 1:
            raise config.ConfigError(
                f"the training workers take every CPU ({t.num_workers} x {t.cpus_per_worker}) and leave none to "
                "stream the dataset: lower train.cpus_per_worker or train.num_workers")
        # The loop's progress line says how far training is: the stream's own progress (drawn as
        # terminal bars that Ray's tqdm sends from the split coordinator to the job's log, ~15
        # lines a second) is off for these datasets (the context is copied into each of them)
        ctx = ray.data.DataContext.get_current()
        bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
        try:
            datasets = _datasets(cfg, meta)
        finally:
            ctx.enable_progress_bars = bars
        if precompute:  # (before the shuffle)
            _, datasets = with_reference_logps(cfg, meta, None, datasets)
        if t.shuffle:  # seeded; validation too, so `eval_batches` is a fair sample
            datasets = {k: ds if (k == "train" and meta.get("mixture")) else ds.random_shuffle(seed=t.seed)
                        for k, ds in datasets.items()}  # (a mixture is shuffled when it is put together)
    elif materialize:  # read here, shuffled (seeded: the same order every run)
        tables = read_tables(cfg, meta)
    if tables is not None and precompute:
        tables, _ = with_reference_logps(cfg, meta, tables, None)
    loop_config: dict[str, Any] = {"train_config": cfg.model_dump(mode="json"), "dataset": meta,
                                   **({"log_label": log_label} if log_label else {})}
    if tables is not None:
        loop_config["shards"] = rank_shards(tables, t.num_workers)
    runs_uri = run_storage(cfg)
    loop_config["run_uri"] = storage.join(runs_uri, cfg.name)
    runs_fs, runs_path = storage.arrow_fs(runs_uri)
    resources = t.worker_resource_request()
    return _trainer_class(TorchTrainer)(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=runs_path, storage_filesystem=runs_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": dict(t.worker_env)},
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(enable_shard_locality=False),
    )


def check_base_model(cfg: TrainConfig, meta: dict[str, Any]) -> None:
    """A causal LM loaded from `model.path` must read the dataset's tokens as it was trained to:
    its vocabulary holds every id of the dataset's tokenizer, and the tokenizer it was saved with
    (if any) is the dataset's. Fine-tuning a registered model on a new dataset (conversations, say)
    means building that dataset with the model's tokenizer (`tokenizer.kind: pretrained`,
    `tokenizer.path`: the model's directory)."""
    if cfg.model.task != "causal_lm" or not cfg.model.path:
        return
    path = cfg.model.local_path()
    fix = f"build the dataset with tokenizer.kind: pretrained and tokenizer.path: {path}"
    try:
        conf = json.loads(storage.read_text(storage.join(path, "config.json")))
    except (FileNotFoundError, OSError, ValueError):
        raise config.ConfigError(f"model.path: no readable config.json in {path}") from None
    if int(conf.get("vocab_size") or 0) < meta["vocab_size"]:
        raise config.ConfigError(f"model.path: {path} has a vocabulary of {conf.get('vocab_size')}, the dataset's "
                                 f"tokenizer {meta['vocab_size']} tokens; {fix}")
    if storage.exists(storage.join(path, "tokenizer.json")):
        dataset_tok = meta["tokenizer_uri"]
        if tokenizer_digest(path) != tokenizer_digest(dataset_tok):
            raise config.ConfigError(f"model.path: {path} was trained with another tokenizer than the dataset's "
                                     f"({dataset_tok}): its token ids mean other words; {fix}")


def check_teacher(cfg: TrainConfig, meta: dict[str, Any]) -> None:
    """A distillation teacher that cannot work with this student fails here, before any worker
    starts: it must exist, do the same task, and share the vocabulary or the labels."""
    import json as _json

    from raylm import registry

    if cfg.distill is None:
        return
    try:
        card = registry.resolve(cfg.distill.teacher, cfg.distill.registry or cfg.output.registry)
    except FileNotFoundError as e:
        raise config.ConfigError(f"distill.teacher: {e}") from None
    if card.get("task", "causal_lm") != cfg.model.task:
        raise config.ConfigError(f"distill.teacher: {card['id']} is a {card.get('task')} model; the student is "
                                 f"{cfg.model.task}")
    conf = _json.loads(storage.read_text(storage.join(card["uri"], "config.json")))
    if cfg.model.task == "causal_lm" and conf.get("vocab_size") != meta["vocab_size"]:
        raise config.ConfigError(f"distill.teacher: {card['id']} has a vocabulary of {conf.get('vocab_size')}, the "
                                 f"dataset's tokenizer {meta['vocab_size']}: distillation needs the same tokenizer")
    if cfg.model.task == "classification":
        theirs = [conf.get("id2label", {}).get(str(i)) for i in range(len(conf.get("id2label", {})))]
        if theirs != meta["labels"]:
            raise config.ConfigError(f"distill.teacher: {card['id']} predicts {theirs}, the dataset has "
                                     f"{meta['labels']}")


def run(cfg: TrainConfig, meta: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Train the run `cfg.name` (resume it, start it over or refuse, `resume.start_or_resume`), one job at
    a time: a second job on the same run stops before it looks at the run's checkpoints."""
    with reruns.exclusive("train", cfg.name, storage.join(run_storage(cfg), cfg.name)):
        return _run(cfg, meta)


def _run(cfg: TrainConfig, meta: Optional[dict[str, Any]]) -> dict[str, Any]:
    meta = meta or dataset_meta(cfg)
    check_base_model(cfg, meta)
    check_teacher(cfg, meta)
    restarted = start_or_resume(cfg, meta)
    # one MLflow run per run name: a resumed run continues it
    tracker = tracking.Tracker.start(cfg.tracking, "train", cfg.name, cfg.model_dump(mode="json", exclude={"tracking"}),
                                     tags={"raylm.dataset": meta["dataset_id"]}, resume=not restarted)
    done = None if restarted else finished(cfg)
    if done is not None:  # no Ray Train run (~20 s of a controller and workers on 2 cores) to hand it back
        tracker.finish()
        return {**done, "tracking": tracker.run_id}
    trainer = build_trainer(cfg, meta, callbacks=[tracking.train_callback(tracker, cfg.output.registry)] if tracker.active else None)
    what = (f"{cfg.model.path} classifier ({len(meta['labels'])} labels: {', '.join(meta['labels'])})"
            if cfg.model.task == "classification" else cfg.model.path or f"{cfg.model.arch}-{cfg.model.preset}")
    for split, n in (meta.get("unlabeled") or {}).items():
        if n:
            print(f"[train] {split}: {n} document(s) without a label the model knows are left out", flush=True)
    print(f"[train] {cfg.name}: {what}{' + LoRA' if cfg.model.lora else ''} on {meta['dataset_id']}, strategy "
          f"{cfg.train.strategy}, {cfg.train.num_workers} worker(s), {cfg.train.max_steps} steps", flush=True)
    if meta.get("rated"):
        print(f"[train] {cfg.name}: {kto_balance(cfg, meta['rated'])}", flush=True)
    try:
        result = trainer.fit()
    except BaseException:
        tracker.finish(ok=False)
        raise
    tracker.finish()
    metrics = dict(result.metrics or {})
    return {"run": cfg.name, "model": metrics.get("model") or None, "metrics": metrics,
            "checkpoint": result.checkpoint.path if result.checkpoint else None, "tracking": tracker.run_id}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = config.job_argparser("Train a model on a dataset version (raylm train job).").parse_args(argv)
    cfg = config.load(TrainConfig, args.config, args.overrides)
    meta = dataset_meta(cfg)  # a missing dataset or an unfit teacher fails here, before Ray starts
    check_base_model(cfg, meta)
    check_teacher(cfg, meta)
    from raylm.runtime import init_ray

    init_ray(config=cfg)  # on several nodes: every local path it names must be shared
    out = run(cfg, meta)
    m = out["metrics"]
    print(f"run {out['run']}: step {m.get('step')}, loss {m.get('loss', float('nan')):.4f}"
          + (f", val_loss {m['val_loss']:.4f}" if "val_loss" in m else "")
          + (f" (ppl {m['val_ppl']:.1f})" if "val_ppl" in m else "")
          + (f", val_accuracy {m['val_accuracy']:.3f}, val_macro_f1 {m['val_macro_f1']:.3f}"
             if "val_accuracy" in m else ""), flush=True)
    if out["model"]:
        print(f"registered model: {out['model']}", flush=True)
    print("RAYLM_RESULT " + json.dumps({"run": out["run"], "model": out["model"],
                                        "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))}}),
          flush=True)
    return 0
