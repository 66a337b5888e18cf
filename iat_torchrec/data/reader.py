"""Stream an instance log into TorchRec batches, in one of three orders, one partition per rank.

Orders (:class:`ReadOrder`):

- ``temporal``: global time order, by (ts, instance_id).
- ``user``: each user's instances together and in time order; users are ordered by their first
  instance, and a user's history is never split across ranks (users are dealt to ranks so that
  instance counts balance).
- ``shuffled``: a seeded uniform permutation (``set_epoch`` changes it per epoch).

For ``temporal`` and ``shuffled``, global steps of ``world_size * batch_size`` rows are dealt to
ranks batch by batch (the last step split evenly), so ranks move through the data together and
hold the same number of batches. Every row is read by exactly one rank.

Memory stays bounded whatever the log size: the reader keeps the key columns (``instance_id``,
``user_id``, ``ts``: 24 bytes per row) and a plan (8 bytes per row of this rank), plus at most one
chunk of ``chunk_rows`` rows. When the requested order follows the order the rows are stored in
(temporal order of a log written in time order, the normal case), row groups are streamed
directly. Otherwise one pass scatters this rank's rows into temporary Arrow files of one chunk
each (an external shuffle, ``tmp_dir``), which are then read back chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iat_torchrec.data.batch import InstanceBatch
from iat_torchrec.data.log import (InstanceLogError, KeyColumns, log_files, open_parquet,
                                   read_key_columns)
from iat_torchrec.data.spec import KEY_COLUMNS, FeatureSpec

PathLike = Union[str, os.PathLike]

_POS = "__pos"


class ReadOrder(str, enum.Enum):
    TEMPORAL = "temporal"
    USER = "user"
    SHUFFLED = "shuffled"


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


def _deal_steps(order: np.ndarray, batch_size: int, rank: int, world_size: int,
                drop_last: bool) -> np.ndarray:
    """Rank ``rank``'s rows when global steps of ``world_size * batch_size`` rows are dealt to
    ranks batch by batch; the last partial step is split evenly (or dropped)."""
    step = batch_size * world_size
    full = (order.size // step) * step
    mine = order[:full].reshape(-1, world_size, batch_size)[:, rank, :].reshape(-1)
    if drop_last or full == order.size:
        return mine
    tail = np.array_split(order[full:], world_size)[rank]
    return np.concatenate([mine, tail])


def _deal_users(key: KeyColumns, rank: int, world_size: int, reverse: bool) -> np.ndarray:
    """Rank ``rank``'s rows in user order: whole users, dealt so instance counts balance."""
    order = np.lexsort((key.instance_id, key.ts, key.user_id))
    users_sorted = key.user_id[order]
    starts = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1]])
    counts = np.diff(np.r_[starts, order.size])
    # Snake dealing by decreasing size: 0,1,..,W-1,W-1,..,0,0,1,.. keeps counts balanced.
    by_size = np.argsort(-counts, kind="stable")
    lane = np.arange(by_size.size) % (2 * world_size)
    owner = np.empty_like(by_size)
    owner[by_size] = np.where(lane < world_size, lane, 2 * world_size - 1 - lane)
    mine = np.flatnonzero(owner == rank)
    # This rank's users by the time of their first instance (then user id).
    first_ts = key.ts[order[starts[mine]]]
    mine = mine[np.lexsort((users_sorted[starts[mine]], first_ts))]
    if reverse:
        mine = mine[::-1]
    if mine.size == 0:
        return np.empty(0, dtype=np.int64)
    seg_starts, seg_lens = starts[mine], counts[mine]
    # Concatenate the users' row ranges without a Python loop.
    offsets = np.repeat(seg_starts - np.r_[0, np.cumsum(seg_lens)[:-1]], seg_lens)
    return order[np.arange(seg_lens.sum()) + offsets]


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
        config: batch size, order, seed, drop_last and chunk size.
        rank, world_size: this process's partition; every row goes to exactly one rank.
        tmp_dir: where the external shuffle puts its temporary files (default: system temp).
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
        self._key = read_key_columns(self.files)
        self._columns = self.spec.columns
        self._assemble = _BatchAssembler(self.spec, self.config.batch_size)

    @property
    def num_rows(self) -> int:
        """Rows in the whole log."""
        return int(self._key.ts.size)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of the shuffled order for this epoch."""
        self.epoch = epoch

    def plan(self) -> np.ndarray:
        """This rank's global row numbers (row position in the log), in emission order."""
        key, cfg = self._key, self.config
        if cfg.order == ReadOrder.USER:
            return _deal_users(key, self.rank, self.world_size, cfg.reverse)
        if cfg.order == ReadOrder.TEMPORAL:
            order = np.lexsort((key.instance_id, key.ts))
            if cfg.reverse:
                order = order[::-1]
        elif cfg.order == ReadOrder.SHUFFLED:
            rng = np.random.default_rng([cfg.seed, self.epoch])
            order = rng.permutation(key.ts.size)
        else:
            raise ValueError(f"unknown order {cfg.order!r}")
        return _deal_steps(order, cfg.batch_size, self.rank, self.world_size, cfg.drop_last)

    def __len__(self) -> int:
        return -(-self.plan().size // self.config.batch_size)

    def __iter__(self) -> Iterator[InstanceBatch]:
        rows = self.plan()
        if rows.size == 0:
            return
        if bool((np.diff(rows) > 0).all()):
            yield from self._assemble(self._stream_in_file_order(rows))
        else:
            yield from self._assemble(self._external_shuffle(rows))

    # ------------------------------------------------------------------ the two read paths
    def _read_group(self, gi: int) -> pa.Table:
        fi, g = self._key.group_ids[gi]
        try:
            return open_parquet(self.files[fi]).read_row_group(g, columns=self._columns)
        except (OSError, pa.ArrowException) as e:
            raise InstanceLogError(self.files[fi], f"unreadable or corrupted Parquet data in row "
                                                   f"group {g} ({e})") from None

    def _groups_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._key.group_starts, rows, side="right") - 1

    def _stream_in_file_order(self, rows: np.ndarray) -> Iterator[pa.Table]:
        """Rows already ascending: read the row groups that hold them, in order."""
        starts = self._key.group_starts
        groups = self._groups_of(rows)
        bounds = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            gi = int(groups[a])
            table = self._read_group(gi)
            local = rows[a:b] - starts[gi]
            yield table if local.size == table.num_rows else table.take(pa.array(local))

    def _external_shuffle(self, rows: np.ndarray) -> Iterator[pa.Table]:
        """Scatter this rank's rows into one temporary Arrow file per chunk of the emission
        order, in a single pass over the log, then read the chunks back in order."""
        chunk_rows = self.config.chunk_rows
        n_chunks = -(-rows.size // chunk_rows)
        position = np.full(self.num_rows, -1, dtype=np.int64)
        position[rows] = np.arange(rows.size)
        tmp = Path(tempfile.mkdtemp(prefix="iat-reader-", dir=self.tmp_dir))
        try:
            schema = None
            writers: List[Optional[ipc.RecordBatchFileWriter]] = [None] * n_chunks
            for gi in np.unique(self._groups_of(rows)):
                table = self._read_group(int(gi))
                pos = position[self._key.group_starts[gi]:self._key.group_starts[gi + 1]]
                keep = np.flatnonzero(pos >= 0)
                chunk = pos[keep] // chunk_rows
                by_chunk = np.argsort(chunk, kind="stable")
                keep, chunk = keep[by_chunk], chunk[by_chunk]
                table = table.append_column(_POS, pa.array(pos)).take(pa.array(keep))
                schema = table.schema
                cut = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1], True])
                for a, b in zip(cut[:-1], cut[1:]):
                    c = int(chunk[a])
                    if writers[c] is None:
                        writers[c] = ipc.new_file(str(tmp / f"{c:06d}.arrow"), schema)
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
