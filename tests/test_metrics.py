"""AUC, GAUC and logloss (iat_torchrec.train.metrics) against slow pairwise references on random
data with many ties, and the early-stopping / plateau schedule."""

import math

import numpy as np
import pytest

from iat_torchrec.train.loop import plateau_schedule
from iat_torchrec.train.metrics import auc, gauc, logloss


def pairwise_auc(labels, scores):
    """P(score of a positive > score of a negative), ties counted one half: every pair."""
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def loop_gauc(labels, scores, users):
    """Per-user pairwise AUC weighted by the user's impressions; one-class users skipped."""
    total, weight = 0.0, 0
    for u in sorted(set(users.tolist())):
        idx = users == u
        y = labels[idx]
        if y.min() == y.max():
            continue
        total += pairwise_auc(y, scores[idx]) * idx.sum()
        weight += idx.sum()
    return total / weight


def loop_logloss(labels, logits):
    p = [1.0 / (1.0 + math.exp(-z)) for z in logits]
    return -sum(y * math.log(q) + (1 - y) * math.log(1 - q) for y, q in zip(labels, p)) / len(p)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_slow_references_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 400
    labels = rng.integers(0, 2, n)
    # Scores on a coarse grid: many ties, within and across users.
    scores = np.round(rng.normal(size=n) + 0.5 * labels, 1)
    users = rng.integers(0, 12, n)
    # One user of one class only (skipped by GAUC).
    users[:5], labels[:5] = 99, 1
    # torchmetrics returns AUC as float32.
    assert auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-6)
    assert gauc(labels, scores, users) == pytest.approx(loop_gauc(labels, scores, users),
                                                        abs=1e-12)
    assert logloss(labels, scores) == pytest.approx(loop_logloss(labels, scores), abs=1e-12)


def test_gauc_all_users_one_class_is_nan():
    labels = np.array([1, 1, 0, 0])
    users = np.array([1, 1, 2, 2])
    assert math.isnan(gauc(labels, np.array([0.1, 0.2, 0.3, 0.4]), users))


def test_plateau_schedule():
    # Improving: full learning rate, never stop.
    assert plateau_schedule([], 2, 0.1) == 1.0
    assert plateau_schedule([0.70, 0.72], 2, 0.1) == 1.0
    # One epoch without improvement: x0.1; an improvement after it keeps the decay.
    assert plateau_schedule([0.70, 0.72, 0.71], 2, 0.1) == pytest.approx(0.1)
    assert plateau_schedule([0.70, 0.69, 0.73], 2, 0.1) == pytest.approx(0.1)
    # Two in a row without a better AUC (equal is not better): stop.
    assert plateau_schedule([0.70, 0.69, 0.70], 2, 0.1) is None
    # Patience 0 never stops; factor 1 keeps the rate.
    assert plateau_schedule([0.7, 0.6, 0.5, 0.4], 0, 1.0) == 1.0
    assert plateau_schedule([0.7, 0.6, 0.5], 0, 0.5) == pytest.approx(0.25)
