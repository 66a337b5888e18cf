"""The history ops against their slow references (iat_torchrec.history.reference) on random
data: materialisation (both methods), steps after, the last k steps (positions, steps, items),
item-history features; empty histories, k beyond the history, ties, unmatured labels."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iat_torchrec.history import (LABEL_PAD, LABEL_UNKNOWN, HistoryBatch, HistoryLayout,
                                  HistoryMaterializer, add_history_items, last_range_steps,
                                  last_step_items, last_steps, last_steps_index,
                                  materialize_history, steps_after)
from iat_torchrec.history import reference as ref

SEEDS = range(5)


def assert_same(a: HistoryBatch, b: HistoryBatch) -> None:
    for name, x, y in zip(("row_ids", "mask", "label", "gap_bucket", "length"),
                          a.tensors(), b.tensors()):
        assert x.dtype == y.dtype and torch.equal(x, y), name


def random_index(rng: np.random.Generator, n: int):
    """Time-index arrays with small timestamps, so that targets often tie with a step's maturity
    (ts + delay == t) or sit exactly on a gap boundary."""
    return SimpleNamespace(rows=rng.permutation(n).astype(np.int64),
                           ts=rng.integers(0, 40, n).astype(np.int64),
                           label=rng.integers(0, 2, n).astype(np.int8))


def random_ranges(rng: np.random.Generator, n: int, b: int, max_len: int):
    """``(begin, length)`` ranges inside the index: empty ones, ones shorter and longer than L,
    ones ending at the index's end."""
    length = rng.integers(0, 2 * max_len + 1, b)
    length[:3] = [0, max_len, 2 * max_len]
    begin = rng.integers(0, n - length + 1)
    begin[-1] = n - length[-1]
    return begin.astype(np.int64), length.astype(np.int64)


def random_mask(rng: np.random.Generator, b: int, length: int, left_aligned: bool) -> torch.Tensor:
    if left_aligned:
        lengths = rng.integers(0, length + 1, b)
        mask = np.arange(length)[None, :] < lengths[:, None]
    else:
        mask = rng.random((b, length)) < rng.random((b, 1))
    mask[0], mask[-1] = False, True  # an empty history and a full one
    return torch.from_numpy(mask)


def history_of(mask: torch.Tensor, rng: np.random.Generator, gap_pad: int) -> HistoryBatch:
    shape = tuple(mask.shape)
    return HistoryBatch(
        row_ids=torch.where(mask, torch.from_numpy(rng.integers(0, 1000, shape)), -1),
        mask=mask,
        label=torch.where(mask, torch.from_numpy(rng.integers(0, LABEL_PAD, shape)), LABEL_PAD),
        gap_bucket=torch.where(mask, torch.from_numpy(rng.integers(0, gap_pad, shape)), gap_pad),
        length=mask.sum(1))


# --------------------------------------------------------------------------- materialisation
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("delay, boundaries", [(0, (5, 10, 20)), (5, (5, 10, 20)), (7, ())])
def test_materialize_matches_reference(seed, delay, boundaries):
    rng = np.random.default_rng(seed)
    n, b = 300, 40
    layout = HistoryLayout(max_len=6, label_delay_s=delay, gap_boundaries_s=boundaries)
    index = random_index(rng, n)
    begin, length = random_ranges(rng, n, b, layout.max_len)
    t = rng.integers(0, 60, b).astype(np.int64)
    want = ref.materialize_history(begin, length, t, index.rows, index.ts, index.label, layout)
    assert (want.label == LABEL_UNKNOWN).any() and want.length.min() == 0
    args = [torch.from_numpy(a) for a in (begin, length, t, index.rows, index.ts, index.label)]
    bounds = torch.tensor(boundaries, dtype=torch.int64)
    for method in ("jagged", "dense"):
        assert_same(materialize_history(*args, bounds, layout, method=method), want)
        assert_same(HistoryMaterializer(index, layout)(*args[:3], method=method), want)


