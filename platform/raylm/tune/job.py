"""`jobs/tune.py`: search a train config's hyperparameters with Ray Tune.

    raylm submit tune --config jobs/configs/tune_tiny.yaml

Every trial is a training run (train/loop.py) on rows of one dataset version, read once by the
driver (tune/trial.py). Searchers come from Optuna through Ray Tune; schedulers are Ray Tune's.
Output under `<output.storage>/<name>/`: `results.parquet` / `results.csv` (a row per trial),
`best_train_config.yaml` (a ready train config), `report.html` with plots, `summary.json`;
the best trial's model is registered as `<name>`. Submitting the same name again resumes an
interrupted search (`Tuner.restore`): finished trials are not run again.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from raylm import config, registry, reruns, storage, tracking
from raylm.cluster import home
from raylm.train.config import TrainConfig
from raylm.tune.config import Param, TuneConfig
from raylm.tune import trial as trial_mod

TASK_METRICS = {"causal_lm": ("val_loss", "val_ppl", "loss"),
                "classification": ("val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "loss"),
                "preference": ("val_loss", "val_reward_accuracy", "val_reward_margin", "loss")}  # (DPO, IPO, ORPO, SimPO)
ALL_METRICS = tuple(dict.fromkeys(k for names in TASK_METRICS.values() for k in names))  # (each once)


def default_storage() -> str:
    return str(home() / "tune")


def base_train_dict(cfg: TuneConfig, config_path: Optional[str]) -> dict[str, Any]:
    """The base train config as a dict: from a YAML path (relative to the tune config's folder,
    else to the working directory) or inline; `set` overrides applied."""
    if isinstance(cfg.train, dict):
        data = dict(cfg.train)
    else:
        candidates = [Path(cfg.train)]
        if config_path and not Path(cfg.train).is_absolute():
            candidates.insert(0, Path(config_path).parent / cfg.train)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise config.ConfigError(f"train: no train config at {cfg.train} (looked in "
                                     f"{', '.join(str(p) for p in candidates)})")
        data = config.read_yaml(found)
    data = config.apply_overrides(data, cfg.set)
    data.setdefault("name", cfg.name)
    return data


def paths_of(cfg: Any, config_path: Optional[str]) -> dict[str, Any]:
    """What a search or an ensemble (`cfg`: its config) reads and writes, for the shared-path
    check (`runtime.check_paths_shared`): its own paths, and the dataset its trials read (the train
    config's `data`, with `set` applied). A train config that cannot be read adds nothing here: the
    job says what is wrong with it."""
    own = cfg.model_dump(mode="json")
    if getattr(cfg, "train", None) is None:  # an ensemble of registry models: no train config
        return own
    try:
        base = base_train_dict(TuneConfig.model_construct(train=cfg.train, set=cfg.set, name=cfg.name), config_path)
        data = config.build(TrainConfig, base, "train").data.model_dump(mode="json")
    except config.ConfigError:
        return own
    return {"search": own, "trials": {"data": data}}


# Fields that never change a search's results (the resolved train config stands for `train`
# and `set`); anything else changed makes another search.
OPERATIONAL = ("output.", "tracking.", "resume", "search.max_concurrent", "search.state_save_s", "train", "train.",
               "set")


def _start_or_resume(cfg: TuneConfig, train_cfg: TrainConfig, meta: dict[str, Any], exp_root: str) -> bool:
    """Before anything starts: whether a search with saved trials resumes (`resume`,
    `reruns.decide`); a restart removes its trials and runs. Returns whether it starts over."""
    from ray import tune

    from raylm.train.resume import run_identity

    now = {**reruns.identity(cfg.model_dump(mode="json"), OPERATIONAL),
           **{f"train_config.{k}": v for k, v in run_identity(train_cfg, meta).items()}}
    has_trials = tune.Tuner.can_restore(storage.join(exp_root, "trials"))
    restart = reruns.decide("tune", cfg.name, exp_root, now, cfg.resume, has_trials)
    if restart:
        for part in ("trials", "runs"):
            storage.remove(storage.join(exp_root, part))
    reruns.record(exp_root, now)
    return restart


def check(cfg: TuneConfig, base: dict[str, Any]) -> TrainConfig:
    """The base config and every dimension of the space are valid train configs (one clear error
    naming the field otherwise), and the metric is one this task reports."""
    train_cfg = config.build(TrainConfig, base, "tune: train")
    for key, p in cfg.space.items():
        for value in p.values():  # every choice, or both ends of a range
            config.build(TrainConfig, trial_mod.train_dict(base, {key: value}), f"space: {key}={value!r}")
    task = "preference" if train_cfg.preference is not None else train_cfg.model.task
    allowed = TASK_METRICS[task]
    if cfg.metric not in allowed:
        raise config.ConfigError(f"metric: {cfg.metric!r} is not reported by {task} training; "
                                 f"one of {', '.join(allowed)}")
    if cfg.search.scheduler == "pbt" and not trial_mod.runs_in_process(train_cfg):
        raise config.ConfigError("search.scheduler pbt clones trials from each other's checkpoints: it needs "
                                 "one-worker ddp trials (train.num_workers: 1)")
    return train_cfg


def schedule_fields(cfg: TuneConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    """Train fields every trial gets so the scheduler sees the metric in every report and can
    pause / clone trials: trials report at each evaluation, and checkpoint where needed."""
    t = train_cfg.train
    every = t.eval_every
    if cfg.search.scheduler == "pbt":
        every = cfg.search.perturbation_interval
    elif cfg.search.scheduler in ("asha", "hyperband"):
        every = min(t.eval_every, cfg.search.grace_period)
    fixed = {"train.eval_every": every, "train.log_every": every}
    if cfg.search.scheduler == "pbt":
        fixed["train.checkpoint_every"] = every
    else:  # a multiple of the report interval, at most the run's length
        fixed["train.checkpoint_every"] = min(t.max_steps, max(every, t.checkpoint_every // every * every))
    return fixed


def _domain(p: Param, grid_ok: bool):
    from ray import tune

    v = p.values()
    if p.kind == "grid" or (p.kind == "choice" and grid_ok):
        return tune.grid_search(list(v))
    if p.kind == "choice":
        return tune.choice(list(v))
    if p.kind == "uniform":
        return tune.uniform(*v)
    if p.kind == "loguniform":
        return tune.loguniform(*v)
    return tune.randint(v[0], v[1] + 1)  # high included


def default_point(cfg: TuneConfig, train_cfg: TrainConfig) -> Optional[dict[str, Any]]:
    """The base config's own values of the searched fields, when they lie inside the space (the
    search then evaluates the default first, so its report says how much it improved on it)."""
    data = train_cfg.model_dump(mode="json")
    point = {}
    for key, p in cfg.space.items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        v = p.values()
        inside = (node in v) if p.kind in ("choice", "grid") else (
            isinstance(node, (int, float)) and v[0] <= node <= v[1])
        if node is None or not inside:
            return None
        point[key] = node
    return point


def hyperband_brackets(grace: int, reduction_factor: float, max_steps: int, most: int = 3) -> int:
    """How many of HyperBand's brackets (bracket b's first rung: grace * reduction_factor**b) can
    stop a trial before its last step: at most `most`, at least 1. A bracket whose first rung is
    at or past max_steps stops nothing; the trials Tune put there would all run in full."""
    return max(1, sum(1 for b in range(most) if grace * reduction_factor ** b < max_steps))


def build_tuner(cfg: TuneConfig, base: dict[str, Any], train_cfg: TrainConfig, meta: dict[str, Any],
                tables: dict[str, Any], exp_root: str, callbacks: Optional[list] = None):
    import ray.tune as tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s, mode = cfg.search, cfg.resolved_mode
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = str(s.state_save_s)  # read by the Tuner built below
    fixed = schedule_fields(cfg, train_cfg)
    base = trial_mod.train_dict(base, {}, **fixed)
    grid_ok = s.algorithm == "grid"
    params = {k: _domain(p, grid_ok) for k, p in cfg.space.items()}
    space: dict[str, Any] = {"params": params}
    if cfg.cv:
        space["rows"] = {"fold": tune.grid_search(list(range(cfg.cv.folds))), "folds": cfg.cv.folds,
                         "seed": cfg.cv.seed}
    default = default_point(cfg, train_cfg)
    points = [{"params": default}] if default and s.algorithm != "grid" and not cfg.cv else None
    search_alg = None
    if s.algorithm in ("tpe", "gp", "cmaes"):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=min(4, s.num_samples)),
                   "gp": lambda: optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=min(4, s.num_samples)),
                   "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=s.seed, n_startup_trials=min(2, s.num_samples),
                                                                 warn_independent_sampling=False)}[s.algorithm]()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        flat = [{f"params/{k}": v for k, v in default.items()}] if points else None  # Optuna's names
        search_alg = OptunaSearch(sampler=sampler, seed=s.seed, points_to_evaluate=flat)
    elif s.scheduler != "pbt":
        # (Tune applies max_concurrent_trials only to a generator it builds itself: say it here)
        search_alg = BasicVariantGenerator(random_state=s.seed, points_to_evaluate=points,
                                           max_concurrent=s.max_concurrent)
    max_t = train_cfg.train.max_steps + 1  # a trial's last report (with its model) must not be cut at max_t
    if s.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=min(s.grace_period, max_t - 1),
                                  reduction_factor=s.reduction_factor)
    elif s.scheduler == "hyperband":  # asynchronous HyperBand: ASHA brackets with different grace periods
        grace = min(s.grace_period, max_t - 1)
        brackets = hyperband_brackets(grace, s.reduction_factor, train_cfg.train.max_steps)
        print(f"[tune] hyperband: {brackets} bracket(s), first rungs at step "
              f"{', '.join(str(int(grace * s.reduction_factor ** b)) for b in range(brackets))}")
        scheduler = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=grace,
                                  reduction_factor=s.reduction_factor, brackets=brackets)
    elif s.scheduler == "pbt":
        scheduler = PopulationBasedTraining(
            time_attr="step", perturbation_interval=s.perturbation_interval,
            hyperparam_mutations={"params": {k: _domain(p, False) for k, p in cfg.space.items()}})
    else:
        scheduler = FIFOScheduler()
    fs, path = storage.arrow_fs(exp_root)
    trainable = tune.with_resources(
        tune.with_parameters(trial_mod.run_trial, base=base, meta=meta, tables=tables, name=cfg.name,
                             registry=storage.join(exp_root, "models"), runs=storage.join(exp_root, "runs")),
        trial_mod.resources(train_cfg))
    if tune.Tuner.can_restore(storage.join(exp_root, "trials")):
        print(f"[tune] resuming the search {cfg.name} from {storage.join(exp_root, 'trials')}: finished trials "
              "are kept", flush=True)
        return tune.Tuner.restore(storage.join(exp_root, "trials"), trainable, resume_errored=True,
                                  param_space=space), base
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=mode, search_alg=search_alg, scheduler=scheduler,
                                    num_samples=s.num_samples,
                                    max_concurrent_trials=None if isinstance(search_alg, BasicVariantGenerator)
                                    else s.max_concurrent,
                                    time_budget_s=s.time_budget_s,
                                    reuse_actors=trial_mod.runs_in_process(train_cfg)),  # no process start per trial
        run_config=tune.RunConfig(name="trials", storage_path=path, storage_filesystem=fs, verbose=0,
                                  callbacks=[trial_mod.trial_log("tune", cfg.metric, mode, train_cfg.train.max_steps),
                                             *(callbacks or [])],
                                  checkpoint_config=tune.CheckpointConfig(  # pbt clones any trial's checkpoints
                                      num_to_keep=None if s.scheduler == "pbt" else 2)),
    )
    return tuner, base


def shares_reference(cfg: TuneConfig, train_cfg: TrainConfig) -> bool:
    """A search of preference tuning scores the pairs with the reference once, for every trial
    (`load_tables`), unless the config asks for a live reference, its loss has none (orpo, simpo), or the
    search varies model.path (each trial's reference)."""
    from raylm.train.reference import reference_mode

    p = train_cfg.preference
    return (p is not None and p.reference_logps != "live" and reference_mode(train_cfg) != "none"
            and "model.path" not in cfg.space)


def load_tables(train_cfg: TrainConfig, meta: dict[str, Any], reference: bool = False) -> dict[str, Any]:
    """The dataset version's train (and validation) rows as pyarrow tables in the object store,
    read and tokenized once for every trial (each trial selects and shuffles its own rows);
    `reference`: with the reference's log-probabilities of every pair (`shares_reference`)."""
    import ray

    from raylm.train.job import read_tables
    from raylm.train.reference import with_reference_logps

    tables = read_tables(train_cfg, meta, shuffle=False)
    if reference:
        tables, _ = with_reference_logps(train_cfg, meta, tables, None)
    return {split: ray.put(table) for split, table in tables.items() if table.num_rows}


def results_rows(cfg: TuneConfig, grid) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        conf = r.config or {}
        history = r.metrics_dataframe
        row = {"trial": m.get("trial_id") or Path(r.path).name, "status": "error" if r.error else "done",
               "steps": m.get("step"), "model": m.get("model") or None}
        row.update({f"param:{k}": v for k, v in (conf.get("params") or {}).items()})
        if conf.get("rows") and "fold" in conf["rows"]:
            row["fold"] = conf["rows"]["fold"]
        for k in ALL_METRICS:
            if isinstance(m.get(k), (int, float)):
                row[k] = float(m[k])
        if history is not None and cfg.metric in history:
            vals = history[cfg.metric].dropna()
            row[f"best_{cfg.metric}"] = float(vals.min() if cfg.resolved_mode == "min" else vals.max()) \
                if len(vals) else None
            row["curve"] = json.dumps([[int(s), float(v)] for s, v in zip(history["step"], history[cfg.metric])
                                       if v == v])
            if "loss" in history:
                row["loss_curve"] = json.dumps([[int(s), float(v)] for s, v in zip(history["step"], history["loss"])
                                                if v == v])
        rows.append(row)
    return rows


def cv_summary(cfg: TuneConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: mean and std of each metric over its folds."""
    import numpy as np

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = json.dumps({k: r[k] for k in sorted(r) if k.startswith("param:")}, default=str)
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        entry: dict[str, Any] = {"params": {k[len("param:"):]: v for k, v in json.loads(key).items()},
                                 "folds": len(rs)}
        for m in ALL_METRICS:
            vals = [r[m] for r in rs if isinstance(r.get(m), float)]
            if vals:
                entry[m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1
                            else 0.0, "per_fold": vals}
        out.append(entry)
    sign = 1 if cfg.resolved_mode == "min" else -1
    return sorted(out, key=lambda e: sign * e.get(cfg.metric, {}).get("mean", sign * math.inf))


def best_row(cfg: TuneConfig, rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The best trial that finished with a model (a trial a scheduler stopped has none)."""
    done = [r for r in rows if r.get("model") and isinstance(r.get(cfg.metric), float)]
    if not done:
        return None
    return (min if cfg.resolved_mode == "min" else max)(done, key=lambda r: r[cfg.metric])


def run(cfg: TuneConfig, config_path: Optional[str] = None) -> dict[str, Any]:
    """Run the search `cfg.name` (resume it, start it over or refuse, `_start_or_resume`), one job
    at a time: a second job on the same search stops before it looks at the trials."""
    with reruns.exclusive("tune", cfg.name, storage.join(cfg.output.storage or default_storage(), cfg.name)):
        return _run(cfg, config_path)


def _run(cfg: TuneConfig, config_path: Optional[str]) -> dict[str, Any]:
    import ray

    from raylm.train.job import check_base_model, check_teacher, dataset_meta
    from raylm.tune import report

    base = base_train_dict(cfg, config_path)
    train_cfg = check(cfg, base)
    meta = dataset_meta(train_cfg)
    check_base_model(train_cfg, meta)
    check_teacher(train_cfg, meta)
    if not meta["has_validation"] and not cfg.cv:
        raise config.ConfigError(f"the search needs {cfg.metric} from a validation split; {meta['dataset_id']} "
                                 "has none: give the data config a validation fraction, or use cv")
    exp_root = storage.join(cfg.output.storage or default_storage(), cfg.name)
    restarted = _start_or_resume(cfg, train_cfg, meta, exp_root)
    t0 = time.time()
    print(f"[tune] {cfg.name}: {cfg.search.algorithm} search, {cfg.search.scheduler} scheduler, "
          f"{cfg.search.num_samples} sample(s){f' x {cfg.cv.folds} folds' if cfg.cv else ''} over "
          f"{', '.join(cfg.space) or 'no fields'}; {cfg.search.max_concurrent} at once; optimizing "
          f"{cfg.metric} ({cfg.resolved_mode}) on {meta['dataset_id']}", flush=True)
    shared_reference = shares_reference(cfg, train_cfg)
    tables = load_tables(train_cfg, meta, reference=shared_reference)
    if shared_reference:  # the trials read it with their batches: none holds a copy of the reference
        base = trial_mod.set_path(copy.deepcopy(base), "preference.reference_logps", "precomputed")
    print("[tune] data read once for every trial: "
          + ", ".join(f"{k} {ray.get(v).num_rows} rows" for k, v in tables.items()), flush=True)
    # a parent MLflow run for the search, a child run per trial (Ray Tune's MLflow / Comet callbacks)
    tracker = tracking.Tracker.start(cfg.tracking, "tune", cfg.name, cfg.model_dump(mode="json", exclude={"tracking"}),
                                     tags={"raylm.dataset": meta["dataset_id"]}, resume=not restarted)
    tuner, _ = build_tuner(cfg, base, train_cfg, meta, tables, exp_root, tracking.tune_callbacks(tracker))
    try:
        grid = trial_mod.fit(tuner, "tune", storage.join(exp_root, "trials"))
    except BaseException:
        tracker.finish(ok=False)
        raise
    rows = results_rows(cfg, grid)
    for r in rows:
        r["max_steps"] = train_cfg.train.max_steps
        if r["status"] == "done" and (r.get("steps") or 0) < train_cfg.train.max_steps:
            r["status"] = "stopped"
    summary: dict[str, Any] = {
        "name": cfg.name, "algorithm": cfg.search.algorithm, "scheduler": cfg.search.scheduler,
        "metric": cfg.metric, "mode": cfg.resolved_mode, "trials": len(rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "trial_steps": int(sum(r.get("steps") or 0 for r in rows)), "seconds": round(time.time() - t0, 1),
        "storage": exp_root, "dataset": meta["dataset_id"],
    }
    default = default_point(cfg, train_cfg)
    if default is not None:
        same = [r for r in rows if all(r.get(f"param:{k}") == v for k, v in default.items())
                and isinstance(r.get(cfg.metric), float)]
        if same:
            summary["default"] = {"params": default, cfg.metric: same[0][cfg.metric], "trial": same[0]["trial"]}
    best_params: Optional[dict[str, Any]] = None
    if cfg.cv:
        summary["cv"] = cv_summary(cfg, rows)
        if summary["cv"] and cfg.metric in summary["cv"][0]:
            best_params = summary["cv"][0]["params"]
            summary["best"] = {"params": best_params, cfg.metric: summary["cv"][0][cfg.metric]["mean"]}
    else:
        best = best_row(cfg, rows)
        if best:
            best_params = {k[len("param:"):]: v for k, v in best.items() if k.startswith("param:")}
            summary["best"] = {"trial": best["trial"], "params": best_params, cfg.metric: best[cfg.metric],
                               "trial_model": best["model"]}
    if best_params is not None:
        best_cfg = trial_mod.train_dict(base, best_params, name=cfg.name)
        config.build(TrainConfig, best_cfg, "best config")
        storage.write_text(storage.join(exp_root, "best_train_config.yaml"),
                           f"# The best configuration of the search {cfg.name} ({cfg.metric} "
                           f"{summary['best'][cfg.metric]:.5g}); train it with\n#   raylm submit train --config "
                           f"<this file>\n" + yaml.safe_dump(best_cfg, sort_keys=False))
        summary["best_config"] = storage.join(exp_root, "best_train_config.yaml")
    if summary.get("best", {}).get("trial_model") and cfg.output.register_best:
        card = registry.resolve(summary["best"]["trial_model"], storage.join(exp_root, "models"))
        keep = {k: v for k, v in card.items() if k not in ("name", "version", "id", "uri", "created")}
        keep["search"] = {"name": cfg.name, "trial": summary["best"]["trial"], "params": best_params,
                          "metric": cfg.metric, "value": summary["best"][cfg.metric], "storage": exp_root}
        out = registry.register(registry.local_path(card), cfg.name, keep, root=cfg.output.registry)
        summary["best"]["model"] = out["id"]
    summary["report"] = report.write(cfg, rows, summary, exp_root)
    storage.write_text(storage.join(exp_root, "summary.json"), json.dumps(summary, indent=2, default=str))
    tracker.log_metrics({k: summary[k] for k in ("trials", "errors", "trial_steps", "seconds")}
                        | ({f"best_{cfg.metric}": summary["best"][cfg.metric]} if "best" in summary else {}))
    tracker.log_artifacts([summary["report"]] + [storage.join(exp_root, f) for f in (
        "results.csv", "summary.json", "best_train_config.yaml")], "search")
    if summary.get("best", {}).get("model"):
        tracking.card_artifacts(tracker, summary["best"]["model"], cfg.output.registry)
    tracker.finish()
    summary["tracking"] = tracker.run_id
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = config.job_argparser("Search hyperparameters of a train config with Ray Tune (raylm tune job).") \
        .parse_args(argv)
    cfg = config.load(TuneConfig, args.config, args.overrides)
    check(cfg, base_train_dict(cfg, args.config))  # a bad space fails here, before Ray starts
    from raylm.runtime import init_ray

    init_ray(config=paths_of(cfg, args.config))  # on several nodes: every local path it uses must be shared
    s = run(cfg, args.config)
    print(f"[tune] {s['trials']} trials ({s['errors']} failed), {s['trial_steps']} trial-steps, {s['seconds']:.0f} s",
          flush=True)
    if "default" in s:
        print(f"[tune] default config: {s['metric']} {s['default'][s['metric']]:.4f}", flush=True)
    if "best" in s:
        print(f"[tune] best: {s['metric']} {s['best'][s['metric']]:.4f} with "
              + ", ".join(f"{k}={v}" for k, v in s["best"]["params"].items()), flush=True)
        if s["best"].get("model"):
            print(f"registered model: {s['best']['model']}", flush=True)
        print(f"best train config: {s.get('best_config')}", flush=True)
    for entry in s.get("cv", [])[:5]:
        m = entry.get(s["metric"], {})
        print(f"[tune] cv {entry['params']}: {s['metric']} {m.get('mean', float('nan')):.4f} "
              f"+- {m.get('std', float('nan')):.4f} over {entry['folds']} folds", flush=True)
    print(f"report: {s['report']}", flush=True)
    print("RAYLM_RESULT " + json.dumps({k: s[k] for k in ("name", "trials", "errors", "trial_steps", "best",
                                                          "default", "report") if k in s}, default=str), flush=True)
    return 0 if s["trials"] and s["errors"] < s["trials"] else 1
