"""Ensembles: each combiner on planted predictions gives the expected combination; an ensemble
of three MiniLM classifiers (three seeds) fine-tuned on the real authors split beats its
average member on held-out passages, is registered as one model, scores the same in the
evaluation job, and answers behind one endpoint (a deployment per member, combined in the
ingress)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch

from conftest import ROOT
from helpers import free_port
from raylm import config, registry
from raylm.tune import ensemble as ens


def test_mean_and_logit_mean_on_planted_predictions():
    p = np.array([[[0.9, 0.1], [0.2, 0.8]],
                  [[0.6, 0.4], [0.4, 0.6]],
                  [[0.3, 0.7], [0.3, 0.7]]])
    assert np.allclose(ens.combine(p, {"combiner": "mean"}), [[0.6, 0.4], [0.3, 0.7]])
    geo = np.exp(np.log(p).mean(0))
    assert np.allclose(ens.combine(p, {"combiner": "logit_mean"}), geo / geo.sum(-1, keepdims=True))
    assert np.allclose(ens.combine(p, {"combiner": "weighted", "weights": [0, 0, 1]}), p[2])


def test_learned_weights_trust_the_member_that_is_right():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    right = np.full((400, 3), 0.05)
    right[np.arange(400), y] = 0.9
    noise = rng.dirichlet(np.ones(3), 400)
    w = ens.fit_weights(np.stack([noise, right]), y)
    assert w[1] > 0.9 and math.isclose(sum(w), 1.0)


def test_stacking_learns_what_averaging_cannot():
    """Member A is informative but has the labels backwards; member B is noise. Averaging gets
    them wrong; a logistic regression on their probabilities learns to flip A."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    a = np.where(y[:, None] == 1, [0.8, 0.2], [0.2, 0.8]) + rng.normal(0, 0.05, (300, 2))
    a = np.clip(a, 0.01, 0.99)
    a /= a.sum(-1, keepdims=True)
    b = rng.dirichlet(np.ones(2), 300)
    probs = np.stack([a, b])
    spec = {"combiner": "stacking", **ens.fit_stacking(probs, y, 2)}
    stacked = ens.combine(probs, spec).argmax(-1)
    averaged = ens.combine(probs, {"combiner": "mean"}).argmax(-1)
    assert (stacked == y).mean() > 0.95 and (averaged == y).mean() < 0.2
    # three labels, one never held out: it gets no probability
    spec3 = ens.fit_stacking(np.stack([np.eye(3)[y]]), y, 3)
    assert np.allclose(ens.combine(np.stack([np.eye(3)[y]]), {"combiner": "stacking", **spec3})[:, 2], 0)


def test_samme_round_and_votes():
    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 0])  # one mistake in five: error 0.2
    w0 = np.full(5, 0.2)
    alpha, w = ens.samme_round(pred, y, w0, 3)
    assert alpha == pytest.approx(math.log(0.8 / 0.2) + math.log(2))
    assert w[4] / w[0] == pytest.approx(math.exp(alpha)) and w.sum() == pytest.approx(1)
    assert ens.samme_round(np.array([1, 1, 0, 0, 0]), y, w0, 3)[0] == 0.0  # worse than chance: no vote
    votes = ens.combine(np.stack([np.eye(3)[[0, 1]], np.eye(3)[[2, 2]]]), {"combiner": "boosting",
                                                                           "alphas": [1.0, 3.0]})
    assert np.allclose(votes, [[0.25, 0, 0.75], [0, 0.25, 0.75]])


