"""Metrics from predictions (scikit-learn where it has them; calibration and the causal-LM
aggregates are a few lines of numpy). Pure functions: tests feed them known answers."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np


def classification(probs: np.ndarray, y: np.ndarray, labels: list[str], bins: int = 10) -> dict[str, Any]:
    """probs: (N, C) class probabilities; y: (N,) true class ids."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    pred = probs.argmax(1)
    ids = list(range(len(labels)))
    out: dict[str, Any] = {"n": int(len(y)), "accuracy": float(accuracy_score(y, pred))}
    for avg in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(y, pred, labels=ids, average=avg, zero_division=0)
        out |= {f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)}
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=ids, average=None, zero_division=0)
    out["per_class"] = {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, lab in enumerate(labels)}
    present = sorted(set(y.tolist()))
    out["roc_auc_ovr"] = None
    if len(present) == len(labels) and len(labels) >= 2:
        out["roc_auc_ovr"] = float(roc_auc_score(y, probs[:, 1]) if len(labels) == 2 else
                                   roc_auc_score(y, probs, multi_class="ovr", labels=ids))
    out["confusion"] = confusion_matrix(y, pred, labels=ids).tolist()
    cal = calibration(probs.max(1), (pred == y).astype(float), bins)
    out["ece"], out["reliability"] = cal["ece"], cal["bins"]
    return out


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error over equal-width confidence bins, and the reliability diagram
    (per bin: mean confidence, accuracy, count)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows, ece, n = [], 0.0, max(len(confidence), 1)
    for b in range(bins):
        mask = which == b
        if not mask.any():
            rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": 0, "confidence": None,
                         "accuracy": None})
            continue
        conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
        ece += mask.sum() / n * abs(acc - conf)
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(mask.sum()),
                     "confidence": conf, "accuracy": acc})
    return {"ece": float(ece), "bins": rows}


def language_model(nll: np.ndarray, tokens: np.ndarray, correct: np.ndarray, nbytes: np.ndarray) -> dict[str, float]:
    """Per-document sums (nats of NLL, predicted tokens, correct next-token guesses, UTF-8 bytes
    of the predicted text) -> loss, perplexity, bits per byte, next-token accuracy."""
    total_tokens = float(tokens.sum())
    if total_tokens == 0:
        return {"n": int(len(tokens)), "tokens": 0}
    loss = float(nll.sum() / total_tokens)
    return {"n": int(len(tokens)), "tokens": int(total_tokens), "loss": loss, "perplexity": math.exp(min(loss, 700)),
            "bits_per_byte": float(nll.sum() / math.log(2) / max(float(nbytes.sum()), 1.0)),
            "next_token_accuracy": float(correct.sum() / total_tokens)}


HIGHER_IS_BETTER = {"accuracy": True, "f1_macro": True, "f1_micro": True, "precision_macro": True,
                    "recall_macro": True, "roc_auc_ovr": True, "next_token_accuracy": True,
                    "ece": False, "loss": False, "perplexity": False, "bits_per_byte": False}


def slices(groups: list[Optional[str]], metric_fn, metric: str, max_gap: float, min_size: int) -> dict[str, Any]:
    """Every metric per group value; the gap on `metric` between the best and the worst group
    (of at least `min_size` documents) and whether it exceeds `max_gap`."""
    values = np.array(["<none>" if g is None else str(g) for g in groups], dtype=object)
    per: dict[str, Any] = {}
    for g in sorted(set(values.tolist())):
        mask = values == g
        per[g] = {"n": int(mask.sum()), **metric_fn(mask)}
    compared = {g: m[metric] for g, m in per.items() if m["n"] >= min_size and m.get(metric) is not None}
    gap = best = worst = None
    if len(compared) >= 2:
        hi = HIGHER_IS_BETTER.get(metric, True)
        best = max(compared, key=compared.get) if hi else min(compared, key=compared.get)
        worst = min(compared, key=compared.get) if hi else max(compared, key=compared.get)
        gap = abs(compared[best] - compared[worst])
    return {"metric": metric, "groups": per, "gap": gap, "best": best, "worst": worst, "max_gap": max_gap,
            "flagged": bool(gap is not None and gap > max_gap)}
