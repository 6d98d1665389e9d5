"""`jobs/ensemble.py`: build an ensemble of classifiers and register it as one model.

    raylm submit ensemble --config jobs/configs/ensemble_authors.yaml

Members are trained here as Ray Tune trials (tune/trial.py: the data read once, each member its
rows: a seed, a bootstrap sample, a fold, a boosting round) or taken from a finished search or
the registry. The combiner is fitted on held-out predictions (the validation split, or the
out-of-fold predictions of k-fold members), every member and the ensemble are scored on the
validation and test splits, and the ensemble is registered: `ensemble.json` + `members/<i>/`
(a soup: one averaged model). Evaluation and serving load it like any classifier.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from raylm import config, registry, reruns, storage, tracking
from raylm.train.config import TrainConfig
from raylm.tune import ensemble as ens
from raylm.tune import trial as trial_mod
from raylm.tune.config import EnsembleConfig, TuneConfig
from raylm.tune.job import base_train_dict, default_storage, load_tables, paths_of


def _predict(model_dir: str, table, rows: Optional[list[int]] = None, batch_size: int = 32) -> np.ndarray:
    """Class probabilities of a registry model on tokenized rows (the same tokens it trained on),
    or, for a model that reads long texts in windows (`model.long_texts`), on the rows' texts
    as evaluation and serving read them."""
    import torch

    from raylm.serve.engine import ClassifierEngine, trained_model_config
    from raylm.train.export import load_exported

    if rows is not None:
        table = table.take(rows)
    if trained_model_config(model_dir).get("long_texts") == "windows":
        if "text" not in table.column_names:
            raise ValueError(f"{model_dir} reads long texts in windows: it is scored on texts, and these rows "
                             "have none (encode_texts(keep_text=True))")
        engine, texts = ClassifierEngine(model_dir, dtype="float32"), table.column("text").to_pylist()
        probs = [engine.probabilities([t or "" for t in texts[i:i + batch_size]]).numpy()
                 for i in range(0, len(texts), batch_size)]
        return np.concatenate(probs) if probs else np.zeros((0, len(engine.labels)))
    card = json.loads((Path(model_dir) / registry.CARD).read_text())
    model = load_exported(model_dir, "classification", card.get("format", "full"))
    out = []
    with torch.inference_mode():
        for start in range(0, table.num_rows, batch_size):
            part = table.slice(start, batch_size)
            ids = torch.tensor(part.column("input_ids").to_pylist())
            mask = torch.tensor(part.column("attention_mask").to_pylist())
            out.append(torch.softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.num_labels))


LOCAL_SCORING_ROWS = 20_000  # rows x members up to which the driver scores itself


def score(member_uris: list[str], table, rows: Optional[list[Optional[list[int]]]] = None) -> list[np.ndarray]:
    """Each member's class probabilities on `table` (a pyarrow table or its object ref), or on
    its `rows[i]` for member i. Small jobs run here, one member after another (no task
    processes to start and no model to load in them: ~8 s on a laptop); larger ones as one Ray
    task per member, in parallel across the cluster."""
    import ray

    rows = rows or [None] * len(member_uris)
    tb = ray.get(table) if isinstance(table, ray.ObjectRef) else table
    if sum(tb.num_rows if r is None else len(r) for r in rows) <= LOCAL_SCORING_ROWS:
        return [_predict(str(registry.local_path(registry.resolve(u))), tb, r) for u, r in zip(member_uris, rows)]
    task = ray.remote(num_cpus=1)(lambda uri, t, r=None: _predict(str(registry.local_path(registry.resolve(uri))),
                                                                t, r))
    ref = table if isinstance(table, ray.ObjectRef) else ray.put(tb)
    return ray.get([task.remote(u, ref, r) for u, r in zip(member_uris, rows)])


def _labels_of(table) -> np.ndarray:
    return np.asarray(table.column("labels").to_pylist(), dtype=np.int64)


def classification_scores(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss

    pred = probs.argmax(-1)
    labels = list(range(probs.shape[1]))
    return {"accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro", labels=sorted(set(y)))),
            "log_loss": float(log_loss(y, np.clip(probs, 1e-9, 1), labels=labels))}


def train_members(cfg: EnsembleConfig, base: dict[str, Any], train_cfg: TrainConfig, meta: dict[str, Any],
                  tables: dict[str, Any], specs: list[dict[str, Any]], root: str, tag: str) -> list[str]:
    """Train one member per spec as Tune trials; returns their model URIs in spec order."""
    import ray.tune as tune

    fs, path = storage.arrow_fs(root)
    trainable = tune.with_resources(
        tune.with_parameters(trial_mod.run_trial, base=base, meta=meta, tables=tables, name=cfg.name,
                             registry=storage.join(root, "models"), runs=storage.join(root, "runs")),
        trial_mod.resources(train_cfg))
    tuner = tune.Tuner(trainable, param_space={"member": tune.grid_search(specs)},
                       tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent),
                       run_config=tune.RunConfig(name=tag, storage_path=path, storage_filesystem=fs, verbose=0,
                                                 callbacks=[trial_mod.trial_log(
                                                     "ensemble", "val_loss", "min", train_cfg.train.max_steps,
                                                     best=False)]))
    grid = trial_mod.fit(tuner, "ensemble", storage.join(root, tag))
    found: dict[str, str] = {}
    for r in grid:
        if r.error or not (r.metrics or {}).get("model"):
            raise RuntimeError(f"ensemble member {r.config['member']} failed: {r.error}")
        found[json.dumps(r.config["member"], sort_keys=True)] = r.metrics["model"]
    models_root = storage.join(root, "models")
    return [registry.resolve(found[json.dumps(s, sort_keys=True)], models_root)["uri"] for s in specs]


def _fold_rows(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """The rows each fold member validated on (trial.select_rows's assignment)."""
    return [np.sort(p) for p in np.array_split(np.random.default_rng(seed).permutation(n), folds)]


def _test_table(m: dict[str, Any], meta: dict[str, Any]):
    from raylm.data.versions import read_split
    from raylm.train.job import encode_texts

    if not m["splits"]["test"]["documents"]:
        return None
    table = read_split(m, "docs", "test", ["text", "label"])
    out = encode_texts(table, meta["tokenizer_path"], meta["seq_len"], meta["labels"],
                       keep_text=meta.get("long_texts") == "windows")
    return out if out.num_rows else None


def run(cfg: EnsembleConfig, config_path: Optional[str] = None) -> dict[str, Any]:
    """Build the ensemble `cfg.name`, one job at a time (its members' trials share one directory)."""
    with reruns.exclusive("ensemble", cfg.name,
                          storage.join(cfg.output.storage or default_storage(), "ensembles", cfg.name)):
        return _run(cfg, config_path)


def _run(cfg: EnsembleConfig, config_path: Optional[str]) -> dict[str, Any]:
    import ray

    from raylm.data import versions
    from raylm.train.job import dataset_meta

    t0 = time.time()
    root = storage.join(cfg.output.storage or default_storage(), "ensembles", cfg.name)
    src = cfg.members
    member_uris: list[str] = []
    alphas: list[float] = []
    if src.source in ("search", "models"):
        if src.source == "search":
            search_root = storage.join(src.search_storage or default_storage(), src.search)
            if not storage.exists(storage.join(search_root, "summary.json")):
                raise config.ConfigError(f"members.search: no finished search {src.search!r} at {search_root}")
            summary = storage.read_json(storage.join(search_root, "summary.json"))
            import pandas as pd

            fs_, p_ = storage.fsspec_fs(storage.join(search_root, "results.parquet"))
            with fs_.open(p_, "rb") as f:
                df = pd.read_parquet(f)
            df = df[df["model"].notna() & df[summary["metric"]].notna()]
            df = df.sort_values(summary["metric"], ascending=summary["mode"] == "min").head(src.n)
            if len(df) < 2:
                raise config.ConfigError(f"members.search: {src.search} has {len(df)} trial(s) with a model; an "
                                         "ensemble needs at least 2")
            member_uris = [registry.resolve(x, storage.join(search_root, "models"))["uri"] for x in df["model"]]
        else:
            try:
                member_uris = [registry.resolve(x, cfg.registry or cfg.output.registry)["uri"] for x in src.models]
            except FileNotFoundError as e:
                raise config.ConfigError(f"members.models: {e}") from None
        first = registry.resolve(member_uris[0])
        base = dict(first.get("config") or {})
        if not base:
            raise config.ConfigError(f"{first['id']} has no training config in its card")
    else:
        base = base_train_dict(TuneConfig.model_construct(train=cfg.train, set=cfg.set, name=cfg.name), config_path)
    train_cfg = config.build(TrainConfig, base, "ensemble: train")
    if train_cfg.model.task != "classification":
        raise config.ConfigError("ensembles combine classifiers: the members' model.task must be classification")
    meta = dataset_meta(train_cfg)
    # how the ensemble reads long texts (its card; a soup reads them so); the rows keep their texts
    # when any member reads them in windows, to score it as evaluation and serving will
    windows = {"long_texts": train_cfg.model.long_texts, "max_windows": train_cfg.model.max_windows}
    if train_cfg.model.long_texts == "windows" or any(
            (registry.resolve(u).get("config") or {}).get("model", {}).get("long_texts") == "windows"
            for u in member_uris):
        meta["long_texts"] = "windows"
    m = versions.resolve(train_cfg.data.dataset, train_cfg.data.root)
    tables = load_tables(train_cfg, meta)
    n_train = ray.get(tables["train"]).num_rows
    print(f"[ensemble] {cfg.name}: {src.n if src.source not in ('models',) else len(member_uris)} members from "
          f"{src.source}, combiner {cfg.combiner}, on {meta['dataset_id']} ({n_train} train rows)", flush=True)

    if src.source == "boosting":
        y_train = _labels_of(ray.get(tables["train"]))
        w = np.full(n_train, 1.0 / n_train)
        for r in range(src.n):
            seed = train_cfg.train.seed + r
            uri = train_members(cfg, base, train_cfg, meta, tables,
                                [{"rows": {"weights": w.tolist(), "seed": seed}}], root, f"round-{r}")[0]
            pred = score([uri], tables["train"])[0].argmax(-1)
            err = float(((pred != y_train) * w).sum() / w.sum())  # under this round's weights
            alpha, w = ens.samme_round(pred, y_train, w, len(meta["labels"]))
            print(f"[ensemble] boosting round {r + 1}/{src.n}: weighted train error {err:.3f}, vote weight "
                  f"{alpha:.3f}", flush=True)
            member_uris.append(uri)
            alphas.append(alpha)
    elif src.source in ("seeds", "bagging", "folds"):
        specs = {"seeds": lambda i: {"params": {"train.seed": train_cfg.train.seed + i}},
                 "bagging": lambda i: {"rows": {"bootstrap": i}},
                 "folds": lambda i: {"rows": {"fold": i, "folds": src.n, "seed": 0}}}[src.source]
        member_uris = train_members(cfg, base, train_cfg, meta, tables, [specs(i) for i in range(src.n)], root,
                                    "members")

    evals: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # split -> (member probabilities, labels)
    for split in ("validation", "test"):
        table = ray.get(tables["validation"]) if split == "validation" and "validation" in tables else (
            _test_table(m, meta) if split == "test" else None)
        if table is None:
            continue
        t_split = time.time()
        evals[split] = (np.stack(score(member_uris, table)), _labels_of(table))
        print(f"[ensemble] {len(member_uris)} members scored on {split} ({table.num_rows} rows) in "
              f"{time.time() - t_split:.1f} s", flush=True)
    spec: dict[str, Any] = {"combiner": cfg.combiner, "labels": meta["labels"], "source": src.source,
                            "members": [registry.resolve(u)["id"] for u in member_uris]}
    if cfg.combiner == "stacking" and src.source == "folds":
        # k-fold stacking: each train row's prediction by the member that did not train on it
        # (out-of-fold); at inference the meta-model reads the mean of the fold members
        parts = _fold_rows(n_train, src.n, 0)
        oof = np.concatenate(score(member_uris, tables["train"], [p.tolist() for p in parts]))
        y_oof = _labels_of(ray.get(tables["train"]).take(np.concatenate(parts)))
        spec.update(ens.fit_stacking(oof[None], y_oof, len(meta["labels"])), stack_features="member_mean")
        print(f"[ensemble] stacking meta-model fitted on {len(y_oof)} out-of-fold predictions", flush=True)
    elif cfg.combiner in ("weighted", "stacking"):
        if "validation" not in evals:
            raise config.ConfigError(f"combiner {cfg.combiner} is fitted on rows no member trained on: the dataset "
                                     "has no validation split (use members.source folds for stacking, or combiner "
                                     "mean)")
        probs, y = evals["validation"]
        if cfg.combiner == "weighted":
            spec["weights"] = ens.fit_weights(probs, y)
        else:
            spec.update(ens.fit_stacking(probs, y, len(meta["labels"])))
        print(f"[ensemble] {cfg.combiner} combiner fitted on {len(y)} validation rows", flush=True)
    elif cfg.combiner == "boosting":
        spec["alphas"] = alphas
    scores: dict[str, dict[str, Any]] = {}
    for split, (probs, y) in evals.items():
        members = [classification_scores(p, y) for p in probs]
        if cfg.combiner == "soup":
            combined = None  # scored after the soup is built
        else:
            combined = classification_scores(ens.combine(probs, spec), y)
        scores[split] = {"members": members, "ensemble": combined, "n": int(len(y)),
                         "member_mean": {k: float(np.mean([s[k] for s in members])) for k in members[0]}}

    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        if cfg.combiner == "soup":
            t_soup = time.time()
            _build_soup(member_uris, out)
            fmt = "full"
            for split, (probs, y) in evals.items():
                table = ray.get(tables["validation"]) if split == "validation" else _test_table(m, meta)
                (out / registry.CARD).write_text(json.dumps({"format": "full", "config": {"model": {
                    "max_length": train_cfg.model.max_length, **windows}}}))
                soup_probs = _predict(str(out), table)
                scores[split]["ensemble"] = classification_scores(soup_probs, y)
            (out / registry.CARD).unlink()
        else:
            fmt = "ensemble"
            for i, u in enumerate(member_uris):
                storage.download_dir(u, out / "members" / str(i))
            (out / "ensemble.json").write_text(json.dumps(spec, indent=2))
        head = "test" if "test" in scores else "validation"
        card = {
            "task": "classification", "format": fmt, "labels": meta["labels"], "dataset": meta["dataset_id"],
            "base": train_cfg.model.path, "run": cfg.name,
            "ensemble": {k: v for k, v in spec.items() if k not in ("labels",)},
            "strategy": f"ensemble-{cfg.combiner}",
            "metrics": {f"{'val' if split == 'validation' else split}_{k}": v for split, s in scores.items()
                        if s["ensemble"] for k, v in s["ensemble"].items()},
            "ensemble_scores": scores,
            "config": {"model": {"max_length": train_cfg.model.max_length, "path": train_cfg.model.path, **windows},
                       "data": train_cfg.data.model_dump(mode="json")},
        }
        if cfg.combiner == "soup":
            print(f"[ensemble] soup built and scored in {time.time() - t_soup:.1f} s", flush=True)
        entry = registry.register(out, cfg.name, card, root=cfg.output.registry)
    summary = {"name": cfg.name, "model": entry["id"], "uri": entry["uri"], "combiner": cfg.combiner,
               "source": src.source, "members": spec["members"], "scores": scores, "headline_split": head,
               **{k: spec[k] for k in ("weights", "alphas") if k in spec},
               "seconds": round(time.time() - t0, 1)}
    storage.write_text(storage.join(root, "summary.json"), json.dumps(summary, indent=2))
    tracker = tracking.Tracker.start(cfg.tracking, "ensemble", cfg.name, cfg.model_dump(mode="json", exclude={"tracking"}),
                                     tags={"raylm.dataset": meta["dataset_id"]})
    tracker.log_metrics(scores)  # <split>.ensemble.<metric>, <split>.member_mean.<metric>, ...
    tracker.log_metrics({f"{split}.member_{i}.{k}": v for split, sc in scores.items()
                         for i, m in enumerate(sc["members"]) for k, v in m.items()})
    tracker.log_artifacts([storage.join(root, "summary.json")], "ensemble")
    tracking.card_artifacts(tracker, entry["id"], cfg.output.registry)
    tracker.finish()
    summary["tracking"] = tracker.run_id
    return summary


def _build_soup(member_uris: list[str], out: Path) -> None:
    import torch  # noqa: F401

    from safetensors.torch import load_file, save_file

    dirs = [registry.local_path(registry.resolve(u)) for u in member_uris]
    confs = [json.loads((d / "config.json").read_text()) for d in dirs]
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_labels", "vocab_size")
    if any(tuple(c.get(k) for k in keys) != tuple(confs[0].get(k) for k in keys) for c in confs[1:]):
        raise config.ConfigError("combiner soup: the members differ in architecture")
    for f in dirs[0].iterdir():
        if f.name not in (registry.CARD, "model.safetensors") and f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    averaged = ens.soup([load_file(str(d / "model.safetensors")) for d in dirs])
    save_file({k: v.contiguous() for k, v in averaged.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = config.job_argparser("Build an ensemble of classifiers and register it (raylm ensemble job).") \
        .parse_args(argv)
    cfg = config.load(EnsembleConfig, args.config, args.overrides)
    from raylm.runtime import init_ray

    init_ray(config=paths_of(cfg, args.config))  # on several nodes: every local path it uses must be shared
    s = run(cfg, args.config)
    for split, sc in s["scores"].items():
        e, mm = sc["ensemble"], sc["member_mean"]
        best = max(sc["members"], key=lambda x: x["macro_f1"])
        print(f"[ensemble] {split} ({sc['n']} rows): ensemble accuracy {e['accuracy']:.3f} macro_f1 "
              f"{e['macro_f1']:.3f} log_loss {e['log_loss']:.3f} | members mean accuracy {mm['accuracy']:.3f} "
              f"macro_f1 {mm['macro_f1']:.3f} | best member macro_f1 {best['macro_f1']:.3f}", flush=True)
    print(f"registered model: {s['model']}", flush=True)
    print("RAYLM_RESULT " + json.dumps({k: s[k] for k in ("name", "model", "combiner", "source", "members",
                                                          "seconds")}), flush=True)
    return 0