def test_soup_is_the_mean_of_the_weights():
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor([7])}
    b = {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor([9])}
    out = ens.soup([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and torch.equal(out["steps"], a["steps"])
    with pytest.raises(ValueError, match="one architecture"):
        ens.soup([a, {"w": torch.zeros(3), "steps": torch.tensor([1])}])


@pytest.fixture(scope="module")
def seeded(authors_dataset):
    """Three MiniLM classifiers fine-tuned on the authors train split with different seeds, averaged."""
    from raylm.tune.config import EnsembleConfig
    from raylm.tune.ensemble_job import run

    d = authors_dataset["dir"]
    cfg = config.build(EnsembleConfig, {
        "name": "authors-seeds", "train": str(ROOT / "jobs" / "configs" / "train_authors.yaml"),
        "set": [f"data.root={authors_dataset['root']}", "train.num_workers=1", "train.max_steps=30",
                "train.eval_every=30", "train.batch_size=8", "model.freeze_layers=4", "model.max_length=64",
                "train.lr=5e-4", "train.warmup_steps=2", "train.cpus_per_worker=0.5"],
        # all three at once on half a CPU each: two at a time left a core idle while the third trained
        "members": {"source": "seeds", "n": 3}, "combiner": "mean", "max_concurrent": 3,
        "output": {"storage": str(d / "tune"), "registry": str(d / "registry")}})
    return run(cfg), d


def test_seeded_ensemble_beats_its_average_member_on_held_out_passages(seeded):
    summary, d = seeded
    test = summary["scores"]["test"]
    assert len(test["members"]) == 3 and test["n"] >= 20
    assert test["ensemble"]["macro_f1"] > test["member_mean"]["macro_f1"], test
    assert test["ensemble"]["log_loss"] < test["member_mean"]["log_loss"], test
    card = registry.resolve(summary["model"], str(d / "registry"))
    assert card["format"] == "ensemble" and card["ensemble"]["combiner"] == "mean"
    assert len(card["ensemble"]["members"]) == 3 and card["labels"] == ["milton", "shakespeare"]


def test_each_member_is_a_minilm_classifier_that_learned_the_authors(seeded, authors_dataset):
    """Transfer learning on the real corpus, checked on a member (the same train loop, export and
    registry as every run): MiniLM's lower 4 of 6 blocks frozen, the rest fine-tuned to tell
    Shakespeare's passages from Milton's, well above chance on held-out passages through the
    exported transformers classifier; the frozen blocks did not move, the top one did."""
    from sklearn.metrics import balanced_accuracy_score
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from raylm.data.versions import read_split
    from raylm.train.config import ModelConfig

    summary, d = seeded
    card = registry.resolve(summary["members"][0], str(d / "tune" / "ensembles" / "authors-seeds" / "models"))
    assert card["task"] == "classification" and card["labels"] == ["milton", "shakespeare"]
    path = registry.local_path(card)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path)
    test = read_split(authors_dataset["manifest"], "docs", "test", ["text", "label"]).to_pylist()
    assert {r["label"] for r in test} == {"milton", "shakespeare"}
    with torch.no_grad():
        # the exported tokenizer cuts texts where training did (model.max_length=64)
        assert tok.model_max_length == 64
        enc = tok([r["text"] for r in test], truncation=True, padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).tolist()
    truth = [card["labels"].index(r["label"]) for r in test]
    # chance: 0.5 (balanced accuracy: the mean of the recall of each author, Milton being 1 in 7)
    assert balanced_accuracy_score(truth, pred) > 0.7
    base = AutoModel.from_pretrained(ModelConfig(task="classification", path="builtin:all-MiniLM-L6-v2").local_path(),
                                     local_files_only=True)
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight,
                       base.encoder.layer[0].attention.self.query.weight)
    assert not torch.equal(model.bert.encoder.layer[5].attention.self.query.weight,
                           base.encoder.layer[5].attention.self.query.weight)


