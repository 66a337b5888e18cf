"""Ranking metrics: AUC and logloss (torchmetrics), GAUC (per-user AUC weighted by impressions)."""

from __future__ import annotations

from typing import Dict

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
    all of one class are skipped. Vectorised (Mann-Whitney with average ranks for ties)."""
    labels = np.asarray(labels).astype(np.float64)
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
    if not ok.any():
        return float("nan")
    per_user = (rank_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return float(np.average(per_user, weights=n_all[ok]))


def ranking_metrics(labels: np.ndarray, logits: np.ndarray,
                    users: np.ndarray) -> Dict[str, float]:
    """AUC, GAUC and logloss of one label."""
    return {"auc": auc(labels, logits), "gauc": gauc(labels, logits, users),
            "logloss": logloss(labels, logits), "count": int(labels.size)}
