"""Ranks read only their share: the row_groups partition of the temporal and shuffled orders
(each rank decodes its row groups, keys included, and plans in memory that scales with its
share) against the steps dealing (the default), equal step counts, a log stored out of time
order, and the user order over 2 and 3 ranks."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import List

import numpy as np
import pyarrow as pa
import pytest

from conftest import tiny_columns, tiny_spec
from iat_torchrec.data.batch import InstanceBatch
from iat_torchrec.data.log import write_log
from iat_torchrec.data.reader import (InstanceLogReader, Partition, ReaderConfig, ReadOrder,
                                      deal_row_groups, rank_row_count)

N, GROUP, BATCH = 10_000, 1_000, 128


def _table(time_ordered: bool) -> pa.Table:
    """The log's rows: stored in (ts, instance_id) order, or in a random order."""
    table = pa.table(tiny_columns(n=N, seed=2, users=60))
    keys = (table["instance_id"].to_numpy(), table["ts"].to_numpy())
    order = np.lexsort(keys) if time_ordered else np.random.default_rng(0).permutation(N)
    return table.take(pa.array(order))


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    # Files of 3,500 rows: row groups of 1,000, 1,000, 1,000 and 500 rows.
    return write_log(_table(True), tmp_path_factory.mktemp("log") / "log", tiny_spec(),
                     rows_per_file=3_500, row_group_size=GROUP)


@pytest.fixture(scope="module")
def unordered_log(tmp_path_factory) -> Path:
    return write_log(_table(False), tmp_path_factory.mktemp("log") / "log", tiny_spec(),
                     row_group_size=GROUP)


def _reader(path, order, rank, world_size, partition=Partition.ROW_GROUPS,
            **cfg) -> InstanceLogReader:
    config = ReaderConfig(batch_size=BATCH, order=ReadOrder(order), partition=partition, **cfg)
    return InstanceLogReader(path, config=config, rank=rank, world_size=world_size)


def _ids(batches: List[InstanceBatch]) -> np.ndarray:
    return np.concatenate([b.instance_id.numpy() for b in batches])


def test_deal_row_groups_covers_the_log_in_equal_shares():
    starts = np.arange(0, 10_001, 1_000)
    ranges = deal_row_groups(starts, 3)
    assert [r.tolist() for r in ranges] == [
        [[0, 1000], [3000, 4000], [6000, 7000], [9000, 9334]],
        [[1000, 2000], [4000, 5000], [7000, 8000], [9334, 9667]],
        [[2000, 3000], [5000, 6000], [8000, 9000], [9667, 10000]]]
    # Uneven groups, more ranks than groups, a log smaller than the ranks.
    for starts, world in [(np.r_[0, np.cumsum([700, 30, 1000, 999, 5, 1000, 400])], 4),
                          (np.array([0, 1000, 1100]), 5), (np.array([0, 3]), 4)]:
        ranges = deal_row_groups(starts, world)
        rows = np.concatenate([np.arange(s, e) for r in ranges for s, e in r])
        assert np.array_equal(np.sort(rows), np.arange(starts[-1]))
        assert [int((r[:, 1] - r[:, 0]).sum()) for r in ranges] == [
            rank_row_count(int(starts[-1]), 1, k, world, False) for k in range(world)]
        for r in ranges:  # at most two row groups shared with another rank
            partial = [(s, e) for s, e in r if s not in starts or e not in starts]
            assert len(partial) <= 2