def test_ensemble_is_evaluated_like_any_model(seeded, authors_dataset):
    from raylm.evaluate.config import EvaluateConfig
    from raylm.evaluate.job import run as evaluate

    summary, d = seeded
    rep = evaluate(config.build(EvaluateConfig, {
        "model": summary["model"], "registry": str(d / "registry"),
        "data": {"dataset": "authors", "root": authors_dataset["root"], "split": "test"},
        "baselines": {"tfidf": False}, "robustness": None, "tracking": {"mlflow": True}}))
    ours = summary["scores"]["test"]["ensemble"]
    assert rep["metrics"]["n"] == summary["scores"]["test"]["n"]
    assert rep["metrics"]["accuracy"] == pytest.approx(ours["accuracy"], abs=1.5 / rep["metrics"]["n"])
    # tracked in the embedded MLflow store: the metrics and the report with its plots
    from mlflow import MlflowClient

    from raylm.cluster import home

    client = MlflowClient(f"sqlite:///{home() / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(rep["tracking"])
    assert run.data.metrics["accuracy"] == pytest.approx(rep["metrics"]["accuracy"])
    assert run.data.tags["raylm.stage"] == "evaluate" and run.data.params["model"] == summary["model"]
    files = {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.html", "report/report.json"} <= files and any(f.endswith(".png") for f in files)


def test_ensemble_answers_behind_one_endpoint(seeded, tmp_path, ray_session):
    from ray import serve

    from raylm.serve.config import DeployConfig
    from raylm.serve.job import run as deploy
    from raylm.tune.ensemble import EnsembleClassifier

    summary, d = seeded
    port = free_port()
    out = deploy(config.build(DeployConfig, {
        "name": "ens", "registry": str(d / "registry"), "http": {"port": port}, "auth": {"required": False},
        "access_log": False,
        "models": [{"name": "authors", "model": summary["model"], "num_cpus": 0.25}]}))
    try:
        texts = ["Of Man's first disobedience, and the fruit of that forbidden tree whose mortal taste brought "
                 "death into the World, and all our woe", "To be, or not to be, that is the question"]
        r = requests.post(out["url"] + "/v1/classify", json={"model": "authors", "texts": texts}, timeout=120)
        assert r.status_code == 200, r.text
        got = [x["probabilities"] for x in r.json()["data"]]
        local = EnsembleClassifier(registry.local_path(registry.resolve(summary["model"], str(d / "registry"))))
        want = local.probabilities(texts).numpy()
        assert np.allclose([[g["milton"], g["shakespeare"]] for g in got], want, atol=1e-4)
        assert len([n for n in serve.status().applications["ens"].deployments if n.startswith("model-")]) == 3
        health = requests.get(out["url"] + "/healthz", timeout=30)
        assert health.status_code == 200 and health.json()["models"] == {"authors": "ready"}
        # `access_log: false`: none of the app's replicas (the ingress, each member) logged a request
        # (tests/test_serve.py finds them in the logs of an app that keeps the default)
        from helpers import serve_access_lines

        assert not serve_access_lines(ray_session.temp_dir, "ens")
    finally:
        serve.shutdown()  # as tests/test_serve.py does: the next app starts Serve on its own port


# Every other member source and combiner, end to end on the real split: small members (MiniLM cut
# to its first 2 blocks, 8 steps, 32 tokens), so each ensemble costs seconds. Quality is the
# seeded ensemble's test above; these check what each source and combiner must produce.
SMALL = ["train.num_workers=1", "train.max_steps=8", "train.eval_every=8", "train.batch_size=8", "train.lr=1e-3",
         "train.warmup_steps=1", "model.max_length=32", "model.overrides.num_hidden_layers=2"]


def build_ensemble(authors_dataset, name: str, members: dict, combiner: str, sets: tuple[str, ...] = (),
                   **extra) -> tuple[dict, dict]:
    from raylm.tune.config import EnsembleConfig
    from raylm.tune.ensemble_job import run

    d = authors_dataset["dir"]
    summary = run(config.build(EnsembleConfig, {
        "name": name, "train": str(ROOT / "jobs" / "configs" / "train_authors.yaml"),
        "set": [f"data.root={authors_dataset['root']}", *SMALL, *sets], "members": members, "combiner": combiner,
        "output": {"storage": str(d / "tune"), "registry": str(d / "registry")}, **extra}))
    card = registry.resolve(summary["model"], str(d / "registry"))
    test = summary["scores"]["test"]
    assert test["n"] >= 20 and 0 <= test["ensemble"]["accuracy"] <= 1 and len(test["members"]) == len(
        summary["members"])
    return summary, card


def _answers(card: dict) -> np.ndarray:
    """A registered ensemble's probabilities for two lines, loaded as the evaluation and serving do."""
    from raylm.tune.ensemble import EnsembleClassifier

    return EnsembleClassifier(registry.local_path(card)).probabilities(
        ["To be, or not to be", "Of Man's first disobedience"]).numpy()


def test_boosting_rounds_vote_by_their_error(authors_dataset, capsys):
    summary, card = build_ensemble(authors_dataset, "boost", {"source": "boosting", "n": 2}, "boosting")
    # each round's trial says what it trained on in one short line: the weights by their count
    out = capsys.readouterr().out
    started = [ln for ln in out.splitlines() if ln.startswith("[ensemble] trial ") and " started: " in ln]
    assert len(started) == 2 and all(re.search(r"rows\.weights=\[\d+ values\] rows\.seed=\d+$", ln)
                                     for ln in started), started
    ended = [ln for ln in out.splitlines() if ln.startswith("[ensemble] trial ") and " ended at step " in ln]
    assert len(ended) == 2 and all(re.search(r": val_loss \d+\.\d{4}; 1 trial\(s\) ended$", ln) for ln in ended), ended
    assert "Configuration for experiment" not in out and out.count("[ensemble] trial results and checkpoints under") == 2
    alphas = card["ensemble"]["alphas"]
    assert card["ensemble"]["combiner"] == "boosting" and len(alphas) == 2 == len(card["ensemble"]["members"])
    assert all(a >= 0 and math.isfinite(a) for a in alphas)
    probs = _answers(card)
    assert probs.shape == (2, 2) and np.allclose(probs.sum(-1), 1)


def test_folds_are_stacked_on_out_of_fold_predictions(authors_dataset):
    summary, card = build_ensemble(authors_dataset, "folds", {"source": "folds", "n": 2}, "stacking")
    e = card["ensemble"]
    assert e["combiner"] == "stacking" and e["stack_features"] == "member_mean" and len(e["members"]) == 2
    assert np.asarray(e["coef"]).shape[-1] == 2  # a meta-model over the 2 labels' mean probabilities
    assert np.allclose(_answers(card).sum(-1), 1)


def test_soup_is_one_model_with_the_mean_of_its_members_weights(authors_dataset):
    """Its members read long texts in windows (`model.long_texts`): the job scores them, and the
    soup, on whole passages, and the test score it reports is the one the soup gives loaded as
    evaluation and serving load it."""
    from safetensors.torch import load_file

    from raylm.data.versions import read_split
    from raylm.serve.engine import ClassifierEngine

    summary, card = build_ensemble(authors_dataset, "soup", {"source": "seeds", "n": 2}, "soup",
                                   sets=("model.long_texts=windows", "model.max_windows=2"))
    assert card["format"] == "full" and "ensemble.json" not in {p.name for p in registry.local_path(card).iterdir()}
    d = authors_dataset["dir"]
    members = [load_file(str(registry.local_path(registry.resolve(m, str(d / "tune" / "ensembles" / "soup" /
                                                                       "models"))) / "model.safetensors"))
               for m in card["ensemble"]["members"]]
    soup = load_file(str(registry.local_path(card) / "model.safetensors"))
    head = [k for k in soup if k.startswith("classifier.") and k.endswith("weight")][0]
    assert not torch.equal(members[0][head], members[1][head])  # two seeds: two different heads
    assert torch.allclose(soup[head], (members[0][head] + members[1][head]) / 2, atol=1e-6)
    assert card["config"]["model"]["long_texts"] == "windows" and card["config"]["model"]["max_windows"] == 2
    engine = ClassifierEngine(registry.local_path(card), dtype="float32")
    assert engine.long_texts == "windows" and engine.max_windows == 2
    test = read_split(authors_dataset["manifest"], "docs", "test", ["text", "label"]).to_pydict()
    assert max(len(engine.tok(t)["input_ids"]) for t in test["text"]) > 32  # passages longer than a window
    probs = engine.probabilities(test["text"]).numpy()
    accuracy = float(np.mean([engine.labels[i] == y for i, y in zip(probs.argmax(-1), test["label"])]))
    assert summary["scores"]["test"]["ensemble"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert summary["scores"]["test"]["n"] == len(test["text"])


def test_members_from_a_search_and_from_the_registry(authors_dataset):
    from raylm.tune.config import TuneConfig
    from raylm.tune.job import run as search

    d = authors_dataset["dir"]
    s = search(config.build(TuneConfig, {
        "name": "authors-lr", "train": str(ROOT / "jobs" / "configs" / "train_authors.yaml"),
        "set": [f"data.root={authors_dataset['root']}", *SMALL], "metric": "val_loss",
        "space": {"train.lr": {"grid": [3e-4, 1e-3, 3e-3]}}, "search": {"algorithm": "grid"},
        "output": {"storage": str(d / "tune"), "registry": str(d / "registry")}}))
    summary, card = build_ensemble(authors_dataset, "top2", {"source": "search", "search": "authors-lr", "n": 2,
                                                             "search_storage": str(d / "tune")}, "weighted")
    results = pd.read_parquet(Path(s["storage"]) / "results.parquet").sort_values("val_loss")
    reg = str(Path(s["storage"]) / "models")
    top = [registry.resolve(m, reg)["id"] for m in results["model"][:2]]
    assert sorted(summary["members"]) == sorted(top)  # the search's best two
    w = card["ensemble"]["weights"]
    assert len(w) == 2 and math.isclose(sum(w), 1.0, abs_tol=1e-6)
    # members from the registry: the search's three models, by id from its registry, combined another
    # way (small members: the seeded ensemble's 6-block ones cost ~20 s more to score here)
    ids = [registry.resolve(m, reg)["id"] for m in results["model"]]
    summary, card = build_ensemble(authors_dataset, "again", {"source": "models", "models": ids}, "logit_mean",
                                   registry=reg)
    assert card["ensemble"]["members"] == ids and card["ensemble"]["combiner"] == "logit_mean"
    assert np.allclose(_answers(card).sum(-1), 1)
