"""Baselines in the same report: TF-IDF + logistic regression (scikit-learn) for classifiers,
an interpolated n-gram model on the model's own tokens for causal LMs."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np


def tfidf_logreg(train_texts: list[str], train_y: list[int], test_texts: list[str], num_labels: int) -> np.ndarray:
    """(N, C) probabilities of TF-IDF (word 1-2 grams) + logistic regression fit on the train split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2, max_features=200_000)
    clf = LogisticRegression(max_iter=2000, class_weight="balanced")
    clf.fit(vec.fit_transform(train_texts), train_y)
    probs = np.zeros((len(test_texts), num_labels))
    probs[:, clf.classes_] = clf.predict_proba(vec.transform(test_texts))
    return probs


class NGram:
    """Interpolated n-gram LM (Jelinek-Mercer): P(w | h) = sum_k lambda_k P_k(w | last k-1
    tokens), with an add-one unigram at the bottom so every token has mass. Lambdas grow with
    the order and are renormalized over the orders whose context was seen."""

    def __init__(self, order: int, vocab_size: int):
        self.order, self.vocab = order, vocab_size
        self.counts: list[Counter] = [Counter() for _ in range(order)]   # k-gram counts, k = 1..order
        self.context: list[Counter] = [Counter() for _ in range(order)]  # (k-1)-gram context counts
        self.lambdas = [2.0 ** k for k in range(order)]

    def fit(self, docs: list[list[int]]) -> "NGram":
        for ids in docs:
            for i in range(len(ids)):
                for k in range(1, self.order + 1):
                    if i - k + 1 < 0:
                        break
                    gram = tuple(ids[i - k + 1:i + 1])
                    self.counts[k - 1][gram] += 1
                    self.context[k - 1][gram[:-1]] += 1
        self.total = sum(self.counts[0].values())
        return self

    def logprob(self, history: tuple[int, ...], w: int) -> float:
        p_uni = (self.counts[0][(w,)] + 1) / (self.total + self.vocab)
        num, den = self.lambdas[0] * p_uni, self.lambdas[0]
        for k in range(2, self.order + 1):
            if len(history) < k - 1:
                break
            ctx = history[len(history) - k + 1:]
            c = self.context[k - 1][ctx]
            if c:
                num += self.lambdas[k - 1] * self.counts[k - 1][ctx + (w,)] / c
                den += self.lambdas[k - 1]
        return math.log(num / den)

    def score(self, ids: list[int], window: int) -> tuple[float, int]:
        """(nats, predicted tokens) over the same windows the model is scored on: the first
        token of each window is context only."""
        nll, n = 0.0, 0
        for start in range(0, len(ids), window):
            w = ids[start:start + window]
            for i in range(1, len(w)):
                nll -= self.logprob(tuple(w[max(0, i - self.order + 1):i]), w[i])
                n += 1
        return nll, n


def ngram_lm(order: int, vocab_size: int, train_docs: list[list[int]], test_docs: list[list[int]],
             window: int) -> dict[str, Any]:
    model = NGram(order, vocab_size).fit(train_docs)
    scored = [model.score(ids, window) for ids in test_docs]
    return {"nll": np.array([s[0] for s in scored]), "tokens": np.array([s[1] for s in scored])}