@pytest.mark.parametrize("order", ["temporal", "shuffled"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_decodes_only_its_share(log_dir, order, world_size):
    readers = [_reader(log_dir, order, r, world_size) for r in range(world_size)]
    per_rank = [list(r) for r in readers]
    ids = np.concatenate([_ids(b) for b in per_rank])
    assert ids.size == N and np.unique(ids).size == N  # every row by exactly one rank
    assert len({len(b) for b in per_rank}) == 1  # the same number of batches
    for reader, batches in zip(readers, per_rank):
        share = reader.rank_rows
        assert sum(len(b) for b in batches) == share == reader.plan().size
        assert len(reader) == len(batches)
        assert share <= reader.rows_decoded <= share + 2 * GROUP
        assert reader.rows_decoded <= N / world_size + 0.2 * N  # far below the log
        # Keys: temporal checks the order of its own row groups' (streamed: the log is stored
        # in time order), shuffled needs none.
        assert reader.key_rows_decoded == (reader.rows_decoded if order == "temporal" else 0)
        assert order == "shuffled" or np.array_equal(reader.plan(), np.sort(reader.plan()))
    # The steps dealing decodes every row group on every rank, and (temporal) checks the order
    # of the whole log's keys.
    old = _reader(log_dir, order, 0, world_size, partition=Partition.STEPS)
    list(old)
    assert old.rows_decoded == N
    assert old.key_rows_decoded == (N if order == "temporal" else 0)


def test_ranks_move_through_time_together(log_dir):
    """Temporal: each rank streams its rows in time order (no reordering pass for a log
    stored in time order), and a step's batches lie within a few row groups of each other."""
    per_rank = [list(_reader(log_dir, "temporal", r, 2)) for r in range(2)]
    position = {int(i): k for k, i in enumerate(_table(True)["instance_id"].to_pylist())}
    for batches in per_rank:
        ts = np.concatenate([b.ts.numpy() for b in batches])
        assert (np.diff(ts) >= 0).all()
    for step in zip(*per_rank):
        centres = [np.mean([position[int(i)] for i in b.instance_id]) for b in step]
        assert max(centres) - min(centres) <= 2 * GROUP


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_log_stored_out_of_time_order(unordered_log, world_size):
    """Temporal over a log not stored in time order: each rank sorts its own rows (their keys
    read once more after the order check fails), every row still read once."""
    readers = [_reader(unordered_log, "temporal", r, world_size) for r in range(world_size)]
    ids = []
    for reader in readers:
        batches = list(reader)
        ts = np.concatenate([b.ts.numpy() for b in batches])
        assert (np.diff(ts) >= 0).all()
        ids.append(_ids(batches))
        assert reader.rows_decoded <= reader.rank_rows + 2 * GROUP
        assert reader.key_rows_decoded <= 2 * reader.rows_decoded
    ids = np.concatenate(ids)
    assert ids.size == N and np.unique(ids).size == N


def test_shuffled_epochs_permute_the_same_rows(log_dir):
    reader = _reader(log_dir, "shuffled", 1, 2, seed=7)
    first = _ids(list(reader))
    reader.set_epoch(1)
    second = _ids(list(reader))
    assert not np.array_equal(first, second)
    assert np.array_equal(np.sort(first), np.sort(second))
    assert reader.rows_decoded <= 2 * (first.size + 2 * GROUP)  # counted over both passes
    # Ranks draw independent permutations: rank 0 does not emit its k-th row when rank 1
    # emits its own k-th.
    local = [np.argsort(np.argsort(_reader(log_dir, "shuffled", r, 2, seed=7).plan()))
             for r in range(2)]
    assert np.mean(local[0] == local[1]) < 0.01


@pytest.mark.parametrize("world_size", [2, 3])
def test_drop_last_gives_equal_full_batches(log_dir, world_size):
    for order in ("temporal", "shuffled"):
        per_rank = [list(_reader(log_dir, order, r, world_size, drop_last=True))
                    for r in range(world_size)]
        assert {len(b) for b in per_rank} == {N // (world_size * BATCH)}
        assert all(len(b) == BATCH for batches in per_rank for b in batches)


@pytest.mark.parametrize("order", list(ReadOrder))
def test_one_process_reads_the_same_under_both_partitions(log_dir, order):
    for reverse in (False, True):
        got = [_ids(list(_reader(log_dir, order, 0, 1, p, reverse=reverse))) for p in Partition]
        assert np.array_equal(*got) and got[0].size == N


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_temporal_ranges_stream_what_the_plan_lists(log_dir, world_size):
    """Temporal order over a log stored in time order streams the rank's row ranges without a
    plan of rows; it emits exactly the plan's rows (reverse and drop_last included)."""
    by_row = _ids(list(_reader(log_dir, "temporal", 0, 1, Partition.STEPS)))  # stored order
    assert by_row.size == N
    for rank in range(world_size):
        for cfg in ({}, {"reverse": True}, {"drop_last": True}):
            reader = _reader(log_dir, "temporal", rank, world_size, **cfg)
            got = _ids(list(reader))
            assert reader._streams_ranges()
            assert np.array_equal(got, by_row[reader.plan()])
            assert got.size == reader.rank_rows


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_windowed_shuffle_reads_the_share_a_window_at_a_time(log_dir, world_size):
    """shuffle_window: each rank emits exactly its share (the rows the full permutation
    emits), in the order plan() lists, decoding each of its row groups once; epochs differ."""
    by_row = _ids(list(_reader(log_dir, "temporal", 0, 1, Partition.STEPS)))  # stored order
    sizes = set()
    for rank in range(world_size):
        full = _ids(list(_reader(log_dir, "shuffled", rank, world_size)))
        reader = _reader(log_dir, "shuffled", rank, world_size, shuffle_window=2)
        got = _ids(list(reader))
        assert np.array_equal(np.sort(got), np.sort(full)) and got.size == reader.rank_rows
        assert np.array_equal(got, by_row[reader.plan()])
        assert reader.rows_decoded <= reader.rank_rows + 2 * GROUP
        assert not np.array_equal(got, np.sort(got))  # shuffled
        reader.set_epoch(1)
        assert not np.array_equal(_ids(list(reader)), got)
        sizes.add(len(_reader(log_dir, "shuffled", rank, world_size, shuffle_window=2,
                              drop_last=True)))
    assert len(sizes) == 1
    with pytest.raises(ValueError, match="shuffle_window must be >= 0"):
        ReaderConfig(shuffle_window=-1)


def test_planning_memory_is_bounded_by_the_share(log_dir, unordered_log):
    """The NumPy arrays made while planning (tracemalloc's peak) scale with the rank's share
    under row_groups and in user order; under steps too for a log stored in time order, but not
    for one stored out of order (the whole log's keys, 24 bytes a row) nor shuffled (a
    permutation of the whole log, 8 bytes a row)."""
    share = rank_row_count(N, BATCH, 0, 3, False)

    def peak(path: Path, order: str, partition: Partition) -> int:
        reader = _reader(path, order, 0, 3, partition)
        tracemalloc.start()
        reader.plan()
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert abs(reader.rank_rows - share) < 0.2 * share  # user order: about the same
        return size

    for path in (log_dir, unordered_log):
        assert peak(path, "temporal", Partition.ROW_GROUPS) < 48 * share < 24 * N
        assert peak(path, "shuffled", Partition.ROW_GROUPS) < 32 * share
    assert peak(log_dir, "temporal", Partition.STEPS) < 32 * share
    assert peak(unordered_log, "temporal", Partition.STEPS) >= 24 * N
    assert peak(log_dir, "shuffled", Partition.STEPS) >= 8 * N
    assert peak(unordered_log, "user", Partition.STEPS) < 64 * share < 24 * N


@pytest.mark.parametrize("world_size", [2, 3])
def test_user_order_keeps_every_user_on_one_rank(log_dir, world_size):
    readers = [_reader(log_dir, "user", r, world_size) for r in range(world_size)]
    owner = {}
    rows = []
    for rank, reader in enumerate(readers):
        batches = list(reader)
        users = np.concatenate([b.user_id.numpy() for b in batches])
        rows.append(users.size)
        for u in np.unique(users):
            assert owner.setdefault(int(u), rank) == rank
        change = np.flatnonzero(users[1:] != users[:-1]) + 1
        assert len(change) + 1 == np.unique(users).size  # each user's rows together
        # Users are spread over the log: the user order decodes every row group, and reads
        # the user ids of the log twice (counting, then keeping this rank's keys).
        assert reader.rows_decoded == N and reader.key_rows_decoded == 2 * N
    assert sum(rows) == N and max(rows) - min(rows) < 0.2 * N / world_size


def test_unknown_partition_is_an_error(log_dir):
    with pytest.raises(ValueError, match="unknown partition 'pages'"):
        _reader(log_dir, "temporal", 0, 2, "pages")
