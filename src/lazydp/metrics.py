"""Evaluation metrics (no scikit-learn dependency)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties get half credit).

    >>> roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.0) -> float:
    """Fraction of correct predictions of logits ``scores`` (positive when > threshold); NaN
    when a score is NaN.

    >>> accuracy(np.array([-1.0, 2.0]), np.array([0, 1])), accuracy(np.array([np.nan]), [0])
    (1.0, nan)
    """
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        # A NaN logit predicts nothing; counted as "not > threshold", a diverged model scored
        # the share of negative labels.
        return float("nan")
    return float(((scores > threshold) == np.asarray(labels).astype(bool)).mean())
