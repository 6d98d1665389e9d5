"""Ray Tune searches on a real local Ray: every algorithm and scheduler returns a best config
(the trial with the best metric), writes a results table, a ready train config and a report,
and registers the best model; k-fold cross-validation reports mean and std per config; a
trial can be a Ray Train run (Train inside Tune); a killed search resumes without re-running
its finished trials."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT
from raylm import config, registry
from raylm.train.config import TrainConfig
from raylm.tune.config import TuneConfig


def tune_cfg(dataset: dict, name: str, space: dict, search: dict, tmp: Path, **extra) -> TuneConfig:
    d = dataset["dir"]
    data = {
        "name": name,
        "train": str(ROOT / "tests" / "data" / "train_tiny.yaml"),
        "set": ["train.num_workers=1", "train.max_steps=8", "train.eval_every=4", "train.log_every=4",
                "train.batch_size=4", "data.dataset=trainset", f"data.root={dataset['root']}"],
        "space": space,
        "search": {"max_concurrent": 2, **search},
        "output": {"storage": str(tmp / "tune"), "registry": str(d / "registry")},
        **extra,
    }
    return config.build(TuneConfig, data)


def run_search(cfg: TuneConfig) -> tuple[dict, pd.DataFrame]:
    from raylm.tune.job import run

    summary = run(cfg)
    root = Path(summary["storage"])
    df = pd.read_parquet(root / "results.parquet")
    assert len(pd.read_csv(root / "results.csv")) == len(df) == summary["trials"]
    assert (root / "report.html").is_file() and list(root.glob("*.png"))
    return summary, df


def check_best(cfg: TuneConfig, summary: dict, df: pd.DataFrame) -> None:
    """The best is the trial with the lowest val_loss among those that finished; its config is a
    ready train config and its model is registered under the search's name."""
    done = df[df["model"].notna()]
    assert summary["errors"] == 0 and len(done) >= 1
    best = done.loc[done["val_loss"].idxmin()]
    assert summary["best"]["trial"] == best["trial"]
    assert summary["best"]["val_loss"] == pytest.approx(best["val_loss"])
    written = yaml.safe_load(Path(summary["best_config"]).read_text())
    train = config.build(TrainConfig, written)
    for key, value in summary["best"]["params"].items():
        node = train.model_dump(mode="json")
        for part in key.split("."):
            node = node[part]
        assert node == pytest.approx(value)
    card = registry.resolve(summary["best"]["model"], cfg.output.registry)
    assert card["name"] == cfg.name and card["search"]["trial"] == best["trial"]
    assert card["metrics"]["val_loss"] == pytest.approx(best["val_loss"])


def check_tracking(cfg: TuneConfig, summary: dict, tmp: Path) -> None:
    """A parent MLflow run for the search (its report, table, best config and model card), a
    child run per trial with its learning curve; a Comet offline archive per trial."""
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("searches").experiment_id
    parent = client.get_run(summary["tracking"])
    assert parent.info.status == "FINISHED" and parent.data.tags["raylm.stage"] == "tune"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(summary["best"]["val_loss"])
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "search")} >= {
        "search/report.html", "search/results.csv", "search/best_train_config.yaml"}
    assert [f.path for f in client.list_artifacts(parent.info.run_id, "model")] == ["model/card.json"]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == summary["trials"]
    for child in children:
        curve = client.get_metric_history(child.info.run_id, "val_loss")
        assert len(curve) >= 2 and child.info.status == "FINISHED"
    archives = list((tmp / "comet").glob("*.zip"))
    assert len(archives) == summary["trials"] + 1  # and one for the search
    from test_tracking import comet_system_metrics

    assert not set().union(*map(comet_system_metrics, archives))  # the driver's own samples are not a trial's


LR = {"loguniform": [1.0e-4, 2.0e-2]}


def test_grid_search_with_cross_validation(train_dataset, tmp_path):
    """grid: every combination, each on 3 folds; mean and std per configuration."""
    cfg = tune_cfg(train_dataset, "grid-cv", {"train.lr": {"grid": [1.0e-4, 1.0e-2]}},
                   {"algorithm": "grid", "num_samples": 1}, tmp_path, cv={"folds": 3})
    summary, df = run_search(cfg)
    assert summary["trials"] == 6 and sorted(df["fold"]) == [0, 0, 1, 1, 2, 2]
    assert sorted(df["param:train.lr"].unique()) == [1.0e-4, 1.0e-2]
    cv = {e["params"]["train.lr"]: e for e in summary["cv"]}
    for lr, e in cv.items():
        per_fold = df[df["param:train.lr"] == lr]["val_loss"].tolist()
        assert e["folds"] == 3 and e["val_loss"]["mean"] == pytest.approx(sum(per_fold) / 3)
        assert e["val_loss"]["std"] > 0  # three different folds give three different losses
    # 8 steps at 1e-4 barely move a random model: the larger rate wins on every fold
    assert summary["best"]["params"]["train.lr"] == 1.0e-2
    assert cv[1.0e-2]["val_loss"]["mean"] < cv[1.0e-4]["val_loss"]["mean"]


