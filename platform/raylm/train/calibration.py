"""Temperature scaling (Guo et al., 2017): one number T fitted on the validation split after
training, by the negative log-likelihood of the classifier's answers with its logits divided by
T. T > 1 softens an overconfident model, T < 1 sharpens an underconfident one; the predicted class
of a text read in one piece does not change. The export divides the classification head's weight
and bias by T, so the saved model answers calibrated wherever it is loaded (transformers,
evaluation, serving, ensembles), with no extra step at inference.

A text read in windows (`model.long_texts: windows`) is scored as the serving engine scores it:
each window's softmax(logits / T), averaged with the windows' tokens as weights.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

T_RANGE = (0.05, 20.0)


def pooled_probs(logits: np.ndarray, rows: Optional[np.ndarray], tokens: Optional[np.ndarray], n: int,
                 temperature: float) -> np.ndarray:
    """(n, C) class probabilities of n texts from their windows' logits (one window a text when
    `rows` is None): each window's softmax(logits / T), pooled as serving pools them."""
    from raylm.serve.engine import pool_windows

    p = torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)) / temperature, -1)
    if rows is not None:
        p = pool_windows(p, torch.from_numpy(np.asarray(rows, dtype=np.int64)), torch.from_numpy(np.asarray(tokens)), n)
    return p.numpy()


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, rows: Optional[np.ndarray] = None,
                    tokens: Optional[np.ndarray] = None) -> dict[str, Any]:
    """The T in `T_RANGE` that minimizes the validation NLL, and the NLL, ECE and accuracy before
    (T = 1) and after."""
    from scipy.optimize import minimize_scalar

    from raylm.evaluate.metrics import calibration

    n = len(labels)

    def figures(t: float) -> dict[str, float]:
        p = pooled_probs(logits, rows, tokens, n, t)
        pred = p.argmax(-1)
        return {"nll": nll(p, labels), "ece": calibration(p.max(-1), (pred == labels).astype(float))["ece"],
                "accuracy": float((pred == labels).mean())}

    lo, hi = (math.log(x) for x in T_RANGE)
    best = minimize_scalar(lambda s: nll(pooled_probs(logits, rows, tokens, n, math.exp(s)), labels),
                           bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    t = float(math.exp(best.x))
    before, after = figures(1.0), figures(t)
    if after["nll"] > before["nll"]:  # the search's bounds or tolerance: never worse than leaving it be
        t, after = 1.0, before
    return {"method": "temperature", "temperature": t, "texts": n,
            **{f"val_{k}": [before[k], after[k]] for k in ("nll", "ece", "accuracy")}}


def gather(kept: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """One rank's kept validation outputs (per batch: window `logits`, and for texts read in
    windows `window_row` / `window_tokens`, and the texts' `labels`) joined with every other
    rank's (a collective when distributed), rows renumbered across batches and ranks."""
    import torch.distributed as dist

    mine = [{k: v.cpu().numpy() for k, v in b.items()} for b in kept]
    parts = [mine]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    logits, labels, rows, tokens, offset = [], [], [], [], 0
    for b in (b for part in parts for b in part):
        logits.append(b["logits"])
        labels.append(b["labels"])
        if "window_row" in b:
            rows.append(b["window_row"] + offset)
            tokens.append(b["window_tokens"])
        offset += len(b["labels"])
    out = {"logits": np.concatenate(logits).astype(np.float64), "labels": np.concatenate(labels).astype(np.int64)}
    if rows:
        out["rows"], out["tokens"] = np.concatenate(rows), np.concatenate(tokens)
    return out


def classifier_head(model: torch.nn.Module, num_labels: int) -> torch.nn.Linear:
    """The layer that gives a sequence classifier its logits: its last linear layer with one
    output per label (`classifier` in BERT, `classifier.out_proj` in RoBERTa, `score` in GPT-2 and
    Llama)."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not heads:
        raise RuntimeError(f"calibration: no linear layer with {num_labels} outputs (the classification head)")
    return heads[-1]


@torch.no_grad()
def scale_head(model: torch.nn.Module, num_labels: int, temperature: float) -> None:
    """Divide the classification head's weight and bias by T: the model's logits become logits / T."""
    head = classifier_head(model, num_labels)
    head.weight.div_(temperature)
    if head.bias is not None:
        head.bias.div_(temperature)
