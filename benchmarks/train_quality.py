"""Short quality runs on the corpus; each prints one JSON line with the figure and its
baseline from the same run.

  lm        a tiny GPT-2 trained K steps on the Shakespeare/Milton dataset (DDP, 2 workers):
            validation perplexity, against a unigram model of the train split (the perplexity
            of knowing only token frequencies) on the same validation blocks.
  classify  MiniLM fine-tuned on Shakespeare-vs-Milton passages (jobs/configs/train_authors.yaml):
            accuracy, balanced accuracy and macro F1 on the held-out test passages, against
            TF-IDF + logistic regression (scikit-learn) fitted on the same train passages.

Usage:
  python benchmarks/train_quality.py lm [--steps 300]
  python benchmarks/train_quality.py classify [--steps 120]
Datasets are built (or reused) under .cache/bench; it starts its own local Ray.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

if not os.environ.get("RAY_ADDRESS"):  # Ray reads its auth mode at import: set it before anything imports Ray
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", "benchmark-" + os.urandom(8).hex())

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RAYLM_TEST_CACHE", ROOT / ".cache" / "corpus"))
BENCH = ROOT / ".cache" / "bench"


def start_ray() -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return
    ray.init(num_cpus=os.cpu_count(), _temp_dir=tempfile.mkdtemp(prefix="rb"), include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def build(config_file: str, overrides: list[str]) -> dict:
    from raylm import config
    from raylm.data import pipeline
    from raylm.data.config import DataConfig

    cfg = config.load(DataConfig, ROOT / "jobs" / "configs" / config_file,
                      [f"sources.0.cache_dir={CACHE}", f"output.root={BENCH / 'datasets'}", *overrides])
    return pipeline.run(cfg)


def train(config_file: str, overrides: list[str]) -> tuple[dict, dict, float]:
    from raylm import config, registry
    from raylm.train.config import TrainConfig
    from raylm.train.job import run

    name = f"bench-{os.urandom(3).hex()}"
    cfg = config.load(TrainConfig, ROOT / "jobs" / "configs" / config_file, [
        f"name={name}", f"data.root={BENCH / 'datasets'}", f"output.storage={BENCH / 'runs'}",
        f"output.registry={BENCH / 'registry'}", *overrides])
    t0 = time.time()
    out = run(cfg)
    return out, registry.resolve(out["model"], str(BENCH / "registry")), time.time() - t0


def bench_lm(args) -> dict:
    import numpy as np

    from raylm.data.versions import read_split

    m = build("shakespeare.yaml", ["steps=[{name: normalize}]", "pack.seq_len=256"])
    _, card, seconds = train("train_tiny.yaml", [
        f"data.dataset={m['id']}", "model.arch=gpt2", "model.preset=tiny", f"train.max_steps={args.steps}",
        "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=20", "train.log_every=50",
        f"train.eval_every={args.steps}", "train.eval_batches=8", f"train.checkpoint_every={args.steps}"])
    # Unigram baseline: token frequencies of the train split (add-one smoothed), scored on the
    # validation blocks the run evaluated (eval_batches x batch_size per worker, 2 workers).
    vocab = m["tokenizer"]["vocab_size"]
    counts = np.ones(vocab, dtype=np.float64)
    for ids in read_split(m, "packed", "train", ["input_ids"]).column("input_ids").to_numpy(zero_copy_only=False):
        counts += np.bincount(ids, minlength=vocab)
    logp = np.log(counts / counts.sum())
    val = read_split(m, "packed", "validation", ["input_ids"]).column("input_ids").to_numpy(zero_copy_only=False)
    # the model predicts tokens 2..n of each block from the ones before; score the same tokens
    nll = [-logp[ids[1:]].mean() for ids in val[: 2 * 8 * 8]]
    return {"benchmark": "train_quality_lm", "model": "gpt2-tiny", "steps": card["metrics"]["steps"],
            "tokens": card["metrics"]["tokens"], "val_ppl": round(card["metrics"]["val_ppl"], 2),
            "baseline_unigram_val_ppl": round(math.exp(float(np.mean(nll))), 2),
            "train_seconds": round(seconds, 1), "dataset": m["id"]}


def bench_classify(args) -> dict:
    import numpy as np
    import torch
    from sklearn.metrics import balanced_accuracy_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raylm import registry
    from raylm.data.versions import read_split
    from raylm.evaluate import baselines, metrics

    m = build("authors.yaml", [])
    _, card, seconds = train("train_authors.yaml", [f"data.dataset={m['id']}", f"train.max_steps={args.steps}"])
    labels = card["labels"]
    tr = read_split(m, "docs", "train", ["text", "label"]).to_pylist()
    te = read_split(m, "docs", "test", ["text", "label"]).to_pylist()
    y_test = [labels.index(r["label"]) for r in te]

    path = registry.local_path(card)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path)
    pred = []
    with torch.no_grad():
        for i in range(0, len(te), 64):
            enc = tok([r["text"] for r in te[i:i + 64]], truncation=True, padding=True,
                      max_length=card["config"]["model"]["max_length"], return_tensors="pt")
            pred += model(**enc).logits.argmax(-1).tolist()

    base = baselines.tfidf_logreg([r["text"] for r in tr], [labels.index(r["label"]) for r in tr],
                                  [r["text"] for r in te], len(labels)).argmax(1).tolist()

    def scores(p):
        m = metrics.classification(np.eye(len(labels))[p], np.array(y_test), labels)
        return {"accuracy": round(m["accuracy"], 4),
                "balanced_accuracy": round(balanced_accuracy_score(y_test, p), 4),
                "macro_f1": round(m["f1_macro"], 4)}

    return {"benchmark": "train_quality_classify", "model": "all-MiniLM-L6-v2", "steps": card["metrics"]["steps"],
            "test_passages": len(te), "train_passages": len(tr),
            "test_label_counts": {lab: y_test.count(i) for i, lab in enumerate(labels)},
            "minilm": scores(pred), "baseline_tfidf_logreg": scores(base), "train_seconds": round(seconds, 1),
            "dataset": m["id"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="which", required=True)
    lm = sub.add_parser("lm")
    lm.add_argument("--steps", type=int, default=300)
    cl = sub.add_parser("classify")
    cl.add_argument("--steps", type=int, default=120)
    args = p.parse_args()
    start_ray()
    result = bench_lm(args) if args.which == "lm" else bench_classify(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