# every algorithm and every scheduler once (random goes with pbt and grid with cv, below)
@pytest.mark.parametrize("algorithm,scheduler", [("tpe", "asha"), ("gp", "fifo"), ("cmaes", "hyperband")])
def test_search_algorithm_and_scheduler_return_the_best_config(train_dataset, tmp_path, capsys, algorithm,
                                                                scheduler):
    space = {"train.lr": LR, "train.warmup_steps": {"choice": [0, 2]}}
    if algorithm == "cmaes":
        space = {"train.lr": LR, "train.weight_decay": {"uniform": [0.0, 0.2]}}
    n = 6 if scheduler in ("asha", "hyperband") else 4
    # one search also tracks: MLflow at a URI of its own, Comet offline (Ray Tune's callbacks per trial)
    track = {"tracking": {"mlflow": True, "uri": f"sqlite:///{tmp_path / 'team.db'}", "experiment": "searches",
                          "comet": {"mode": "offline", "offline_dir": str(tmp_path / "comet")}}} \
        if algorithm == "gp" else {}
    cfg = tune_cfg(train_dataset, f"{algorithm}-{scheduler}", space,
                   {"algorithm": algorithm, "scheduler": scheduler, "num_samples": n, "grace_period": 4,
                    "reduction_factor": 2}, tmp_path, **track)
    summary, df = run_search(cfg)
    if track:
        check_tracking(cfg, summary, tmp_path)
    assert summary["trials"] == n
    check_best(cfg, summary, df)
    lrs = df["param:train.lr"]
    assert lrs.between(1.0e-4, 2.0e-2).all() and lrs.nunique() == n  # sampled, not repeated
    if scheduler in ("asha", "hyperband"):  # the worse trials stopped early: less compute than n full runs
        assert (df["steps"] < 8).any() and summary["trial_steps"] < n * 8
    else:
        assert (df["steps"] == 8).all()
    out = capsys.readouterr().out
    if scheduler == "hyperband":
        # 8 steps, grace 4, factor 2: only the first bracket (rungs 4, 8) can stop a trial before its
        # last step; a second (first rung 8) or third (16) would run its trials in full
        assert "[tune] hyperband: 1 bracket(s), first rungs at step 4" in out
    if scheduler == "asha":  # the job's log: a line as each trial starts and ends, not Tune's tables
        started = re.findall(r"^\[tune\] trial (\w+) started: train\.lr=\S+ train\.warmup_steps=\d$", out, re.M)
        ended = re.findall(r"^\[tune\] trial (\w+) ended at step (\d+) of 8 after \d+ s: val_loss ([\d.]+) "
                           r"\(best so far ([\d.]+), trial (\w+)\); (\d+) trial\(s\) ended$", out, re.M)
        assert len(started) == len(ended) == n and {e[0] for e in ended} == set(started), out[-3000:]
        assert {int(e[1]) for e in ended} == {4, 8}  # some stopped at the first rung
        assert [int(e[5]) for e in ended] == list(range(1, n + 1))
        assert float(ended[-1][3]) == pytest.approx(summary["best"]["val_loss"], abs=1e-4)
        assert ended[-1][4] == summary["best"]["trial"]
        assert "Trial status" not in out and "Trial run_trial" not in out
        # nor Tune's box per Tuner; the job says where the trials' results go
        assert "Configuration for experiment" not in out and "View detailed results" not in out, out[:3000]
        assert re.search(r"^\[tune\] trial results and checkpoints under \S+/trials$", out, re.M), out[:3000]
    if algorithm == "tpe":  # the base config's own values are evaluated first
        assert summary["default"]["params"] == {"train.lr": 5.0e-3, "train.warmup_steps": 0}


