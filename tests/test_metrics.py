"""AUC, GAUC and logloss (iat_torchrec.train.metrics) against slow pairwise references on random
data with many ties, the paired bootstrap over users against explicitly resampled data, and the
early-stopping / plateau schedule."""

import math

import numpy as np
import pytest

from iat_torchrec.train.loop import plateau_schedule
from iat_torchrec.train.metrics import (auc, bootstrap_gain, gauc, logloss, user_draws,
                                        weighted_auc)


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


def _tied_data(seed, n=300, num_users=15):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    users = rng.integers(0, num_users, n)
    users[:4], labels[:4] = 99, 0  # one user of one class only
    scores = np.round(rng.normal(size=(3, n)) + 0.5 * labels, 1)  # 3 "seeds", many ties
    return labels, users, scores


@pytest.mark.parametrize("seed", range(3))
def test_weighted_auc_equals_the_auc_of_the_replicated_rows(seed):
    labels, users, scores = _tied_data(seed)
    weights = np.random.default_rng(seed).integers(0, 4, size=(5, labels.size))
    got = weighted_auc(labels, scores[0], weights)
    for d in range(5):
        rep = np.repeat(np.arange(labels.size), weights[d])
        assert got[d] == pytest.approx(pairwise_auc(labels[rep], scores[0][rep]), abs=1e-12)


def test_bootstrap_gain_equals_resampling_users_explicitly():
    """Each draw's gain equals the gain recomputed on the explicitly resampled rows (users
    drawn with replacement, a user drawn twice counted as two users), with slow references."""
    labels, users, scores = _tied_data(7)
    measured, reference = scores, scores[::-1] + 0.05 * labels  # a better-informed reference
    draws = 40
    ids, counts = user_draws(users, draws, seed=3)
    gains = {"auc": [], "gauc": []}
    for d in range(draws):
        rows, new_users = [], []
        for j, u in enumerate(ids):
            for k in range(counts[d, j]):
                idx = np.flatnonzero(users == u)
                rows.append(idx)
                new_users.append(np.full(idx.size, 1000 * j + k))
        rows, new_users = np.concatenate(rows), np.concatenate(new_users)
        y = labels[rows]
        for name, metric in (("auc", lambda s: pairwise_auc(y, s)),
                             ("gauc", lambda s: loop_gauc(y, s, new_users))):
            m = np.mean([metric(s[rows]) for s in measured])
            r = np.mean([metric(s[rows]) for s in reference])
            gains[name].append(100 * (m - r) / r)
    got = bootstrap_gain(labels, users, measured, reference, draws=draws, seed=3)
    for name in ("auc", "gauc"):
        want = tuple(np.nanpercentile(gains[name], [2.5, 97.5]))
        assert got[name] == pytest.approx(want, abs=1e-9)


def test_a_gain_of_pure_noise_has_an_interval_around_zero():
    rng = np.random.default_rng(0)
    n = 3000
    labels, users = rng.integers(0, 2, n), rng.integers(0, 300, n)
    a, b = rng.normal(size=(1, n)), rng.normal(size=(1, n))
    low, high = bootstrap_gain(labels, users, a, b, draws=300)["auc"]
    assert low < 0 < high
    low, high = bootstrap_gain(labels, users, a + 2.0 * labels, a, draws=300)["auc"]
    assert low > 0
