"""Slow, obviously correct references of the history ops (:mod:`iat_torchrec.history.ops`,
:func:`~iat_torchrec.history.downstream.add_history_items`): plain Python loops over samples
and steps, for tests to check the fast ops against."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from iat_torchrec.history.batch import LABEL_PAD, LABEL_UNKNOWN, HistoryBatch, HistoryLayout


def materialize_history(begin: Sequence[int], length: Sequence[int], t: Sequence[int],
                        rows: Sequence[int], ts: Sequence[int], label: Sequence[int],
                        layout: HistoryLayout) -> HistoryBatch:
    """The history of sample i is positions ``begin[i] .. begin[i] + length[i] - 1`` of the
    index, of which the newest ``max_len`` are kept, oldest first, padded at the end."""
    L = layout.max_len
    out: Dict[str, List[list]] = {"row_ids": [], "mask": [], "label": [], "gap_bucket": []}
    lengths = []
    for b, n, target in zip(list(begin), list(length), list(t)):
        b, n, target = int(b), int(n), int(target)
        keep = min(n, L)
        steps = list(range(b + n - keep, b + n))
        row_ids, mask, labels, gaps = [], [], [], []
        for p in steps:
            row_ids.append(int(rows[p]))
            mask.append(True)
            known = int(ts[p]) + layout.label_delay_s <= target
            labels.append(int(label[p]) if known else LABEL_UNKNOWN)
            gap = target - int(ts[p])
            gaps.append(sum(1 for boundary in layout.gap_boundaries_s if boundary <= gap))
        pad = L - keep
        out["row_ids"].append(row_ids + [-1] * pad)
        out["mask"].append(mask + [False] * pad)
        out["label"].append(labels + [LABEL_PAD] * pad)
        out["gap_bucket"].append(gaps + [layout.gap_pad] * pad)
        lengths.append(keep)
    B = len(lengths)
    as_tensor = {k: torch.tensor(v, dtype=torch.bool if k == "mask" else torch.int64)
                 .view(B, L) for k, v in out.items()}
    return HistoryBatch(**as_tensor, length=torch.tensor(lengths, dtype=torch.int64))


def steps_after(mask: torch.Tensor) -> torch.Tensor:
    """For each step, the number of real steps after it in its row."""
    after = [[sum(row[j + 1:]) for j in range(len(row))] for row in mask.tolist()]
    return torch.tensor(after, dtype=torch.int64).view(mask.shape)


def last_steps_index(mask: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The positions of each row's real steps, the last ``k`` of them, oldest first, padded
    with index 0 / valid False."""
    index, valid = [], []
    for row in mask.tolist():
        real = [j for j, m in enumerate(row) if m]
        last = real[len(real) - min(k, len(real)):]
        index.append(last + [0] * (k - len(last)))
        valid.append([True] * len(last) + [False] * (k - len(last)))
    B = mask.shape[0]
    return (torch.tensor(index, dtype=torch.int64).view(B, k),
            torch.tensor(valid, dtype=torch.bool).view(B, k))


def last_steps(history: HistoryBatch, k: int, gap_pad: int) -> HistoryBatch:
    """Each row's last ``k`` real steps (row id, label, gap bucket), oldest first, padded at
    the end with -1, :data:`LABEL_PAD` and ``gap_pad``."""
    index, valid = last_steps_index(history.mask, k)
    take = {"row_ids": -1, "label": LABEL_PAD, "gap_bucket": gap_pad}
    out = {}
    for name, pad in take.items():
        values = getattr(history, name).tolist()
        out[name] = torch.tensor(
            [[values[i][j] if v else pad for j, v in zip(index[i].tolist(), valid[i].tolist())]
             for i in range(len(values))], dtype=torch.int64).view(index.shape)
    return HistoryBatch(row_ids=out["row_ids"], mask=valid, label=out["label"],
                        gap_bucket=out["gap_bucket"], length=valid.sum(1))


def last_step_items(step_items: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """The items of each row's last ``k`` real steps, oldest first, -1 after them."""
    out = []
    for items, row in zip(step_items.tolist(), mask.tolist()):
        real = [int(items[j]) for j, m in enumerate(row) if m]
        last = real[len(real) - min(k, len(real)):]
        out.append(last + [-1] * (k - len(last)))
    return torch.tensor(out, dtype=torch.int64).view(step_items.shape[0], k)


def add_history_items(features: Dict[str, List[List[int]]], item_ids: torch.Tensor
                      ) -> Dict[str, List[List[int]]]:
    """``features`` (name -> per-row id lists) plus ``hist_item_j`` for each step j of
    ``item_ids`` [B, k]: row i holds ``[item_ids[i, j]]``, or nothing where it is -1."""
    out = dict(features)
    rows = item_ids.tolist()
    for j in range(item_ids.shape[1]):
        out[f"hist_item_{j}"] = [[row[j]] if row[j] >= 0 else [] for row in rows]
    return out