def test_population_based_training_exploits_and_mutates(train_dataset, tmp_path):
    cfg = tune_cfg(train_dataset, "pbt", {"train.lr": LR}, {"algorithm": "random", "scheduler": "pbt",
                                                            "num_samples": 4, "perturbation_interval": 4},
                   tmp_path, set=["train.num_workers=1", "train.max_steps=16", "train.batch_size=4",
                                  "data.dataset=trainset", f"data.root={train_dataset['root']}"])
    summary, df = run_search(cfg)
    check_best(cfg, summary, df)
    assert (df["steps"] == 16).all()
    # PBT writes down every exploit it made (whether one happens depends on which trials report
    # together): a bottom trial took a top trial's checkpoint and a perturbed lr
    log = Path(summary["storage"]) / "trials" / "pbt_global.txt"
    for line in (log.read_text().splitlines() if log.exists() else []):
        target, clone, _, _, old, new = json.loads(line)
        assert target != clone and old["params"]["train.lr"] != new["params"]["train.lr"]


def test_trial_can_be_a_multi_worker_ray_train_run(train_dataset, tmp_path):
    """Train inside Tune: the trial is a 2-worker TorchTrainer run (its own Ray Train run dir)."""
    cfg = tune_cfg(train_dataset, "train-in-tune", {"train.lr": {"grid": [1.0e-2]}},
                   {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1}, tmp_path,
                   set=["train.num_workers=2", "train.max_steps=6", "train.eval_every=3", "data.dataset=trainset",
                        f"data.root={train_dataset['root']}"])
    summary, df = run_search(cfg)
    check_best(cfg, summary, df)
    runs = Path(summary["storage"]) / "runs"
    assert [p.name for p in runs.iterdir() if p.is_dir()] == [f"train-in-tune-{summary['best']['trial']}"]
    card = registry.resolve(summary["best"]["model"], cfg.output.registry)
    assert card["metrics"]["steps"] == 6


def test_hyperband_keeps_only_brackets_that_can_stop_a_trial_early():
    """Bracket b's first rung is grace * factor**b; one at or past max_steps would run its trials in
    full (Tune puts ~1 in 4 trials there), so a short search gets fewer brackets, never none."""
    from raylm.tune.job import hyperband_brackets

    assert hyperband_brackets(10, 3, 200) == 3  # rungs from 10, 30, 90
    assert hyperband_brackets(10, 3, 50) == 2  # 90 >= 50
    assert hyperband_brackets(10, 3, 10) == 1  # nothing can stop early: plain ASHA's one bracket


