"""`jobs/pipeline.py`: the whole life of a model as one job.

prepare_data -> train -> tune -> ensemble -> evaluate -> deploy, each stage configured by its
own config file (the same files `raylm submit <stage>` takes) plus `set` overrides. The
pipeline wires the stages together through the artifacts they write: the dataset version id
goes to every later stage's `data.dataset`, the model a stage registered goes to evaluate and
deploy. Nothing else passes between stages.

Stages are content-addressed: a stage's key is the hash of its resolved config and of the
artifact ids it reads. The pipeline's ledger (`<storage>/<name>/stages.json`) records each
stage's key and output; a stage whose key is in the ledger and whose output still exists is
skipped (the data stage is content-addressed by the data job itself). `force` re-runs stages.
`<storage>/<name>/last_run.json` is the last run's summary (seconds and skipped per stage).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import Field, field_validator

from raylm import config, registry, storage
from raylm.cluster import home
from raylm.config import Strict

STAGES = ("data", "train", "tune", "ensemble", "evaluate", "deploy")
ModelChoice = Literal["auto", "train", "tune", "ensemble"]


class Stage(Strict):
    config: str = Field(..., description="the stage's config file (YAML; relative to the pipeline config's folder)")
    set: list[str] = Field(default_factory=list, description="`key=value` overrides of that config")


class ModelStage(Stage):
    model: ModelChoice = Field("auto", description="which stage's model: auto = the last of ensemble, tune, train "
                               "that the pipeline runs")


class DeployStage(ModelStage):
    keep_serving: bool = Field(False, description="keep this pipeline's running endpoint up while earlier stages "
                               "re-run; false (default) takes it down first so they get its CPUs (a small cluster "
                               "cannot train and serve at once); set true on an autoscaling cluster")


class PipelineConfig(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="pipeline name (its ledger)")
    data: Stage = Field(..., description="prepare_data config (jobs/configs/*.yaml with `sources`)")
    train: Optional[Stage] = Field(None, description="train config; data.dataset/root are set by the pipeline")
    tune: Optional[Stage] = Field(None, description="tune config; its train config's data is set by the pipeline")
    ensemble: Optional[Stage] = Field(None, description="ensemble config; members.source search reads the "
                                      "pipeline's tune stage")
    evaluate: Optional[ModelStage] = Field(None, description="evaluate config; model and data are set by the "
                                           "pipeline")
    deploy: Optional[DeployStage] = Field(None, description="deploy config; its first model's `model` is set by "
                                          "the pipeline")
    storage: Optional[str] = Field(None, description="where the ledger lives; default $RAYLM_HOME/pipelines")
    force: list[Literal["data", "train", "tune", "ensemble", "evaluate", "deploy"]] = Field(
        default_factory=list, description="stages to run again even when their output for the same inputs exists")

    @field_validator("storage")
    @classmethod
    def _uri(cls, v: Optional[str]) -> Optional[str]:
        from raylm.data.config import _check_uri

        return _check_uri(v, "storage", ray_visible=False)


def _stage_file(ref: Stage, base: Optional[Path]) -> Path:
    candidates = [Path(ref.config)]
    if base is not None and not Path(ref.config).is_absolute():
        candidates.insert(0, base / ref.config)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise config.ConfigError(f"no config file at {ref.config} (looked in {', '.join(map(str, candidates))})")
    return found


def stage_key(stage: str, resolved: dict[str, Any], inputs: dict[str, Any]) -> str:
    doc = json.dumps({"stage": stage, "config": resolved, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


class Ledger:
    """stage -> {key, output, seconds} of the pipeline's last runs (a JSON file at a URI)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.entries: dict[str, Any] = storage.read_json(uri) if storage.exists(uri) else {}

    def get(self, stage: str, key: str) -> Optional[dict[str, Any]]:
        e = self.entries.get(stage)
        return e["output"] if e and e.get("key") == key else None

    def put(self, stage: str, key: Optional[str], output: dict[str, Any], seconds: float) -> None:
        self.entries[stage] = {"key": key, "output": output, "seconds": round(seconds, 1),
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        storage.write_text(self.uri, json.dumps(self.entries, indent=2, default=str))


def ledger_uri(cfg: PipelineConfig) -> str:
    return storage.join(cfg.storage or str(home() / "pipelines"), cfg.name, "stages.json")


def _model_exists(ref: str, root: Optional[str]) -> bool:
    try:
        registry.resolve(ref, root)
        return True
    except FileNotFoundError:
        return False


def check(cfg: PipelineConfig, config_path: Optional[str] = None) -> dict[str, Path]:
    """Every stage's config file exists and is valid with its `set` (one clear error naming the
    stage otherwise), before anything runs; returns the files."""
    from raylm.data.config import DataConfig
    from raylm.evaluate.config import EvaluateConfig
    from raylm.serve.config import DeployConfig
    from raylm.train.config import TrainConfig
    from raylm.tune.config import EnsembleConfig, TuneConfig

    kinds = {"data": DataConfig, "train": TrainConfig, "tune": TuneConfig, "ensemble": EnsembleConfig,
             "evaluate": EvaluateConfig, "deploy": DeployConfig}
    base = Path(config_path).resolve().parent if config_path else None
    files = {}
    for stage in STAGES:
        ref = getattr(cfg, stage)
        if ref is None:
            continue
        try:
            files[stage] = _stage_file(ref, base)
            config.load(kinds[stage], files[stage], ref.set)
        except config.ConfigError as e:
            raise config.ConfigError(f"{stage} stage: {e}") from None
    if cfg.ensemble and not cfg.tune:
        ens = config.load(EnsembleConfig, files["ensemble"], cfg.ensemble.set)
        if ens.members.source == "search":
            raise config.ConfigError("ensemble stage: members.source search needs the pipeline's tune stage")
    for stage in ("evaluate", "deploy"):
        ref = getattr(cfg, stage)
        if ref is not None and ref.model != "auto" and getattr(cfg, ref.model) is None:
            raise config.ConfigError(f"{stage} stage: model {ref.model!r}, but the pipeline has no {ref.model} stage")
    if (cfg.evaluate or cfg.deploy) and not (cfg.train or cfg.tune or cfg.ensemble):
        raise config.ConfigError("evaluate / deploy need a stage that registers a model: train, tune or ensemble")
    return files


def _rerun_mode(mode: str, forced: bool) -> str:
    """How a train or tune stage that runs treats the run or search its name already has (a
    stage's own `resume` setting other than auto is kept): one left by another config starts
    over; forced, any does (resuming a finished run would hand back the model it already has)."""
    if mode != "auto":
        return mode
    return "restart" if forced else "restart_if_changed"


def run(cfg: PipelineConfig, config_path: Optional[str] = None) -> dict[str, Any]:
    from raylm.data import pipeline as data_pipeline
    from raylm.data.config import DataConfig
    from raylm.evaluate.config import EvaluateConfig
    from raylm.serve.config import DeployConfig
    from raylm.train.config import TrainConfig
    from raylm.tune.config import EnsembleConfig, TuneConfig

    from raylm.runtime import check_paths_shared

    files = check(cfg, config_path)
    ledger = Ledger(ledger_uri(cfg))
    planned = [s for s in STAGES if getattr(cfg, s) is not None]
    t_start = time.time()
    stages: dict[str, dict[str, Any]] = {}
    models: dict[str, str] = {}  # stage -> registry id
    registries: dict[str, Optional[str]] = {}

    def header(stage: str, what: str) -> None:
        n = planned.index(stage) + 1
        print(f"\n[pipeline] == {n}/{len(planned)} {stage}: {what} ==", flush=True)

    freed: list[bool] = []

    def free_endpoint() -> None:
        """Before the first stage that computes: this pipeline's running endpoint, if any, is taken
        down (deploy.keep_serving false), so training does not wait forever for the CPUs its
        replicas hold; the deploy stage brings it back."""
        if freed or not cfg.deploy or cfg.deploy.keep_serving:
            return
        freed.append(True)
        from raylm.serve.job import undeploy

        app = config.load(DeployConfig, files["deploy"], cfg.deploy.set).name
        if undeploy(app):
            print(f"[pipeline] took down the running endpoint {app!r} while stages re-run (its CPUs are theirs "
                  "now; the deploy stage brings it back; deploy.keep_serving: true keeps it up)", flush=True)

    def cached(stage: str, key: str, valid) -> Optional[dict[str, Any]]:
        out = ledger.get(stage, key) if stage not in cfg.force else None
        if out is not None and valid(out):
            what = out.get("report") if stage == "evaluate" else out.get("model")
            print(f"[pipeline] {stage}: the same inputs already produced {what}: "
                  f"skipped (force: [{stage}] runs it again)", flush=True)
            return out
        free_endpoint()
        return None

    def done(stage: str, key: Optional[str], out: dict[str, Any], t0: float, skipped: bool) -> None:
        seconds = time.time() - t0
        if not skipped:  # (data and deploy are recorded for their times; they are never looked up)
            ledger.put(stage, key, out, seconds)
        stages[stage] = {**out, "seconds": round(seconds, 1), "skipped": skipped}

    # -- data --------------------------------------------------------------------------------
    t0 = time.time()
    data_cfg = config.load(DataConfig, files["data"], cfg.data.set)
    header("data", f"{files['data'].name} -> dataset {data_cfg.name}")
    if "data" in cfg.force:
        data_cfg = data_cfg.model_copy(update={"output": data_cfg.output.model_copy(update={"rebuild": True})})
    if data_pipeline.existing_version(data_cfg) is None:
        free_endpoint()
    check_paths_shared(data_cfg)  # each stage as wired, before it runs (nothing to do on one node)
    m = data_pipeline.run(data_cfg)
    data_root = data_cfg.output.root
    dataset = m["id"]
    data_set = [f"data.dataset={dataset}"] + ([f"data.root={data_root}"] if data_root else [])
    done("data", dataset, {"dataset": dataset, "uri": m["uri"], "reused": bool(m.get("reused"))}, t0,
         bool(m.get("reused")))

    # -- train -------------------------------------------------------------------------------
    if cfg.train:
        t0 = time.time()
        train_cfg = config.load(TrainConfig, files["train"], cfg.train.set + data_set)
        header("train", f"{files['train'].name} -> model {train_cfg.name} ({train_cfg.train.strategy}, "
                        f"{train_cfg.train.num_workers} worker(s))")
        reg = train_cfg.output.registry
        key = stage_key("train", train_cfg.model_dump(mode="json"), {"dataset": dataset})
        out = cached("train", key, lambda o: _model_exists(o["model"], reg))
        if out is None:
            from raylm.train.job import run as train

            if not train_cfg.output.register_model:
                raise config.ConfigError("train: output.register_model is false; the pipeline's later stages "
                                         "need the registered model")
            check_paths_shared(train_cfg)
            train_cfg = train_cfg.model_copy(update={"train": train_cfg.train.model_copy(
                update={"resume": _rerun_mode(train_cfg.train.resume, "train" in cfg.force)})})
            result = train(train_cfg)
            out = {"model": result["model"], "metrics": {k: v for k, v in result["metrics"].items()
                                                         if isinstance(v, (int, float))}}
            done("train", key, out, t0, False)
        else:
            done("train", key, out, t0, True)
        models["train"], registries["train"] = out["model"], reg

    # -- tune --------------------------------------------------------------------------------
    tune_cfg = None
    if cfg.tune:
        from raylm.tune import job as tune_job

        t0 = time.time()
        tune_cfg = config.load(TuneConfig, files["tune"], cfg.tune.set)
        tune_cfg = tune_cfg.model_copy(update={"set": tune_cfg.set + data_set})
        header("tune", f"{files['tune'].name} -> search {tune_cfg.name} ({tune_cfg.search.algorithm}, "
                       f"{tune_cfg.search.scheduler}, {tune_cfg.search.num_samples} sample(s))")
        reg = tune_cfg.output.registry
        resolved = {"tune": tune_cfg.model_dump(mode="json"),
                    "train": tune_job.base_train_dict(tune_cfg, str(files["tune"]))}
        key = stage_key("tune", resolved, {"dataset": dataset})
        out = cached("tune", key, lambda o: o.get("model") is None or _model_exists(o["model"], reg))
        if out is None:
            check_paths_shared(tune_job.paths_of(tune_cfg, str(files["tune"])))
            tune_cfg = tune_cfg.model_copy(update={"resume": _rerun_mode(tune_cfg.resume, "tune" in cfg.force)})
            s = tune_job.run(tune_cfg, str(files["tune"]))
            best = s.get("best") or {}
            out = {"model": best.get("model"), "best": {k: v for k, v in best.items() if k != "trial_model"},
                   "trials": s["trials"], "report": s.get("report"), "storage": s["storage"]}
            done("tune", key, out, t0, False)
        else:
            done("tune", key, out, t0, True)
        if out.get("model"):
            models["tune"], registries["tune"] = out["model"], reg

    # -- ensemble ----------------------------------------------------------------------------
    if cfg.ensemble:
        from raylm.tune import ensemble_job

        t0 = time.time()
        ens_cfg = config.load(EnsembleConfig, files["ensemble"], cfg.ensemble.set)
        update: dict[str, Any] = {"set": ens_cfg.set + data_set}
        inputs: dict[str, Any] = {"dataset": dataset}
        if ens_cfg.members.source == "search":
            if tune_cfg is None:
                raise config.ConfigError("ensemble: members.source search needs the pipeline's tune stage")
            update["members"] = ens_cfg.members.model_copy(update={
                "search": tune_cfg.name, "search_storage": tune_cfg.output.storage})
            inputs["search"] = stages["tune"].get("storage")
            inputs["search_key"] = ledger.entries.get("tune", {}).get("key")
        ens_cfg = ens_cfg.model_copy(update=update)
        header("ensemble", f"{files['ensemble'].name} -> {ens_cfg.members.n} members from "
                           f"{ens_cfg.members.source}, combiner {ens_cfg.combiner}")
        reg = ens_cfg.output.registry
        key = stage_key("ensemble", ens_cfg.model_dump(mode="json"), inputs)
        out = cached("ensemble", key, lambda o: _model_exists(o["model"], reg))
        if out is None:
            check_paths_shared(ensemble_job.paths_of(ens_cfg, str(files["ensemble"])))
            s = ensemble_job.run(ens_cfg, str(files["ensemble"]))
            test = (s.get("scores") or {}).get("test") or {}
            out = {"model": s["model"], "combiner": s["combiner"],
                   "test": {k: test[k] for k in ("ensemble", "member_mean") if k in test}}
            done("ensemble", key, out, t0, False)
        else:
            done("ensemble", key, out, t0, True)
        models["ensemble"], registries["ensemble"] = out["model"], reg

    def chosen(stage: str, choice: str) -> tuple[str, Optional[str]]:
        order = [choice] if choice != "auto" else ["ensemble", "tune", "train"]
        for s in order:
            if s in models:
                return models[s], registries.get(s)
        raise config.ConfigError(f"{stage}: model {choice!r}: the pipeline registers no such model (stages with a "
                                 f"model: {', '.join(models) or 'none'})")

    # -- evaluate ----------------------------------------------------------------------------
    if cfg.evaluate:
        from raylm.evaluate.job import run as evaluate

        t0 = time.time()
        model, reg = chosen("evaluate", cfg.evaluate.model)
        ev_set = [f"model={model}", f"data.dataset={dataset}"] + ([f"data.root={data_root}"] if data_root else []) \
            + ([f"registry={reg}"] if reg else [])
        ev_cfg = config.load(EvaluateConfig, files["evaluate"], cfg.evaluate.set + ev_set)
        header("evaluate", f"{files['evaluate'].name} -> {model} on {dataset} ({ev_cfg.data.split})")
        key = stage_key("evaluate", ev_cfg.model_dump(mode="json"), {"model": model, "dataset": dataset})
        out = cached("evaluate", key, lambda o: storage.exists(o["report"]))
        if out is None:
            check_paths_shared(ev_cfg)
            rep = evaluate(ev_cfg)
            metrics = rep.get("metrics") or {}
            out = {"model": model, "report": rep["report"],
                   "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                   **({"promotion": {k: rep["promotion"][k] for k in ("alias", "promoted", "reason")}}
                      if "promotion" in rep else {})}
            done("evaluate", key, out, t0, False)
        else:
            done("evaluate", key, out, t0, True)

    # -- deploy ------------------------------------------------------------------------------
    if cfg.deploy:
        from raylm.serve.job import run as deploy

        t0 = time.time()
        model, reg = chosen("deploy", cfg.deploy.model)
        if cfg.evaluate and ev_cfg.promote and cfg.evaluate.model == cfg.deploy.model:
            # the evaluate stage decides what is served: the version its alias points at now
            ref = f"{registry.resolve(model, reg)['name']}@{ev_cfg.promote.alias}"
            try:
                model = registry.resolve(ref, reg)["id"]
            except FileNotFoundError:
                raise config.ConfigError(f"deploy: the evaluate stage promotes to {ref}, which points at no "
                                         "model (nothing was promoted yet): nothing to deploy") from None
            print(f"[pipeline] deploy serves {ref} = {model}", flush=True)
        dep_set = ["models.0.model=" + model] + ([f"registry={reg}"] if reg else [])
        dep_cfg = config.load(DeployConfig, files["deploy"], cfg.deploy.set + dep_set)
        header("deploy", f"{files['deploy'].name} -> {model} as {dep_cfg.models[0].name!r}")
        check_paths_shared(dep_cfg)
        out = deploy(dep_cfg)  # always: Serve leaves an unchanged application as it is
        done("deploy", None, {**out, "first_model": dep_cfg.models[0].name}, t0, False)

    summary = {"name": cfg.name, "seconds": round(time.time() - t_start, 1), "dataset": dataset,
               "stages": stages, "models": models, "ledger": ledger.uri}
    storage.write_text(storage.join(ledger.uri.rsplit("/", 1)[0], "last_run.json"),
                       json.dumps(summary, indent=2, default=str))
    print_summary(summary)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    st = s["stages"]
    lines = [f"\n[pipeline] == {s['name']} done in {s['seconds']:.0f} s ==",
             f"  dataset    {s['dataset']}  ({st['data']['uri']})"]
    for stage in STAGES[1:]:
        if stage not in st:
            continue
        x = st[stage]
        tag = "skipped (same inputs)" if x["skipped"] else f"{x['seconds']:.0f} s"
        if stage == "train":
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in x["metrics"].items() if k.startswith("val_"))
            lines.append(f"  train      {x['model']}  {metrics}  [{tag}]")
        elif stage == "tune":
            best = x.get("best") or {}
            value = {k: v for k, v in best.items() if k not in ("trial", "params", "model")}
            lines.append(f"  tune       {x.get('model') or '-'}  best {json.dumps(best.get('params'))} "
                         f"{json.dumps(value)}  report {x.get('report')}  [{tag}]")
        elif stage == "ensemble":
            test = x.get("test") or {}
            f1 = {k: round(v.get("macro_f1", float("nan")), 4) for k, v in test.items()}
            lines.append(f"  ensemble   {x['model']}  ({x['combiner']}) test macro F1 {json.dumps(f1)}  [{tag}]")
        elif stage == "evaluate":
            keep = ("accuracy", "macro_f1", "perplexity", "ece", "n")
            metrics = ", ".join(f"{k} {x['metrics'][k]:.4g}" for k in keep if k in x["metrics"])
            lines.append(f"  evaluate   {x['model']}: {metrics}  [{tag}]")
            lines.append(f"             report {x['report']}")
            if x.get("promotion"):
                p = x["promotion"]
                lines.append(f"             {'promoted' if p['promoted'] else 'not promoted'} to @{p['alias']}: "
                             f"{p['reason']}")
        elif stage == "deploy":
            lines.append(f"  deploy     {x['url']}/  models {json.dumps(x['models'])}  [{tag}]")
            route = "/v1/classify" if x.get("tasks", {}).get(x["first_model"]) == "classification" \
                else "/v1/completions"
            body = ('{"model": "%s", "texts": ["To be, or not to be, that is the question"]}' if route ==
                    "/v1/classify" else '{"model": "%s", "prompt": "To be", "max_tokens": 16}') % x["first_model"]
            lines.append(f"  try it     curl {x['url']}{route} -H \"Authorization: Bearer $RAYLM_API_KEY\" "
                         f"-H 'Content-Type: application/json' -d '{body}'")
    lines.append(f"  ledger     {s['ledger']}")
    print("\n".join(lines), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = config.job_argparser("Run the whole pipeline: data, train, tune, ensemble, evaluate, deploy").parse_args(argv)
    cfg = config.load(PipelineConfig, a.config, a.overrides)
    check(cfg, a.config)  # every stage's config, before Ray starts
    from raylm.runtime import init_ray

    init_ray(config=cfg)  # on several nodes: every local path it names must be shared
    s = run(cfg, a.config)
    print("RAYLM_RESULT " + json.dumps({"name": s["name"], "dataset": s["dataset"], "models": s["models"],
                                        "seconds": s["seconds"],
                                        "skipped": [k for k, v in s["stages"].items() if v["skipped"]],
                                        "url": s["stages"].get("deploy", {}).get("url")}), flush=True)
    return 0