# --------------------------------------------------------------------------- last k steps
def test_steps_after_and_last_steps():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]],
                        dtype=torch.bool)
    assert steps_after(mask)[1].tolist() == [3, 2, 2, 1, 0]
    index, valid = last_steps_index(mask, 2)
    assert valid.tolist() == [[True, True], [True, True], [False, False], [True, True]]
    assert torch.where(valid, index, -1).tolist() == [[1, 2], [3, 4], [-1, -1], [3, 4]]
    index, valid = last_steps_index(mask, 7)
    assert torch.where(valid, index, -1)[1].tolist() == [1, 3, 4, -1, -1, -1, -1]
    rows = torch.where(mask, torch.arange(5) + 10 * torch.arange(4).unsqueeze(1), -1)
    hist = HistoryBatch(row_ids=rows, mask=mask, label=torch.where(mask, 1, LABEL_PAD),
                        gap_bucket=torch.where(mask, 4, 9), length=mask.sum(1))
    short = last_steps(hist, 2, gap_pad=9)
    assert short.row_ids.tolist() == [[1, 2], [13, 14], [-1, -1], [33, 34]]
    assert short.label.tolist()[2] == [LABEL_PAD] * 2 and short.gap_bucket.tolist()[2] == [9, 9]
    assert short.length.tolist() == [2, 2, 0, 2]
    assert last_steps(hist, 5, gap_pad=9) is hist


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("left_aligned", [True, False])
def test_last_steps_ops_match_reference(seed, left_aligned):
    rng = np.random.default_rng(seed)
    b, length, gap_pad = 30, 9, 7
    mask = random_mask(rng, b, length, left_aligned)
    assert torch.equal(steps_after(mask), ref.steps_after(mask))
    history = history_of(mask, rng, gap_pad)
    step_items = torch.from_numpy(rng.integers(0, 50, (b, length)))
    # k == L: last_steps returns the history itself, which is its last L steps when left-aligned.
    for k in (0, 1, 3, length - 1, length + 4) + ((length,) if left_aligned else ()):
        got, want = last_steps_index(mask, k), ref.last_steps_index(mask, k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), k
        assert_same(last_steps(history, k, gap_pad), ref.last_steps(history, k, gap_pad))
        assert torch.equal(last_step_items(step_items, mask, k),
                           ref.last_step_items(step_items, mask, k))


@pytest.mark.parametrize("seed", SEEDS)
def test_last_range_steps_pick_the_steps_of_the_materialised_history(seed):
    rng = np.random.default_rng(seed)
    b, max_len = 40, 6
    begin = rng.integers(0, 100, b)
    length = rng.integers(0, 10, b)  # some longer than max_len: their newest max_len count
    mask = torch.arange(max_len) < torch.from_numpy(np.minimum(length, max_len))[:, None]
    first = begin + np.maximum(length - max_len, 0)  # the materialised history's first position
    for k in (0, 1, 3, max_len, max_len + 3):
        pos, valid = last_range_steps(begin, length, max_len, k)
        index, want_valid = ref.last_steps_index(mask, k)
        assert np.array_equal(valid, want_valid.numpy()), k
        assert np.array_equal(pos[valid], (first[:, None] + index.numpy())[valid]), k


@pytest.mark.parametrize("seed", SEEDS)
def test_add_history_items_matches_reference(seed):
    rng = np.random.default_rng(seed)
    b, k = 6, 4
    lengths = torch.from_numpy(rng.integers(0, 3, 2 * b))
    sparse = KeyedJaggedTensor(keys=["f", "g"],
                               values=torch.from_numpy(rng.integers(0, 9, int(lengths.sum()))),
                               lengths=lengths)
    items = torch.from_numpy(rng.integers(-1, 20, (b, k)))
    items[0] = -1  # an empty item history
    got = {name: [x.tolist() for x in jt.to_dense()]
           for name, jt in add_history_items(sparse, items).to_dict().items()}
    base = {name: [x.tolist() for x in jt.to_dense()] for name, jt in sparse.to_dict().items()}
    assert got == ref.add_history_items(base, items)
