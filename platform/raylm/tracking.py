"""Experiment tracking: MLflow (an embedded local store by default, or any tracking URI) and
Comet, for the train, tune, ensemble and evaluate jobs.

Every job run is one MLflow run in one experiment (default `raylm`), tagged with its stage
and name: the config as params, metrics per step, reports and model cards as artifacts.

- Train: the run is opened by the job's driver (params); metrics come from every
  `ray.train.report` through a Ray Train callback that runs in the Train controller (on the
  driver's node: the workers need no tracking client and no access to the store); the model
  card is logged when the run ends. A resumed run (same name) continues its MLflow run.
- Tune: a parent run for the search (its results table, report and best config as
  artifacts) and one child run per trial through Ray Tune's `MLflowLoggerCallback`
  (and `CometLoggerCallback` when Comet is on).
- Ensemble and evaluate: the driver logs the scores and the report files.

The default store is `sqlite:///$RAYLM_HOME/mlflow/mlflow.db` with artifacts beside it (see it
with `mlflow server --backend-store-uri sqlite:///$RAYLM_HOME/mlflow/mlflow.db`, from the full
`mlflow` package); `tracking.uri` (or `MLFLOW_TRACKING_URI`) points elsewhere, e.g. a team's
tracking server. Tracking never fails a job: a store that cannot be reached is reported once
and the job goes on without it.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from raylm.config import Strict

OFF_ENV = "RAYLM_TRACKING"  # "off": no tracking unless a config asks for it (CI, benchmarks)


class CometConfig(Strict):
    mode: Literal["auto", "online", "offline", "off"] = Field(
        "auto", description="auto: online when COMET_API_KEY is set where the job runs (set it on the cluster's "
        "nodes, never in a job's runtime_env), else off; offline: write experiment archives to offline_dir "
        "(upload later with `comet upload`)")
    project: Optional[str] = Field(None, description="Comet project (default: the tracking experiment)")
    workspace: Optional[str] = None
    offline_dir: Optional[str] = Field(None, description="offline archives (default $RAYLM_HOME/comet)")


class TrackingConfig(Strict):
    mlflow: Optional[bool] = Field(None, description=f"log to MLflow (default on, unless {OFF_ENV}=off)")
    uri: Optional[str] = Field(None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                               "sqlite:///$RAYLM_HOME/mlflow/mlflow.db)")
    experiment: str = Field("raylm", min_length=1, description="MLflow experiment (and default Comet project)")
    comet: CometConfig = CometConfig()


def _home() -> Path:
    from raylm.cluster import home

    return home()


def resolve(cfg: TrackingConfig) -> dict[str, Any]:
    """Where this job logs: a plain dict (it travels to the Train controller)."""
    on = cfg.mlflow if cfg.mlflow is not None else os.environ.get(OFF_ENV, "").lower() not in ("off", "0", "false")
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifacts = None
    if on and not uri:
        root = _home() / "mlflow"
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
    if on and uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside it (not in the cwd)
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    mode = cfg.comet.mode
    if mode == "auto":
        mode = "online" if os.environ.get("COMET_API_KEY") else "off"
    return {"mlflow": bool(on), "uri": uri, "artifacts": artifacts, "experiment": cfg.experiment,
            "comet": None if mode == "off" else {
                "online": mode == "online", "project_name": cfg.comet.project or cfg.experiment,
                "workspace": cfg.comet.workspace,
                "offline_dir": cfg.comet.offline_dir or str(_home() / "comet")}}


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def numeric(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) metrics dict, with names MLflow accepts."""
    out = {}
    for k, v in flatten(metrics, prefix).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[re.sub(r"[^\w\-./ ]", "_", k)] = float(v)
    return out


# What a Comet experiment of raylm's does not log. Git data and console output as in Ray's own
# CometLoggerCallback (they throttle). And no system metrics: an experiment lives in a job's driver,
# the Train controller or Tune's driver, never where the training runs, so its CPU, GPU, network
# and disk samples would describe the wrong process; and while the network or disk sampler runs,
# every experiment's `end()` waits for it (measured: 2.1 s an experiment instead of 1.0 s; Tune's
# callback ends one per trial, in the search's driver loop).
COMET_QUIET = dict(auto_output_logging=False, log_git_metadata=False, log_git_patch=False, log_env_cpu=False,
                   log_env_gpu=False, log_env_network=False, log_env_disk=False)


