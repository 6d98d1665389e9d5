"""Ensembles of classifiers: how members' class probabilities combine, and a classifier that
runs an ensemble directory (what evaluation loads; serving runs the members as deployments and
calls `combine` in its ingress).

An ensemble directory holds `ensemble.json` (combiner, its fitted parameters, labels) and
`members/<i>/` (each a registry model directory). A weight soup is not such a directory: it
is one model whose weights are the members' mean, registered like any model.

Combiners, on member probabilities P[m, n, k] (member, example, class):
  mean         equal-weight mean of probabilities
  weighted     weighted mean; weights (on the simplex) minimize the log loss on held-out rows
  logit_mean   mean of log-probabilities, softmaxed again (a geometric mean)
  stacking     a logistic-regression meta-model on the members' concatenated probabilities,
               fitted on out-of-fold (k-fold members) or validation predictions
  boosting     AdaBoost-SAMME: sum over rounds of alpha_m * one-hot(argmax P[m])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

COMBINERS = ("mean", "weighted", "logit_mean", "stacking", "boosting", "soup")
EPS = 1e-9


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def combine(probs: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """(members, n, classes) member probabilities -> (n, classes) ensemble probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    kind = spec["combiner"]
    m = probs.shape[0]
    if kind in ("mean", "weighted"):
        w = np.asarray(spec.get("weights") or [1.0 / m] * m, dtype=np.float64)
        out = np.tensordot(w / w.sum(), probs, axes=1)
        return out / out.sum(-1, keepdims=True)
    if kind == "logit_mean":
        return _softmax(np.log(np.clip(probs, EPS, 1)).mean(0))
    if kind == "stacking":  # k-fold stacking reads the fold members' mean (see fit in ensemble_job)
        x = probs.mean(0) if spec.get("stack_features") == "member_mean" else features(probs)
        coef, intercept = np.asarray(spec["coef"]), np.asarray(spec["intercept"])
        return _softmax(x @ coef.T + intercept)
    if kind == "boosting":
        alphas = np.asarray(spec["alphas"], dtype=np.float64)
        votes = np.zeros(probs.shape[1:])
        for a, p in zip(alphas, probs):
            votes[np.arange(p.shape[0]), p.argmax(-1)] += a
        return votes / max(alphas.sum(), EPS) if alphas.sum() > 0 else np.full(votes.shape, 1 / votes.shape[1])
    raise ValueError(f"unknown combiner {kind!r}; one of {', '.join(COMBINERS)}")


def features(probs: np.ndarray) -> np.ndarray:
    """Stacking features: each member's probabilities side by side -> (n, members * classes)."""
    return np.concatenate(list(np.asarray(probs)), axis=-1)


def fit_weights(probs: np.ndarray, y: np.ndarray) -> list[float]:
    """Mixture weights on the simplex that minimize the log loss of the weighted mean."""
    from scipy.optimize import minimize

    probs = np.asarray(probs, dtype=np.float64)
    picked = probs[:, np.arange(len(y)), y]  # (members, n): each member's probability of the truth

    def loss(theta: np.ndarray) -> float:
        w = _softmax(theta)
        return float(-np.log(np.clip(w @ picked, EPS, None)).mean())

    res = minimize(loss, np.zeros(probs.shape[0]), method="L-BFGS-B")
    return [float(x) for x in _softmax(res.x)]


def fit_stacking(probs: np.ndarray, y: np.ndarray, num_labels: int, c: float = 1.0) -> dict[str, Any]:
    """A multinomial logistic regression on the members' probabilities; returned as (classes,
    features) coefficients and (classes,) intercepts, whatever the number of classes."""
    from sklearn.linear_model import LogisticRegression

    x = features(probs)
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError("stacking needs held-out rows of at least two labels")
    lr = LogisticRegression(C=c, max_iter=2000).fit(x, y)
    coef = np.zeros((num_labels, x.shape[1]))
    intercept = np.full(num_labels, -1e4)  # a label never seen held out is never predicted
    if len(lr.classes_) == 2:  # sklearn keeps one row for two classes: logit of the second
        coef[lr.classes_[1]], intercept[lr.classes_[1]] = lr.coef_[0], lr.intercept_[0]
        intercept[lr.classes_[0]] = 0.0
        coef[lr.classes_[0]] = 0.0
    else:
        for row, cls in enumerate(lr.classes_):
            coef[cls], intercept[cls] = lr.coef_[row], lr.intercept_[row]
    return {"coef": coef.tolist(), "intercept": intercept.tolist()}


def samme_round(pred: np.ndarray, y: np.ndarray, w: np.ndarray, num_labels: int) -> tuple[float, np.ndarray]:
    """One AdaBoost-SAMME update: the member's vote weight alpha, and the example weights for the
    next round (misclassified examples weigh more)."""
    miss = pred != y
    err = float(np.clip((w * miss).sum() / w.sum(), 1e-6, 1 - 1e-6))
    alpha = float(np.log((1 - err) / err) + np.log(num_labels - 1))
    if alpha <= 0:  # no better than chance: no vote, weights unchanged
        return 0.0, w
    w = w * np.exp(alpha * miss)
    return alpha, w / w.sum()


def soup(state_dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """The element-wise mean of same-architecture state dicts (a uniform model soup)."""
    keys = state_dicts[0].keys()
    for sd in state_dicts[1:]:
        if sd.keys() != keys or any(sd[k].shape != state_dicts[0][k].shape for k in keys):
            raise ValueError("a weight soup needs members of one architecture (same parameters and shapes)")
    out = {}
    for k in keys:
        t = state_dicts[0][k]
        out[k] = sum(sd[k].double() for sd in state_dicts) / len(state_dicts) if t.is_floating_point() else t
        out[k] = out[k].to(t.dtype)
    return out


def read_spec(model_dir: str | Path) -> Optional[dict[str, Any]]:
    p = Path(model_dir) / "ensemble.json"
    return json.loads(p.read_text()) if p.is_file() else None


class EnsembleClassifier:
    """An ensemble directory as one classifier with `probabilities(texts, max_length)`, like
    `serve.engine.ClassifierEngine` (members loaded with it, so adapters and devices behave the
    same)."""

    def __init__(self, model_dir: str | Path, num_gpus: float = 0.0, dtype: str = "float32"):
        from raylm.serve.engine import ClassifierEngine

        self.spec = read_spec(model_dir)
        if self.spec is None:
            raise FileNotFoundError(f"{model_dir} has no ensemble.json")
        self.members = [ClassifierEngine(Path(model_dir) / "members" / str(i), num_gpus=num_gpus, dtype=dtype)
                        for i in range(len(self.spec["members"]))]
        self.labels = self.spec["labels"]
        for eng in self.members:
            if eng.labels != self.labels:
                raise ValueError(f"ensemble member predicts {eng.labels}, the ensemble {self.labels}")

    def member_probabilities(self, texts: list[str], max_length: Optional[int] = None) -> np.ndarray:
        return np.stack([e.probabilities(texts, max_length).numpy() for e in self.members])

    def probabilities(self, texts: list[str], max_length: Optional[int] = None):
        import torch

        return torch.from_numpy(combine(self.member_probabilities(texts, max_length), self.spec))
