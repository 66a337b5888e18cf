"""Stream an instance log into TorchRec batches, in one of three orders, one partition per rank.

Orders (:class:`ReadOrder`):

- ``temporal``: time order, by (ts, instance_id).
- ``user``: each user's instances together and in time order; users are ordered by their first
  instance, and a user's history is never split across ranks (users are dealt to ranks so that
  instance counts balance).
- ``shuffled``: a seeded uniform permutation (``set_epoch`` changes it per epoch).

Partitions of the ``temporal`` and ``shuffled`` orders over ranks (:class:`Partition`):

- ``steps`` (default): global steps of ``world_size * batch_size`` rows of the one global order
  are dealt to ranks batch by batch, so a step's batches are consecutive in that order
  (interleaving the ranks' batches restores it) and W processes with batch B take the steps of
  one process with batch W * B: training does not depend on the process count. The price: every
  rank decodes every row group (temporal: the keys of the whole log too, to check their order).
- ``row_groups``: whole Parquet row groups are dealt to ranks in file order, each to the rank
  with the fewest rows so far; the last rows (under one row group per rank) are cut into one
  contiguous range per rank (:func:`deal_row_groups`). A rank decodes only its row groups, keys
  included: at most two row groups more than its share. Each rank emits its own rows in the
  order, so ranks stay within about ``world_size`` row groups of each other in the log (in time,
  for a log stored in time order), and a synchronous step's batches come from neighbouring row
  groups, not from one slice of the global order; shuffled, each rank permutes its own rows.
  Steps then differ from a one-process run's (same rows, other batches).

Both give every rank ``N // world_size`` rows, the first ``N % world_size`` ranks one more
(``drop_last``: ``(N // (world_size * batch_size)) * batch_size`` rows each, full batches only),
so batch counts differ by at most one, in the final step (the training loop pads it). One
process reads the same rows in the same order under both. Every row is read by exactly one rank.

Temporal order first checks, from the keys read one row group at a time and not held, whether
the rows are stored in (ts, instance_id) order (a log written in time order, the normal case):
then the plan is made without keys and the row groups are streamed directly. Otherwise the rows
are sorted by their keys (row_groups: the rank's; steps: the whole log's). A plan that does not
follow the stored order (shuffled, user, newest first, a log stored out of time order) takes one
pass that scatters the rank's rows into temporary Arrow files of one chunk each (an external
shuffle, ``tmp_dir``), read back chunk by chunk.

Memory: a plan of 8 bytes per row of the rank, plus at most one chunk of ``chunk_rows`` rows,
plus while planning about 8-16 bytes per row of the rank, and: ``row_groups`` over a log stored
out of time order, 16 per row of the rank (its keys); user order, about 40 per row of the rank
and 32 per user of the log; ``steps``, the keys of the whole log (temporal over a log stored out
of time order, 24 bytes a row) or a permutation of it (shuffled, 8 bytes a row).
``rows_decoded`` and ``key_rows_decoded`` count the rows of the row groups decoded for batches
and for planning.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iat_torchrec.data.batch import InstanceBatch
from iat_torchrec.data.log import (InstanceLogError, log_files, open_parquet, read_key_columns,
                                   row_groups)
from iat_torchrec.data.spec import INSTANCE_ID, KEY_COLUMNS, TS, USER_ID, FeatureSpec

PathLike = Union[str, os.PathLike]

_POS = "__pos"


class ReadOrder(str, enum.Enum):
    TEMPORAL = "temporal"
    USER = "user"
    SHUFFLED = "shuffled"


class Partition(str, enum.Enum):
    """How the temporal and shuffled orders are split over ranks (the module docstring)."""

    STEPS = "steps"
    ROW_GROUPS = "row_groups"


@dataclasses.dataclass
class ReaderConfig:
    """How a log is read into batches."""

    batch_size: int = dataclasses.field(default=8192, metadata={"help": "rows per batch"})
    order: ReadOrder = dataclasses.field(
        default=ReadOrder.TEMPORAL, metadata={"help": "temporal | user | shuffled"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the shuffled order"})
    drop_last: bool = dataclasses.field(
        default=False, metadata={"help": "drop the final, partial global step"})
    chunk_rows: int = dataclasses.field(
        default=524_288, metadata={"help": "rows held in memory at once (bounds memory)"})
    reverse: bool = dataclasses.field(default=False, metadata={
        "help": "user order: users in reverse order (each user's rows stay in time order); "
                "temporal: newest first"})
    partition: Partition = dataclasses.field(default=Partition.STEPS, metadata={
        "help": "temporal / shuffled over ranks: steps (global steps dealt batch by batch: "
                "independent of the process count, every rank decodes every row group) | "
                "row_groups (each rank decodes and plans from only its row groups)"})
    shuffle_window: int = dataclasses.field(default=0, metadata={
        "help": "shuffled order under row_groups: 0: one permutation of the rank's rows (held, "
                "8 bytes a row, and scattered through temporary files); k > 0: the rank's row "
                "group pieces in a random order, rows shuffled within windows of k pieces "
                "(memory flat in the log and the share; rows mix only within a window)"})

    def __post_init__(self) -> None:
        if self.shuffle_window < 0:
            raise ValueError(f"shuffle_window must be >= 0, got {self.shuffle_window}")


def hash_ids(ids: np.ndarray, num_buckets: int) -> np.ndarray:
    """Map raw int64 ids into ``[0, num_buckets)`` with a 64-bit mix (splitmix64 finaliser),
    so that structured raw ids (sequential, strided) spread evenly over the buckets."""
    x = ids.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(num_buckets)).astype(np.int64)


def dealt_positions(num_rows: int, batch_size: int, rank: int, world_size: int,
                    drop_last: bool) -> np.ndarray:
    """The positions in a global order of ``num_rows`` rows that rank ``rank`` takes when global
    steps of ``world_size * batch_size`` rows are dealt to ranks batch by batch; the last partial
    step is split evenly (or dropped). Made without the global order (memory: the rank's rows).

    Example: 10 rows, batch 2, 2 ranks: rank 0 [0, 1, 4, 5, 8], rank 1 [2, 3, 6, 7, 9].
    """
    step = batch_size * world_size
    steps = num_rows // step
    mine = (np.arange(steps, dtype=np.int64)[:, None] * step + rank * batch_size
            + np.arange(batch_size, dtype=np.int64)).reshape(-1)
    tail = num_rows - steps * step
    if drop_last or tail == 0:
        return mine
    sizes = tail // world_size + (np.arange(world_size) < tail % world_size)
    start = steps * step + int(sizes[:rank].sum())
    return np.concatenate([mine, np.arange(start, start + sizes[rank], dtype=np.int64)])


def rank_row_count(num_rows: int, batch_size: int, rank: int, world_size: int,
                   drop_last: bool) -> int:
    """Rows rank ``rank`` reads in the temporal and shuffled orders (either partition):
    ``N // W``, the first ``N % W`` ranks one more; ``drop_last``: ``(N // (W * B)) * B``.

    Example: N = 1000, W = 3, B = 64 -> 334, 333, 333 (drop_last: 320 each).
    """
    if drop_last:
        return num_rows // (world_size * batch_size) * batch_size
    return num_rows // world_size + int(rank < num_rows % world_size)


def deal_row_groups(group_starts: np.ndarray, world_size: int) -> List[np.ndarray]:
    """Each rank's rows as ``[start, end)`` ranges of row numbers (``[k, 2]`` int64, file
    order), given where each row group starts (then the total). Whole row groups go, in file
    order, to the rank with the fewest rows so far (ties: the lowest rank) while they fit its
    count (:func:`rank_row_count`); the rest, under one row group per rank, is cut into one
    contiguous range per rank.

    Example: 10 groups of 1,000 rows, 3 ranks: rank 0 gets groups 0, 3, 6 and [9000, 9334),
    rank 1 groups 1, 4, 7 and [9334, 9667), rank 2 groups 2, 5, 8 and [9667, 10000).
    """
    total = int(group_starts[-1])
    want = [rank_row_count(total, 1, r, world_size, False) for r in range(world_size)]
    held = [0] * world_size
    ranges: List[List[Tuple[int, int]]] = [[] for _ in range(world_size)]
    fewest = [(0, r) for r in range(world_size)]  # a heap of (rows so far, rank)
    gi = 0
    while gi + 1 < group_starts.size:
        start, end = int(group_starts[gi]), int(group_starts[gi + 1])
        load, r = fewest[0]
        if load + end - start > want[r]:
            break
        if end > start:
            ranges[r].append((start, end))
            held[r] += end - start
            heapq.heapreplace(fewest, (held[r], r))
        gi += 1
    start = int(group_starts[gi])
    for r in range(world_size):
        end = start + want[r] - held[r]
        if end > start:
            ranges[r].append((start, end))
        start = end
    return [np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in ranges]


def _rows_of(ranges: np.ndarray) -> np.ndarray:
    """The row numbers of ``[k, 2]`` ``[start, end)`` ranges, in order."""
    return np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in ranges]
                          or [np.empty(0, dtype=np.int64)])


def _snake_owners(counts: np.ndarray, world_size: int) -> np.ndarray:
    """The rank of each user (``counts``: rows per user): users by decreasing count dealt
    0, 1, .., W-1, W-1, .., 0, 0, 1, .. so that the ranks' row counts balance."""
    by_size = np.argsort(-counts, kind="stable")
    lane = np.arange(by_size.size) % (2 * world_size)
    owner = np.empty_like(by_size)
    owner[by_size] = np.where(lane < world_size, lane, 2 * world_size - 1 - lane)
    return owner