def comet_experiment(comet: dict[str, Any], name: str, tags: list[str]):
    """A Comet experiment (online, or an offline archive) with Ray's throttling-safe defaults."""
    if not comet["online"]:  # offline means no network: no error reports to Comet's Sentry either
        os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
    try:
        import comet_ml
    except ImportError as e:
        raise RuntimeError("tracking.comet is on but comet_ml is not installed: pip install 'raylm[comet]'") from e
    kwargs = dict(project_name=comet["project_name"], workspace=comet["workspace"], display_summary_level=0,
                  **COMET_QUIET)
    if comet["online"]:
        exp = comet_ml.Experiment(**kwargs)
    else:
        Path(comet["offline_dir"]).mkdir(parents=True, exist_ok=True)
        exp = comet_ml.OfflineExperiment(offline_directory=comet["offline_dir"], **kwargs)
    exp.set_name(name)
    exp.add_tags(tags)
    return exp


class Tracker:
    """One job run's MLflow run (and Comet experiment). Built from `spec` (a plain dict), so
    the same run can be written from the driver and from the Train controller. Every call is
    safe: the first failure is printed and the tracker goes quiet."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self._client = None
        self._comet = None
        self.failed = False

    @property
    def run_id(self) -> Optional[str]:
        return self.spec.get("run_id")

    @property
    def active(self) -> bool:
        return bool(self.run_id or self.spec.get("comet"))

    def _mlflow(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.spec["uri"])
        return self._client

    def _guard(self, what: str, fn) -> Any:
        if self.failed:
            return None
        try:
            return fn()
        except Exception as e:  # tracking never fails a job
            self.failed = True
            print(f"[tracking] {what} failed, the job goes on without tracking: {type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}", flush=True)
            return None

    @classmethod
    def start(cls, cfg: TrackingConfig, stage: str, name: str, params: dict[str, Any],
              tags: Optional[dict[str, str]] = None, resume: bool = False) -> "Tracker":
        """Open (or, with `resume`, continue the latest run of the same stage and name) and log params."""
        spec = resolve(cfg)
        spec.update(stage=stage, name=name, params={k: str(v)[:6000] for k, v in flatten(params).items()})
        t = cls(spec)
        if spec["mlflow"]:
            t._guard(f"MLflow at {spec['uri']}", lambda: t._open(tags or {}, resume))
        return t

    def _open(self, tags: dict[str, str], resume: bool) -> None:
        from mlflow.entities import Param

        c, s = self._mlflow(), self.spec
        if s["uri"].startswith(("http://", "https://")):  # fail in seconds, not after MLflow's minutes of retries
            import requests

            requests.get(s["uri"].rstrip("/") + "/health", timeout=10).raise_for_status()
        exp = c.get_experiment_by_name(s["experiment"])
        exp_id = exp.experiment_id if exp else c.create_experiment(
            s["experiment"], **({"artifact_location": s["artifacts"]} if s["artifacts"] else {}))
        run = None
        if resume:
            found = c.search_runs([exp_id], f"tags.`raylm.stage` = '{s['stage']}' and tags.`raylm.name` = '{s['name']}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
            run = found[0] if found else None
        if run is None:
            run = c.create_run(exp_id, run_name=s["name"], tags={"raylm.stage": s["stage"], "raylm.name": s["name"],
                                                                  **tags})
            have = {}
        else:
            c.update_run(run.info.run_id, status="RUNNING")
            have = run.data.params
        s["run_id"], s["experiment_id"] = run.info.run_id, exp_id
        new = [Param(k, v) for k, v in s["params"].items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow takes 100 params a batch
            c.log_batch(run.info.run_id, params=new[i:i + 100])
        print(f"[tracking] MLflow run {run.info.run_id} ({s['experiment']}/{s['name']}) at {s['uri']}", flush=True)

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        values = numeric(metrics)
        if not values:
            return
        if self.run_id:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._guard("MLflow log", lambda: self._mlflow().log_batch(
                self.run_id, metrics=[Metric(k, v, now, step or 0) for k, v in values.items()]))
        if self.spec.get("comet"):
            self._guard("Comet log", lambda: self.comet().log_metrics(values, step=step))

    def comet(self):
        if self._comet is None:
            s = self.spec
            self._comet = comet_experiment(s["comet"], s["name"], [s["stage"]])
            self._comet.log_parameters(s["params"])
        return self._comet

    def log_artifacts(self, uris: list[str | Path], artifact_path: Optional[str] = None) -> None:
        """Log files or local directories (a remote file is fetched first; missing ones are skipped)."""
        import tempfile

        from raylm import storage

        def log(p: Path) -> None:
            if self.run_id:
                fn = self._mlflow().log_artifacts if p.is_dir() else self._mlflow().log_artifact
                self._guard("MLflow artifact", lambda: fn(self.run_id, str(p), artifact_path))
            if self.spec.get("comet"):
                self._guard("Comet artifact", lambda: (self.comet().log_asset_folder(str(p)) if p.is_dir()
                                                       else self.comet().log_asset(str(p))))

        for uri in uris:
            uri = str(uri)
            if storage.is_local(uri):
                p = Path(storage.normalize(uri))
                if p.exists():
                    log(p)
                continue
            if self.failed or not storage.exists(uri):
                continue
            with tempfile.TemporaryDirectory() as d:  # a remote file or directory: fetched first
                p = Path(d) / uri.rstrip("/").rsplit("/", 1)[-1]
                if storage.fsspec_fs(uri)[0].isdir(storage.fsspec_fs(uri)[1]):
                    storage.download_dir(uri, p)
                else:
                    p.write_bytes(storage.read_bytes(uri))
                log(p)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        if self.run_id:
            self._guard("MLflow artifact", lambda: self._mlflow().log_dict(self.run_id, data, name))
        if self.spec.get("comet"):
            self._guard("Comet artifact", lambda: self.comet().log_asset_data(data, name=name))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.run_id:
            self._guard("MLflow tag", lambda: [self._mlflow().set_tag(self.run_id, k, str(v)) for k, v in tags.items()])

    def finish(self, ok: bool = True) -> None:
        if self.run_id:
            self._guard("MLflow end", lambda: self._mlflow().set_terminated(self.run_id, "FINISHED" if ok else "FAILED"))
        if self._comet is not None:
            self._guard("Comet end", self._comet.end)


def train_callback(tracker: Tracker, registry_root: Optional[str] = None):
    """A Ray Train callback (it runs in the Train controller) that logs every report of rank 0
    as metrics at its `step`, and the registered model's card (from the run's registry,
    `registry_root`) when the final report names it."""
    from ray.train import UserCallback

    spec = tracker.spec

    class TrackingCallback(UserCallback):
        def __init__(self):
            self.tracker = None

        def after_report(self, run_context, metrics, checkpoint):
            if self.tracker is None:
                self.tracker = Tracker(spec)
            m = dict(metrics[0]) if metrics else {}
            model = m.pop("model", None)
            self.tracker.log_metrics(m, step=int(m.pop("step", 0) or 0))
            if model:
                card_artifacts(self.tracker, model, registry_root)

    return TrackingCallback()


def card_artifacts(tracker: Tracker, model_uri: str, registry_root: Optional[str] = None) -> None:
    """Tag the run with a registered model and log its card as `model/card.json`."""
    def log():
        from raylm import registry

        card = registry.resolve(model_uri, registry_root)
        tracker.set_tags({"raylm.model": card["id"], "raylm.model_uri": card["uri"]})
        tracker.log_dict(card, "model/card.json")
    tracker._guard("model card", log)


def tune_callbacks(tracker: Tracker) -> list:
    """Ray Tune's own MLflow and Comet callbacks: one child run (experiment) per trial."""
    s, out = tracker.spec, []
    if s["mlflow"] and tracker.run_id:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(tracking_uri=s["uri"], experiment_name=s["experiment"],
                                        tags={"mlflow.parentRunId": tracker.run_id, "raylm.stage": "trial",
                                              "raylm.name": s["name"]}))
    if s.get("comet"):
        from ray.air.integrations.comet import CometLoggerCallback

        c = s["comet"]
        kwargs = {"offline_directory": c["offline_dir"]} if not c["online"] else {}
        if not c["online"]:
            os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
            Path(c["offline_dir"]).mkdir(parents=True, exist_ok=True)
        out.append(CometLoggerCallback(online=c["online"], tags=[s["name"], "trial"], project_name=c["project_name"],
                                       workspace=c["workspace"], **COMET_QUIET, **kwargs))
    return out
