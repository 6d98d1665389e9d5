"""Search and ensemble benchmarks; each prints one JSON line with the figure and its baseline
from the same run.

  asha      ASHA against the full grid on the same space (every configuration of the grid is a
            trial of both, proposed in the same shuffled order): the trial-steps ASHA spent until
            an evaluation came within 5% of the grid's best validation loss, as a fraction of the
            full grid's trial-steps (goal: <= 40%); also ASHA's total.
  ensemble  an ensemble of MiniLM classifiers (bagging: bootstrap samples of the train split;
            combiner weighted, fitted on the validation split) on play-genre passages (comedy /
            history / tragedy): test accuracy and macro F1 of the ensemble, of its best and its
            average member, and of TF-IDF + logistic regression fitted on the same train passages.

Usage:
  python benchmarks/tune_bench.py asha [--lrs 8] [--steps 54]
  python benchmarks/tune_bench.py ensemble [--members 3] [--steps 40]
Datasets are built (or reused) under .cache/bench; it starts its own local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_quality import BENCH, ROOT, build, start_ray  # noqa: E402  (sets the auth env before Ray)


def _trial_curves(exp_root: str, metric: str) -> list[tuple[str, int, list]]:
    """(trial, steps run, [[step, metric], ...]) per trial, in the order the trials started."""
    import pandas as pd

    df = pd.read_parquet(os.path.join(exp_root, "results.parquet"))
    return sorted((r["trial"], int(r["steps"] or 0), json.loads(r["curve"] or "[]")) for _, r in df.iterrows())


def steps_to_reach(curves: list[tuple[str, int, list]], target: float) -> Optional[int]:
    """Trial-steps spent (trials run one at a time, in order) when an evaluation first reached
    `target` (lower is better); None if none did."""
    spent = 0
    for _, steps, curve in curves:
        hit = next((s for s, v in curve if v <= target), None)
        if hit is not None:
            return spent + hit
        spent += steps
    return None


def bench_asha(args) -> dict:
    import numpy as np

    from raylm import config
    from raylm.tune.config import TuneConfig
    from raylm.tune.job import run

    m = build("shakespeare.yaml", ["steps=[{name: normalize}]", "pack.seq_len=128"])
    # the grid's configurations in a shuffled (seeded) order, the same for both searches: the
    # order a random searcher would propose them in (ASHA compares each trial with those before it)
    lrs = [float(x) for x in np.random.default_rng(args.seed).permutation(np.geomspace(3e-4, 3e-2, args.lrs))]
    tag = os.urandom(3).hex()

    def search(scheduler: str) -> dict:
        return run(config.build(TuneConfig, {
            "name": f"bench-{scheduler}-{tag}", "train": str(ROOT / "jobs" / "configs" / "train_tiny.yaml"),
            "set": [f"data.dataset={m['id']}", f"data.root={BENCH / 'datasets'}", "train.num_workers=1",
                    f"train.max_steps={args.steps}", "train.batch_size=8", "train.warmup_steps=0",
                    "train.eval_batches=4", f"train.eval_every={args.grace}"],
            "space": {"train.lr": {"grid": lrs}, "model.overrides.num_hidden_layers": {"grid": [2, 1]}},
            "search": {"algorithm": "grid", "scheduler": scheduler, "num_samples": 1,
                       "max_concurrent": args.concurrent, "grace_period": args.grace, "reduction_factor": 3},
            "output": {"storage": str(BENCH / "tune"), "registry": str(BENCH / "registry"),
                       "register_best": False}}))

    t0 = time.time()
    grid = search("fifo")
    t_grid = time.time() - t0
    asha = search("asha")
    t_asha = time.time() - t0 - t_grid
    g, a = grid["best"]["val_loss"], asha["best"]["val_loss"]
    target = g * 1.05
    asha_curves, grid_curves = _trial_curves(asha["storage"], "val_loss"), _trial_curves(grid["storage"], "val_loss")
    reach_asha, reach_grid = steps_to_reach(asha_curves, target), steps_to_reach(grid_curves, target)
    exact = g + 1e-6  # the stricter figure: the grid's best itself
    return {"benchmark": "tune_asha_vs_grid", "configs": grid["trials"], "max_steps": args.steps,
            "target_val_loss": round(target, 4), "grid_best_val_loss": round(g, 4),
            "asha_best_val_loss": round(a, 4),
            "asha_trial_steps_to_target": reach_asha, "grid_trial_steps": grid["trial_steps"],
            "compute_fraction": round(reach_asha / grid["trial_steps"], 3) if reach_asha is not None else None,
            "asha_trial_steps_total": asha["trial_steps"],
            "asha_total_fraction": round(asha["trial_steps"] / grid["trial_steps"], 3),
            "grid_trial_steps_to_target_same_order": reach_grid,
            "asha_trial_steps_to_grid_best": steps_to_reach(asha_curves, exact),
            "grid_trial_steps_to_grid_best_same_order": steps_to_reach(grid_curves, exact),
            "asha_seconds": round(t_asha, 1), "grid_seconds": round(t_grid, 1), "max_concurrent": args.concurrent,
            "goal_compute_fraction": 0.4, "dataset": m["id"]}


def bench_ensemble(args) -> dict:
    import numpy as np

    from raylm import config
    from raylm.data.versions import read_split
    from raylm.evaluate import baselines
    from raylm.tune.config import EnsembleConfig
    from raylm.tune.ensemble_job import classification_scores, run

    m = build("authors.yaml", ["name=genres", "label=genre", "sources.0.authors=[shakespeare]",
                               "sources.0.passages.per_document=25"])
    s = run(config.build(EnsembleConfig, {
        "name": f"bench-ens-{os.urandom(3).hex()}", "train": str(ROOT / "jobs" / "configs" / "train_authors.yaml"),
        "set": [f"data.dataset={m['id']}", f"data.root={BENCH / 'datasets'}", "train.num_workers=1",
                f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", "train.batch_size=16",
                "model.freeze_layers=2", "train.lr=3e-4", "train.class_weights=none"],
        "members": {"source": "bagging", "n": args.members}, "combiner": "weighted", "max_concurrent": 2,
        "output": {"storage": str(BENCH / "tune"), "registry": str(BENCH / "registry")}}))
    test = s["scores"]["test"]
    labels = sorted({r["label"] for r in read_split(m, "docs", "train", ["label"]).to_pylist() if r["label"]})
    tr = [r for r in read_split(m, "docs", "train", ["text", "label"]).to_pylist() if r["label"] in labels]
    te = [r for r in read_split(m, "docs", "test", ["text", "label"]).to_pylist() if r["label"] in labels]
    probs = baselines.tfidf_logreg([r["text"] for r in tr], [labels.index(r["label"]) for r in tr],
                                   [r["text"] for r in te], len(labels))
    base = classification_scores(probs, np.array([labels.index(r["label"]) for r in te]))

    def pick(x: dict) -> dict:
        return {k: round(x[k], 4) for k in ("accuracy", "macro_f1", "log_loss")}

    best = max(test["members"], key=lambda x: x["macro_f1"])
    return {"benchmark": "ensemble_vs_members", "task": "play genre of Shakespeare passages", "labels": labels,
            "members": args.members, "source": "bagging", "combiner": "weighted", "steps": args.steps,
            "test_passages": test["n"], "ensemble": pick(test["ensemble"]), "best_member": pick(best),
            "member_mean": pick(test["member_mean"]), "baseline_tfidf_logreg": pick(base),
            "weights": s.get("weights"), "seconds": s["seconds"], "dataset": m["id"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="which", required=True)
    a = sub.add_parser("asha")
    a.add_argument("--lrs", type=int, default=8)
    a.add_argument("--steps", type=int, default=54)
    a.add_argument("--grace", type=int, default=6)
    a.add_argument("--seed", type=int, default=0, help="order of the grid's configurations")
    a.add_argument("--concurrent", type=int, default=1,
                   help="trials at once (1: the trial-steps spent before the target are exact)")
    e = sub.add_parser("ensemble")
    e.add_argument("--members", type=int, default=3)
    e.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    start_ray()
    result = bench_asha(args) if args.which == "asha" else bench_ensemble(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