def _user_order(keys: Dict[str, np.ndarray], reverse: bool) -> np.ndarray:
    """The rows ``keys["rows"]`` (with their key columns in ``keys``) in user order: users by
    the time of their first instance (then user id; reversed with ``reverse``), each user's rows
    by (ts, instance_id). ``keys`` is emptied on the way, each array freed once used."""
    order = np.lexsort((keys.pop(INSTANCE_ID), keys[TS], keys[USER_ID]))
    users_sorted = keys.pop(USER_ID)[order]
    starts = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1]])
    first_ts = keys.pop(TS)[order[starts]]
    by_first = np.lexsort((users_sorted[starts], first_ts))
    del users_sorted
    if reverse:
        by_first = by_first[::-1]
    seg_starts, seg_lens = starts[by_first], np.diff(np.r_[starts, order.size])[by_first]
    # Concatenate the users' row ranges without a Python loop.
    index = np.repeat(seg_starts - np.r_[0, np.cumsum(seg_lens)[:-1]], seg_lens)
    index += np.arange(order.size)
    order = order[index]
    del index
    return keys.pop("rows")[order]


def _merge_counts(users: np.ndarray, counts: np.ndarray, more: List[Tuple[np.ndarray, np.ndarray]]
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """``(users, counts)`` (sorted unique ids, rows of each) with ``more`` such pairs added."""
    ids, inverse = np.unique(np.concatenate([users, *(u for u, _ in more)]), return_inverse=True)
    summed = np.zeros(ids.size, dtype=np.int64)
    np.add.at(summed, inverse, np.concatenate([counts, *(c for _, c in more)]))
    return ids, summed


class _TableColumns:
    """Zero-copy NumPy views of one Arrow table's columns (hashed ids mapped to buckets)."""

    def __init__(self, table: pa.Table, spec: FeatureSpec) -> None:
        self.num_rows = table.num_rows
        self.dense = [_values(table[f.name]) for f in spec.dense]
        self.labels = [_values(table[name]) for name in spec.labels]
        self.keys = [_values(table[c]) for c in KEY_COLUMNS]
        # Per sparse field: (values, offsets); offsets is None when there is one id per row.
        self.sparse: List[Tuple[np.ndarray, Optional[np.ndarray]]] = []
        for f in spec.sparse:
            col = table[f.name]
            col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
            if f.multi_valued:
                if col.null_count:
                    lengths = pc.list_value_length(col).fill_null(0).to_numpy()
                    offsets = np.r_[0, np.cumsum(lengths)]
                    values = col.flatten().to_numpy()
                else:
                    raw = col.offsets.to_numpy()
                    values = col.values.to_numpy()[raw[0]:raw[-1]]
                    offsets = raw - raw[0]
            elif col.null_count:
                offsets = np.r_[0, np.cumsum(col.is_valid().to_numpy(zero_copy_only=False))]
                values = col.drop_null().to_numpy()
            else:
                offsets, values = None, col.to_numpy()
            if f.hashed:
                values = hash_ids(values, f.num_embeddings)
            self.sparse.append((values, offsets))


def _values(col: pa.ChunkedArray) -> np.ndarray:
    return (col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()).to_numpy()


def _fill_columns(out: np.ndarray, pieces, field: str, index: int) -> None:
    """Copy column ``index`` of attribute ``field`` of each piece into the columns of ``out``."""
    pos = 0
    for cols, s, e in pieces:
        out[pos:pos + e - s, index] = getattr(cols, field)[index][s:e]
        pos += e - s


class _BatchAssembler:
    """Cuts a stream of Arrow tables (rows in emission order) into :class:`InstanceBatch`
    objects of ``batch_size`` rows, copying each value once, straight into the batch."""

    def __init__(self, spec: FeatureSpec, batch_size: int) -> None:
        self.spec = spec
        self.batch_size = batch_size

    def __call__(self, tables: Iterator[pa.Table]) -> Iterator[InstanceBatch]:
        pieces: List[Tuple[_TableColumns, int, int]] = []
        have = 0
        for table in tables:
            if table.num_rows == 0:
                continue
            cols, start = _TableColumns(table, self.spec), 0
            while start < cols.num_rows:
                take = min(self.batch_size - have, cols.num_rows - start)
                pieces.append((cols, start, start + take))
                have, start = have + take, start + take
                if have == self.batch_size:
                    yield self._batch(pieces, have)
                    pieces, have = [], 0
        if have:
            yield self._batch(pieces, have)

    def _batch(self, pieces, n: int) -> InstanceBatch:
        spec = self.spec
        dense = np.empty((n, len(spec.dense)), dtype=np.float32)
        for j in range(len(spec.dense)):
            _fill_columns(dense, pieces, "dense", j)
        labels = np.empty((n, len(spec.labels)), dtype=np.float32)
        for j in range(len(spec.labels)):
            _fill_columns(labels, pieces, "labels", j)
        instance_id, user_id, ts = (
            torch.from_numpy(np.concatenate([cols.keys[j][s:e] for cols, s, e in pieces]))
            for j in range(len(KEY_COLUMNS)))
        lengths = np.ones((len(spec.sparse), n), dtype=np.int64)
        sizes = np.empty(len(spec.sparse), dtype=np.int64)
        for k in range(len(spec.sparse)):
            pos, size = 0, 0
            for cols, s, e in pieces:
                offsets = cols.sparse[k][1]
                if offsets is None:
                    size += e - s
                else:
                    lengths[k, pos:pos + e - s] = np.diff(offsets[s:e + 1])
                    size += int(offsets[e] - offsets[s])
                pos += e - s
            sizes[k] = size
        values = np.empty(int(sizes.sum()), dtype=np.int64)
        pos = 0
        for k in range(len(spec.sparse)):
            for cols, s, e in pieces:
                vals, offsets = cols.sparse[k]
                a, b = (s, e) if offsets is None else (offsets[s], offsets[e])
                values[pos:pos + b - a] = vals[a:b]
                pos += b - a
        return InstanceBatch(
            dense_features=torch.from_numpy(dense),
            sparse_features=KeyedJaggedTensor(
                keys=spec.sparse_names, values=torch.from_numpy(values),
                lengths=torch.from_numpy(lengths.reshape(-1))),
            labels=torch.from_numpy(labels),
            instance_id=instance_id, user_id=user_id, ts=ts,
            weight=torch.ones(n, dtype=torch.float32),
        )


class InstanceLogReader:
    """Iterate over this rank's partition of an instance log as :class:`InstanceBatch` objects.

    Args:
        path: the log (a directory of Parquet files, or one file), or a list of logs of one
            spec read as one log (their rows together, e.g. a user's train, valid and test
            rows in one user order).
        spec: its feature spec (default: the spec saved beside the (first) log).
        config: batch size, order, partition, seed, drop_last and chunk size.
        rank, world_size: this process's partition; every row goes to exactly one rank.
        tmp_dir: where the external shuffle puts its temporary files (default: system temp).

    ``rows_decoded`` / ``key_rows_decoded``: rows of the row groups decoded so far for batches
    (every column of the spec) and for planning (key columns only), over all passes.
    """

    def __init__(self, path: Union[PathLike, Sequence[PathLike]],
                 spec: Optional[FeatureSpec] = None,
                 config: Optional[ReaderConfig] = None, rank: int = 0, world_size: int = 1,
                 tmp_dir: Optional[PathLike] = None) -> None:
        paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
        if not paths:
            raise ValueError("give at least one log")
        self.path = paths[0]
        self.spec = spec if spec is not None else FeatureSpec.load(self.path)
        self.config = config or ReaderConfig()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if self.config.batch_size <= 0 or self.config.chunk_rows < self.config.batch_size:
            raise ValueError("batch_size must be > 0 and chunk_rows >= batch_size")
        if self.config.order not in set(ReadOrder):
            raise ValueError(f"unknown order {self.config.order!r}")
        if self.config.partition not in set(Partition):
            raise ValueError(f"unknown partition {self.config.partition!r}")
        self.rank, self.world_size = rank, world_size
        self.tmp_dir = tmp_dir
        self.epoch = 0
        self.files = [f for p in paths for f in log_files(p)]
        for f in self.files:
            names = set(open_parquet(f).schema_arrow.names)
            for col in self.spec.columns:
                if col not in names:
                    raise InstanceLogError(f, "missing column required by the feature spec",
                                           column=col)
        self.groups = row_groups(self.files)
        self.rows_decoded = 0
        self.key_rows_decoded = 0
        self._columns = self.spec.columns
        self._assemble = _BatchAssembler(self.spec, self.config.batch_size)
        self._fixed_plan: Optional[np.ndarray] = None  # temporal and user plans, made once
        self._ranges_in_time_order: Optional[bool] = None  # row_groups: checked once

    @property
    def num_rows(self) -> int:
        """Rows in the whole log."""
        return self.groups.num_rows

    @property
    def rank_rows(self) -> int:
        """Rows this rank reads per pass."""
        cfg = self.config
        if cfg.order == ReadOrder.USER:
            return int(self.plan().size)
        return rank_row_count(self.num_rows, cfg.batch_size, self.rank, self.world_size,
                              cfg.drop_last)

    @property
    def row_ranges(self) -> np.ndarray:
        """This rank's ``[start, end)`` ranges of row numbers under the row_groups partition
        (``[k, 2]``, file order; see :func:`deal_row_groups`)."""
        return deal_row_groups(self.groups.starts, self.world_size)[self.rank]

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of the shuffled order for this epoch."""
        self.epoch = epoch

    def plan(self) -> np.ndarray:
        """This rank's global row numbers (row position in the log), in emission order."""
        cfg = self.config
        if cfg.order == ReadOrder.SHUFFLED:
            return self._plan_shuffled()
        if self._fixed_plan is None:
            self._fixed_plan = (self._plan_users() if cfg.order == ReadOrder.USER
                                else self._plan_temporal())
        return self._fixed_plan

    def __len__(self) -> int:
        return -(-self.rank_rows // self.config.batch_size)

    def __iter__(self) -> Iterator[InstanceBatch]:
        if self._streams_ranges():
            yield from self._assemble(self._tables_of_ranges())
            return
        if self._shuffles_windows():
            yield from self._assemble(self._window_tables())
            return
        rows = self.plan()
        if rows.size == 0:
            return
        if bool((np.diff(rows) > 0).all()):
            yield from self._assemble(self._tables_of(rows))
        else:
            yield from self._assemble(self._external_shuffle(rows))

    # ------------------------------------------------------------------ plans
    def _dealt_positions(self) -> np.ndarray:
        cfg = self.config
        return dealt_positions(self.num_rows, cfg.batch_size, self.rank, self.world_size,
                               cfg.drop_last)

    def _plan_temporal(self) -> np.ndarray:
        """Rows by (ts, instance_id), newest first with ``reverse``. Rows stored in that order
        (checked from their keys, row group by row group) need no keys held."""
        cfg = self.config
        if cfg.partition == Partition.STEPS:
            positions = self._dealt_positions()
            if self._in_time_order(np.array([[0, self.num_rows]])):
                return self.num_rows - 1 - positions if cfg.reverse else positions
            key = read_key_columns(self.files)
            self.key_rows_decoded += self.num_rows
            order = np.lexsort((key.instance_id, key.ts))
            del key
            return (order[::-1] if cfg.reverse else order)[positions]
        ranges = self.row_ranges
        own = _rows_of(ranges)
        if not self._own_rows_in_time_order():
            ts, instance_id = (np.concatenate(k) for k in zip(*self._keys_of(ranges)))
            own = own[np.lexsort((instance_id, ts))]
            del ts, instance_id
        return (own[::-1] if cfg.reverse else own)[:self.rank_rows]

    def _plan_shuffled(self) -> np.ndarray:
        cfg = self.config
        if cfg.partition == Partition.STEPS:
            order = np.random.default_rng([cfg.seed, self.epoch]).permutation(self.num_rows)
            return order[self._dealt_positions()]
        if self._shuffles_windows():
            starts = self.groups.starts
            return np.concatenate(
                [_rows_of(np.array([(starts[g] + lo, starts[g] + hi) for g, lo, hi in window]))
                 [perm] for window, perm in self._windows()]
                or [np.empty(0, dtype=np.int64)])[:self.rank_rows]
        own = _rows_of(self.row_ranges)
        return own[self._rng().permutation(own.size)[:self.rank_rows]]

    def _rng(self) -> np.random.Generator:
        """The shuffled order's generator of this epoch. One process draws the permutation of
        the whole log that the steps partition draws; several draw independent ones, so that a
        step's batches are not alike."""
        cfg = self.config
        return np.random.default_rng([cfg.seed, self.epoch]
                                     + ([self.rank] if self.world_size > 1 else []))

    def _plan_users(self) -> np.ndarray:
        """Whole users dealt so that instance counts balance: one pass counts every user's rows
        (user ids only, merged row group by row group), a second fills this rank's rows' keys."""
        users, counts = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        pending: List[Tuple[np.ndarray, np.ndarray]] = []
        for gi in range(len(self.groups.ids)):
            ids = _values(self._read_group(gi, [USER_ID])[USER_ID])
            pending.append(np.unique(ids, return_counts=True))
            if sum(u.size for u, _ in pending) > users.size:  # merge at doubling: linear work
                users, counts = _merge_counts(users, counts, pending)
                pending = []
        users, counts = _merge_counts(users, counts, pending)
        mine = _snake_owners(counts, self.world_size) == self.rank
        size = int(counts[mine].sum())
        keys = {k: np.empty(size, dtype=np.int64) for k in ("rows", *KEY_COLUMNS)}
        filled = 0
        for gi in range(len(self.groups.ids)):
            table = self._read_group(gi, list(KEY_COLUMNS))
            keep = np.flatnonzero(mine[np.searchsorted(users, _values(table[USER_ID]))])
            end = filled + keep.size
            keys["rows"][filled:end] = keep + self.groups.starts[gi]
            for col in KEY_COLUMNS:
                keys[col][filled:end] = _values(table[col])[keep]
            filled = end
        del users, counts, mine
        return _user_order(keys, self.config.reverse)

    def _streams_ranges(self) -> bool:
        """Temporal order under the row_groups partition over rows stored in time order (the
        normal case): this rank's row ranges are streamed as they are, with no plan of rows
        held (memory flat in the log and the share)."""
        cfg = self.config
        return (cfg.order == ReadOrder.TEMPORAL and cfg.partition == Partition.ROW_GROUPS
                and self._own_rows_in_time_order())

    def _own_rows_in_time_order(self) -> bool:
        """Whether this rank's row ranges are stored in time order (their keys read once)."""
        if self._ranges_in_time_order is None:
            self._ranges_in_time_order = self._in_time_order(self.row_ranges)
        return self._ranges_in_time_order

    def _pieces(self) -> List[Tuple[int, int, int]]:
        """This rank's rows as (row group, first, end) pieces within their groups, file
        order."""
        starts = self.groups.starts
        pieces = []
        for start, end in self.row_ranges:
            gi = int(np.searchsorted(starts, start, side="right")) - 1
            while gi + 1 < starts.size and starts[gi] < end:
                pieces.append((gi, int(max(start, starts[gi]) - starts[gi]),
                               int(min(end, starts[gi + 1]) - starts[gi])))
                gi += 1
        return pieces

    def _shuffles_windows(self) -> bool:
        cfg = self.config
        return (cfg.order == ReadOrder.SHUFFLED and cfg.partition == Partition.ROW_GROUPS
                and cfg.shuffle_window > 0)

    def _windows(self) -> Iterator[Tuple[List[Tuple[int, int, int]], np.ndarray]]:
        """``shuffle_window``: the rank's pieces in a random order, ``shuffle_window`` at a time,
        each window with the permutation of its rows (the same draws every time)."""
        rng, pieces, k = self._rng(), self._pieces(), self.config.shuffle_window
        order = rng.permutation(len(pieces))
        for w in range(0, len(order), k):
            window = [pieces[i] for i in order[w:w + k]]
            yield window, rng.permutation(sum(hi - lo for _, lo, hi in window))

    def _window_tables(self) -> Iterator[pa.Table]:
        """The windowed shuffle's rows, one table per window, up to ``rank_rows`` rows: what
        :meth:`plan` lists, with one window of rows held at a time."""
        left = self.rank_rows
        for window, perm in self._windows():
            if left <= 0:
                return
            table = pa.concat_tables([self._read_group(g).slice(lo, hi - lo)
                                      for g, lo, hi in window])
            yield table.take(pa.array(perm[:left]))
            left -= min(left, perm.size)

    def _tables_of_ranges(self) -> Iterator[pa.Table]:
        """This rank's rows in time order (newest first with ``reverse``), one table per row
        group piece, up to ``rank_rows`` rows: what :meth:`plan` lists, without listing it."""
        reverse, left = self.config.reverse, self.rank_rows
        pieces = self._pieces()
        for gi, lo, hi in (reversed(pieces) if reverse else pieces):
            if left <= 0:
                return
            table = self._read_group(int(gi)).slice(int(lo), int(hi - lo))
            if reverse:
                table = table.take(pa.array(np.arange(table.num_rows - 1, -1, -1)))
            yield table.slice(0, left)
            left -= min(left, table.num_rows)

    def _keys_of(self, ranges: np.ndarray) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """``(ts, instance_id)`` of the rows of ``ranges`` (``[k, 2]`` ascending ``[start, end)``
        row numbers, no row group in two), one row group at a time."""
        starts = self.groups.starts
        for start, end in ranges:
            gi = int(np.searchsorted(starts, start, side="right")) - 1
            while gi + 1 < starts.size and starts[gi] < end:
                table = self._read_group(gi, [TS, INSTANCE_ID])
                lo, hi = max(start, starts[gi]) - starts[gi], min(end, starts[gi + 1]) - starts[gi]
                yield _values(table[TS])[lo:hi], _values(table[INSTANCE_ID])[lo:hi]
                gi += 1

    def _in_time_order(self, ranges: np.ndarray) -> bool:
        """Whether the rows of ``ranges``, in file order, are in (ts, instance_id) order; their
        keys are read one row group at a time and not held (stops at the first row out of
        order)."""
        last: Optional[Tuple[int, int]] = None
        for ts, instance_id in self._keys_of(ranges):
            if ts.size == 0:
                continue
            if last is not None and (ts[0], instance_id[0]) < last:
                return False
            dt, di = np.diff(ts), np.diff(instance_id)
            if not bool(((dt > 0) | ((dt == 0) & (di >= 0))).all()):
                return False
            last = (ts[-1], instance_id[-1])
        return True

    # ------------------------------------------------------------------ the two read paths
    def _read_group(self, gi: int, columns: Optional[List[str]] = None) -> pa.Table:
        """Row group ``gi``: every column of the spec (counted in ``rows_decoded``), or only
        ``columns`` (keys, counted in ``key_rows_decoded``)."""
        fi, g = self.groups.ids[gi]
        try:
            table = open_parquet(self.files[fi]).read_row_group(
                g, columns=self._columns if columns is None else columns)
        except (OSError, pa.ArrowException) as e:
            raise InstanceLogError(self.files[fi], f"unreadable or corrupted Parquet data in row "
                                                   f"group {g} ({e})") from None
        if columns is None:
            self.rows_decoded += table.num_rows
        else:
            self.key_rows_decoded += table.num_rows
        return table

    def _tables_of(self, rows: np.ndarray) -> Iterator[pa.Table]:
        """Rows ``rows`` (ascending row numbers), one table per row group that holds some, in
        order; only those row groups are decoded."""
        starts = self.groups.starts
        cuts = np.searchsorted(rows, starts)
        for gi in np.flatnonzero(np.diff(cuts)):
            table = self._read_group(int(gi))
            local = rows[cuts[gi]:cuts[gi + 1]] - starts[gi]
            if local.size == table.num_rows:
                yield table
            elif local[-1] - local[0] + 1 == local.size:
                yield table.slice(int(local[0]), local.size)
            else:
                yield table.take(pa.array(local))

    def _external_shuffle(self, rows: np.ndarray) -> Iterator[pa.Table]:
        """Scatter this rank's rows into one temporary Arrow file per chunk of the emission
        order, in a single pass over its row groups, then read the chunks back in order."""
        chunk_rows = self.config.chunk_rows
        n_chunks = -(-rows.size // chunk_rows)
        by_row = np.argsort(rows, kind="stable")  # emission positions, by row number
        cuts = np.searchsorted(rows[by_row], self.groups.starts)
        tmp = Path(tempfile.mkdtemp(prefix="iat-reader-", dir=self.tmp_dir))
        try:
            writers: List[Optional[ipc.RecordBatchFileWriter]] = [None] * n_chunks
            for gi in np.flatnonzero(np.diff(cuts)):
                table = self._read_group(int(gi))
                pos = by_row[cuts[gi]:cuts[gi + 1]]
                pos = pos[np.argsort(pos // chunk_rows, kind="stable")]
                table = table.take(pa.array(rows[pos] - self.groups.starts[gi]))
                table = table.append_column(_POS, pa.array(pos))
                chunk = pos // chunk_rows
                cut = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1], True])
                for a, b in zip(cut[:-1], cut[1:]):
                    c = int(chunk[a])
                    if writers[c] is None:
                        writers[c] = ipc.new_file(str(tmp / f"{c:06d}.arrow"), table.schema)
                    writers[c].write_table(table.slice(a, b - a))
            for w in writers:
                if w is not None:
                    w.close()
            for c in range(n_chunks):
                with pa.memory_map(str(tmp / f"{c:06d}.arrow")) as source:
                    table = ipc.open_file(source).read_all()
                    idx = np.argsort(table[_POS].to_numpy(), kind="stable")
                    yield table.drop_columns([_POS]).take(pa.array(idx))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