def test_a_stopped_trials_thread_finishes_before_its_process_exits(tmp_path):
    """Tune stops a trial by raising SystemExit in its (daemon) thread and ends the process without
    waiting for it; a thread still freeing its tensors when the interpreter finalizes is killed
    inside torch's C++ destructor and the process aborts (SIGABRT in the demo's tune stage). The
    trial thread's process now waits for it: here the "freeing" outlives the main thread, which
    returns as soon as it has told the thread to stop, as Tune's cleanup does."""
    done = tmp_path / "freed"
    script = f"""
import sys, threading, time
sys.path.insert(0, {str(ROOT / 'platform')!r})
from raylm.tune.trial import finish_before_exit

stop = threading.Event()

def trial():
    finish_before_exit()
    stop.wait()
    time.sleep(0.5)  # unwinding: the model, optimizer and batches being freed
    open({str(done)!r}, "w").close()

threading.Thread(target=trial, daemon=True).start()
time.sleep(0.1)
stop.set()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert done.exists(), "the process exited while its trial thread was still unwinding"

def test_bad_search_configs_fail_with_one_clear_message(train_dataset, tmp_path):
    from raylm.tune.job import base_train_dict, check

    def error(**kw) -> str:
        try:
            cfg = tune_cfg(train_dataset, "bad", kw.pop("space", {"train.lr": LR}), kw.pop("search", {}),
                           tmp_path, **kw)
            check(cfg, base_train_dict(cfg, None))
        except config.ConfigError as e:
            return str(e)
        raise AssertionError("no error")

    assert "train.lrr" in error(space={"train.lrr": LR})
    assert "data" in error(space={"data.dataset": {"choice": ["a", "b"]}})
    assert "val_accuracy" in error(metric="val_accuracy")
    assert "grid" in error(search={"algorithm": "grid"})
    assert "choice" in error(space={"train.lr": {"grid": [1e-3]}}, search={"algorithm": "tpe"})
    assert "low must be below high" in error(space={"train.lr": {"uniform": [1, 0]}})


def test_killed_search_resumes_without_rerunning_finished_trials(train_dataset, tmp_path):
    """The search runs as its own driver (as `ray job submit` runs it); it is killed after two
    trials finished; the same command again finishes the rest and leaves the finished ones."""
    cfg = tune_cfg(train_dataset, "resume-search", {"train.lr": {"grid": [1e-3, 4e-3, 8e-3, 1.6e-2]}},
                   {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1}, tmp_path,
                   set=["train.num_workers=1", "train.max_steps=60", "train.eval_every=20", "train.batch_size=4",
                        "data.dataset=trainset", f"data.root={train_dataset['root']}"])
    cfg_file = tmp_path / "tune.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cmd = [sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", str(cfg_file)]
    trials = tmp_path / "tune" / "resume-search" / "trials"
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - the child writes it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)

    def finished() -> set[str]:
        """Trials the saved experiment state calls finished."""
        states = sorted(trials.glob("experiment_state-*.json"))
        if not states:
            return set()
        try:
            data = json.loads(states[-1].read_text())
        except ValueError:  # being written
            return set()
        out = set()
        for entry in data["trial_data"]:
            t = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
            if t["status"] == "TERMINATED":
                out.add(t["trial_id"])
        return out

    def saved_at() -> float | None:
        states = sorted(trials.glob("experiment_state-*.json"))
        return states[-1].stat().st_mtime if states else None

    deadline, saves = time.time() + 300, []  # when the state on storage was rewritten
    while len(finished()) < 2 and time.time() < deadline and proc.poll() is None:
        if (t := saved_at()) and (not saves or t != saves[-1]):
            saves.append(t)
        time.sleep(0.25)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = finished()
    assert 2 <= len(first) < 4, (tmp_path / "first.log").read_text()[-3000:]
    # the state was saved every search.state_save_s (2 s) while the trials ran (Ray Tune's own
    # default waits 10 s or more, and a trial that ends between two saves runs again on resume).
    # Measured: gaps of 2.0-2.1 s; with state_save_s=10, a first gap of 8.2 s (trial checkpoints
    # force some saves in between)
    gaps = [b - a for a, b in zip(saves, saves[1:])]
    assert gaps and max(gaps) < 6, saves
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the search resume-search" in second.stdout
    # the loop's lines say which trial they come from (a search's trials share one job's log)
    assert re.search(r"\[train\] trial \w+_\d{5}: step \d+/60 loss ", second.stdout), second.stdout[-3000:]
    assert len(finished()) == 4
    models = tmp_path / "tune" / "resume-search" / "models"
    for trial in first:  # not run again: a second run would have registered its model as v2
        assert sorted(p.name for p in (models / f"resume-search-{trial}").iterdir()) == ["v1"]
    df = pd.read_parquet(tmp_path / "tune" / "resume-search" / "results.parquet")
    assert len(df) == 4 and df["model"].notna().all()
    assert sorted(df["param:train.lr"]) == [1e-3, 4e-3, 8e-3, 1.6e-2]
    # the same name with another space: resuming would hand back the old search's trials as this
    # one's, so it stops before anything starts
    doc = cfg.model_dump(mode="json")
    doc["space"] = {"train.lr": {"grid": [2e-3]}}
    doc["set"] = [s.replace("max_steps=60", "max_steps=4").replace("eval_every=20", "eval_every=2") for s in doc["set"]]
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(doc))
    other = [sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", str(tmp_path / "other.yaml")]
    refused = subprocess.run(other, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert refused.returncode == 2 and "space.train.lr.grid: [0.001, 0.004, 0.008, 0.016] -> [0.002]" in \
        refused.stderr and "train_config.train.max_steps: 60 -> 4" in refused.stderr, refused.stderr[-2000:]
    assert len(finished()) == 4  # untouched
    # resume=restart: the old trials and runs go (the next fit starts from nothing), the models stay
    from raylm.train.job import dataset_meta
    from raylm.tune.job import _start_or_resume, base_train_dict, check

    restart = TuneConfig.model_validate({**doc, "resume": "restart"})
    train_cfg = check(restart, base_train_dict(restart, str(tmp_path / "other.yaml")))
    assert _start_or_resume(restart, train_cfg, dataset_meta(train_cfg), str(tmp_path / "tune" / "resume-search"))
    assert not trials.exists() and not (tmp_path / "tune" / "resume-search" / "runs").exists()
    for trial in first:  # the old search's models stay
        assert (models / f"resume-search-{trial}" / "v1").is_dir()
