"""Ranking metrics: AUC and logloss (torchmetrics), GAUC (per-user AUC weighted by impressions),
and the paired bootstrap over users that puts an interval on a gain of one model over another
evaluated on the same samples (:func:`bootstrap_gain`)."""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (torchmetrics)."""
    return float(binary_auroc(torch.from_numpy(np.asarray(scores, dtype=np.float64)),
                              torch.from_numpy(np.asarray(labels).astype(np.int64))))


def logloss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of logits."""
    return float(torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(np.asarray(logits, dtype=np.float64)),
        torch.from_numpy(np.asarray(labels, dtype=np.float64))))


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    """Per-user AUC weighted by the user's number of impressions; users whose impressions are
    all of one class are skipped."""
    _, per_user, count = per_user_auc(labels, scores, users)
    ok = count > 0
    if not ok.any():
        return float("nan")
    return float(np.average(per_user[ok], weights=count[ok]))


def per_user_auc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids [U] sorted, their AUC [U], their impressions [U], 0 for users whose
    impressions are all of one class, whose AUC is then NaN). Vectorised (Mann-Whitney with
    average ranks for ties)."""
    labels = np.asarray(labels).astype(np.float64)
    users = np.asarray(users)
    order = np.lexsort((scores, users))
    u, s, y = users[order], np.asarray(scores)[order], labels[order]
    n = u.size
    group_start = np.r_[True, u[1:] != u[:-1]]
    gid = np.cumsum(group_start) - 1
    starts = np.flatnonzero(group_start)
    # Average rank of each score within its user (ties share the mean of their positions).
    tie_start = np.r_[True, (u[1:] != u[:-1]) | (s[1:] != s[:-1])]
    tid = np.cumsum(tie_start) - 1
    pos = np.arange(n) - starts[gid] + 1.0
    tie_sum = np.bincount(tid, weights=pos)
    tie_cnt = np.bincount(tid)
    rank = (tie_sum / tie_cnt)[tid]
    n_pos = np.bincount(gid, weights=y)
    n_all = np.bincount(gid).astype(np.float64)
    n_neg = n_all - n_pos
    rank_pos = np.bincount(gid, weights=rank * y)
    ok = (n_pos > 0) & (n_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_user = (rank_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return u[starts], np.where(ok, per_user, np.nan), np.where(ok, n_all, 0.0)


def user_draws(users: np.ndarray, draws: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Bootstrap resamples of the users: (user ids [U] sorted, how often each is drawn in each
    resample [draws, U]; each resample draws U users with replacement)."""
    ids = np.unique(users)
    rng = np.random.default_rng(seed)
    return ids, rng.multinomial(ids.size, np.full(ids.size, 1.0 / ids.size), size=draws)


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of samples counted ``weights`` [D, n] times (D weightings of the same n samples, e.g.
    bootstrap multiplicities) -> [D]; ties count half, as in :func:`auc`."""
    y = np.asarray(labels).astype(np.float64)
    order = np.argsort(scores, kind="stable")
    s, y, w = np.asarray(scores)[order], y[order], np.asarray(weights, np.float64)[:, order]
    tie = np.r_[True, s[1:] != s[:-1]]
    gid = np.cumsum(tie) - 1
    starts = np.flatnonzero(tie)
    neg = np.add.reduceat(w * (1.0 - y), starts, axis=1)  # [D, G] negative weight per tie
    below = np.cumsum(neg, axis=1) - neg
    pos_w = w * y
    num = (pos_w * (below[:, gid] + 0.5 * neg[:, gid])).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / (pos_w.sum(1) * neg.sum(1))


def bootstrap_gain(labels: np.ndarray, users: np.ndarray, measured: np.ndarray,
                   reference: np.ndarray, draws: int = 1000, seed: int = 0,
                   level: float = 0.95) -> Dict[str, Tuple[float, float]]:
    """A paired bootstrap over users of the relative AUC and GAUC gain (%) of ``measured``
    over ``reference``: scores [S, n] of S seeds on the same n samples (labels, users [n]).
    Each resample draws users with replacement and scores both models on the same draw; the
    gain of a draw is that of the seed-mean metrics. Returns metric -> (low, high), the
    central ``level`` interval of the draws' gains."""
    ids, counts = user_draws(users, draws, seed)
    weights = counts[:, np.searchsorted(ids, users)]  # [D, n]

    def aucs(scores: np.ndarray) -> np.ndarray:  # [D], mean over seeds
        return np.mean([weighted_auc(labels, s, weights) for s in scores], axis=0)

    def gaucs(scores: np.ndarray) -> np.ndarray:
        out = []
        for s in scores:
            uid, per_user, n = per_user_auc(labels, s, users)
            w = counts[:, np.searchsorted(ids, uid)] * n  # [D, U]
            out.append((w * np.nan_to_num(per_user)).sum(1) / w.sum(1))
        return np.mean(out, axis=0)

    tail = 100 * (1 - level) / 2
    result = {}
    for name, metric in (("auc", aucs), ("gauc", gaucs)):
        ref = metric(reference)
        gain = 100.0 * (metric(measured) - ref) / ref
        low, high = np.nanpercentile(gain, [tail, 100 - tail])
        result[name] = (float(low), float(high))
    return result


def ranking_metrics(labels: np.ndarray, logits: np.ndarray,
                    users: np.ndarray) -> Dict[str, float]:
    """AUC, GAUC and logloss of one label."""
    return {"auc": auc(labels, logits), "gauc": gauc(labels, logits, users),
            "logloss": logloss(labels, logits), "count": int(labels.size)}
