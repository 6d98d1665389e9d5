"""Experiment tracking without Ray: where a job logs (the embedded store by default, a URI by
config, off by environment, Comet when a key is set), a run continued by name keeps one MLflow
run, and a tracking server that cannot be reached costs seconds and never fails the job.
(The jobs' own tracking is checked where they run: tests/test_train.py's resumed job,
tests/test_tune.py's GP search, tests/test_ensemble.py's evaluation.)"""

from __future__ import annotations

import time

import pytest

from helpers import free_port
from raylm import cluster
from raylm.tracking import Tracker, TrackingConfig, numeric, resolve


def test_where_a_job_logs(monkeypatch, tmp_path):
    monkeypatch.delenv("RAYLM_TRACKING", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    spec = resolve(TrackingConfig())
    assert spec["mlflow"] and spec["uri"] == f"sqlite:///{cluster.home() / 'mlflow' / 'mlflow.db'}"
    assert spec["comet"] is None and spec["experiment"] == "raylm"
    assert resolve(TrackingConfig(uri="http://mlflow.internal:5000"))["uri"] == "http://mlflow.internal:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/team.db")
    assert resolve(TrackingConfig())["uri"] == f"sqlite:///{tmp_path}/team.db"
    monkeypatch.setenv("RAYLM_TRACKING", "off")
    assert not resolve(TrackingConfig())["mlflow"] and resolve(TrackingConfig(mlflow=True))["mlflow"]
    monkeypatch.setenv("COMET_API_KEY", "k")  # a key where the job runs turns Comet on, online
    comet = resolve(TrackingConfig())["comet"]
    assert comet["online"] and comet["project_name"] == "raylm"
    assert resolve(TrackingConfig(comet={"mode": "off"}))["comet"] is None


def test_only_finite_numbers_are_logged_as_metrics():
    assert numeric({"loss": 1, "val": {"acc": 0.5, "per_class": [1, 2]}, "nan": float("nan"), "ok": True,
                    "model": "x@v1", "bad key!": 2.0}) == {"loss": 1.0, "val.acc": 0.5, "bad key_": 2.0}


def test_a_run_continued_by_name_is_one_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    cfg = TrackingConfig(mlflow=True, uri=uri, experiment="exp")
    first = Tracker.start(cfg, "train", "run-a", {"train": {"lr": 0.1, "max_steps": 10}})
    first.log_metrics({"loss": 2.0}, step=5)
    first.finish(ok=False)  # stopped half-way
    again = Tracker.start(cfg, "train", "run-a", {"train": {"lr": 0.1, "max_steps": 20}}, resume=True)
    assert again.run_id == first.run_id
    again.log_metrics({"loss": 1.0}, step=20)
    (tmp_path / "report.html").write_text("<html></html>")
    again.log_artifacts([tmp_path / "report.html", tmp_path / "missing.txt"], "report")
    again.finish()
    other = Tracker.start(cfg, "train", "run-b", {})
    assert other.run_id != first.run_id
    c = MlflowClient(uri)
    run = c.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.1"
    assert run.data.params["train.max_steps"] == "10"  # params are the first run's; MLflow never rewrites them
    assert [(m.step, m.value) for m in c.get_metric_history(first.run_id, "loss")] == [(5, 2.0), (20, 1.0)]
    assert [f.path for f in c.list_artifacts(first.run_id, "report")] == ["report/report.html"]
    assert list((tmp_path / "artifacts").rglob("report.html"))  # beside the store, not in the cwd


def test_an_unreachable_tracking_server_costs_seconds_and_never_fails_the_job(capsys):
    t0 = time.time()
    t = Tracker.start(TrackingConfig(mlflow=True, uri=f"http://127.0.0.1:{free_port()}"), "train", "x", {"a": 1})
    t.log_metrics({"loss": 1.0}, step=1)
    t.finish()
    assert time.time() - t0 < 15 and t.run_id is None and t.failed
    out = capsys.readouterr().out
    assert out.count("[tracking]") == 1 and "goes on without tracking" in out


def test_comet_offline_archive_holds_the_metrics(tmp_path):
    import json
    import zipfile

    t = Tracker.start(TrackingConfig(mlflow=False, comet={"mode": "offline", "offline_dir": str(tmp_path)}),
                      "evaluate", "m@v1", {"model": "m@v1"})
    t.log_metrics({"accuracy": 0.75}, step=1)
    t.finish()
    archives = list(tmp_path.glob("*.zip"))
    assert len(archives) == 1
    with zipfile.ZipFile(archives[0]) as z:
        text = "\n".join(z.read(n).decode(errors="replace") for n in z.namelist())
    assert "accuracy" in text and "0.75" in text and json.dumps("m@v1") in text
    # no system samples: they would describe this process (a driver), not the workers that train
    assert not comet_system_metrics(archives[0])


def comet_system_metrics(archive) -> set[str]:
    """The names of the CPU, GPU, network and disk samples in a Comet offline archive."""
    import json
    import zipfile

    with zipfile.ZipFile(archive) as z:
        lines = z.read("messages.json").decode().splitlines()
    names = {(json.loads(x).get("payload") or {}).get("metric", {}).get("metricName") for x in lines}
    return {n for n in names if n and n.startswith(("sys.cpu", "sys.gpu", "sys.network", "sys.disk"))}


@pytest.mark.parametrize("mode", ["online"])
def test_comet_online_without_a_key_is_reported_not_raised(tmp_path, monkeypatch, capsys, mode):
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    t = Tracker.start(TrackingConfig(mlflow=False, comet={"mode": mode}), "evaluate", "m", {})
    t.log_metrics({"accuracy": 0.5}, step=1)
    t.finish()
    assert t.failed and "Comet" in capsys.readouterr().out
