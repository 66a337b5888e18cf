"""The instance log on disk: Parquet schema, atomic writing, and validation against a spec.

An instance log is a directory of ``part-*.parquet`` files with ``feature_spec.json`` beside them
(or a single ``.parquet`` file with ``<name>.spec.json``). Columns: ``instance_id`` (int64,
unique), ``user_id`` (int64), ``ts`` (int64 seconds), the label columns (0/1), sparse fields
(int64 or list<int64>) and dense fields (float32).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import textwrap
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iat_torchrec.atomic import CommitOnExit, atomic_output
from iat_torchrec.data.spec import (INSTANCE_ID, KEY_COLUMNS, TS, USER_ID, FeatureSpec,
                                    SpecError, spec_path)

PathLike = Union[str, os.PathLike]

PROVENANCE_FILE = "provenance.json"
DEFAULT_ROWS_PER_FILE = 2_000_000
DEFAULT_ROW_GROUP_SIZE = 131_072


class InstanceLogError(ValueError):
    """Bad instance-log data; the message names the file, column and row."""

    def __init__(self, path: PathLike, message: str, column: Optional[str] = None,
                 row: Optional[int] = None) -> None:
        self.path, self.column, self.row = str(path), column, row
        where = [self.path]
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {message}")


# --------------------------------------------------------------------------- schema and files
def arrow_schema(spec: FeatureSpec) -> pa.Schema:
    """The canonical Arrow schema of a log with this spec (labels stored as int8)."""
    fields = [pa.field(INSTANCE_ID, pa.int64(), nullable=False),
              pa.field(USER_ID, pa.int64(), nullable=False),
              pa.field(TS, pa.int64(), nullable=False)]
    fields += [pa.field(name, pa.int8()) for name in spec.labels]
    fields += [pa.field(f.name, pa.list_(pa.int64()) if f.multi_valued else pa.int64())
               for f in spec.sparse]
    fields += [pa.field(f.name, pa.float32()) for f in spec.dense]
    return pa.schema(fields)


def log_files(path: PathLike) -> List[Path]:
    """The Parquet files of a log (a file, or a directory's ``*.parquet`` in name order)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob("*.parquet") if not f.name.startswith("."))
        if not files:
            raise InstanceLogError(p, "empty input: no .parquet files in this directory")
        return files
    raise InstanceLogError(p, "instance log not found")


def open_parquet(path: Path) -> pq.ParquetFile:
    """Open one Parquet file, turning any read failure into an :class:`InstanceLogError`."""
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise InstanceLogError(path, f"unreadable or corrupted Parquet file ({e})") from None


@dataclasses.dataclass
class RowGroups:
    """Where each row group of a log's files starts, from the Parquet footers (no data read).

    Example: two files of 300 rows in groups of 200 -> ``starts`` [0, 200, 300, 500, 600],
    ``ids`` [(0, 0), (0, 1), (1, 0), (1, 1)].
    """

    starts: np.ndarray  # global first row of each (file, row group), then the total
    ids: List[Tuple[int, int]]  # (file index, row group index) of each group

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])


def row_groups(files: List[Path]) -> RowGroups:
    """The row groups of ``files`` (read as one log, in order); an empty log is an error."""
    sizes, ids = [], []
    for fi, f in enumerate(files):
        meta = open_parquet(f).metadata
        for g in range(meta.num_row_groups):
            sizes.append(meta.row_group(g).num_rows)
            ids.append((fi, g))
    starts = np.r_[0, np.cumsum(sizes, dtype=np.int64)].astype(np.int64)
    if starts[-1] == 0:
        raise InstanceLogError(files[0], "empty input: the log has no rows")
    return RowGroups(starts, ids)


@dataclasses.dataclass
class KeyColumns:
    """The key columns of a whole log, in file order, and where each row group starts."""

    files: List[Path]
    instance_id: np.ndarray
    user_id: np.ndarray
    ts: np.ndarray
    group_starts: np.ndarray  # global first row of each (file, row group), then the total
    group_ids: List[Tuple[int, int]]  # (file index, row group index) of each group


def read_key_columns(files: List[Path]) -> KeyColumns:
    """Read ``instance_id``, ``user_id`` and ``ts`` of every row (24 bytes a row), nothing else."""
    ids, users, tss, starts, groups = [], [], [], [0], []
    for fi, f in enumerate(files):
        pf = open_parquet(f)
        for col in KEY_COLUMNS:
            if col not in pf.schema_arrow.names:
                raise InstanceLogError(f, "missing column", column=col)
        for g in range(pf.num_row_groups):
            try:
                t = pf.read_row_group(g, columns=list(KEY_COLUMNS))
            except (OSError, pa.ArrowException) as e:
                raise InstanceLogError(f, f"unreadable or corrupted Parquet data in row group "
                                          f"{g} ({e})") from None
            ids.append(t[INSTANCE_ID].to_numpy())
            users.append(t[USER_ID].to_numpy())
            tss.append(t[TS].to_numpy())
            starts.append(starts[-1] + t.num_rows)
            groups.append((fi, g))
    if starts[-1] == 0:
        raise InstanceLogError(files[0], "empty input: the log has no rows")
    return KeyColumns(files, np.concatenate(ids), np.concatenate(users), np.concatenate(tss),
                      np.asarray(starts, dtype=np.int64), groups)


class LogWriter(CommitOnExit):
    """Stream tables into a new instance log directory, written atomically.

    Tables are cast to the spec's schema and cut into files of ``rows_per_file`` rows. The
    directory appears under its final name only when :meth:`close` succeeds; ``extra_files``
    (for example a data licence) are copied into it, and ``provenance`` (what made the log: a
    generator config, an import source) is saved as ``provenance.json`` so a later run can tell
    whether an existing log is the one it would make.
    """

    def __init__(self, path: PathLike, spec: FeatureSpec, overwrite: bool = False,
                 rows_per_file: int = DEFAULT_ROWS_PER_FILE,
                 row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                 extra_files: Sequence[PathLike] = (),
                 provenance: Optional[Mapping[str, object]] = None) -> None:
        self.path = Path(path)
        self.provenance = provenance
        self.spec = spec
        self.schema = arrow_schema(spec)
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        self.extra_files = [Path(f) for f in extra_files]
        self.rows_written = 0
        self._ctx = atomic_output(self.path, overwrite=overwrite)
        self._tmp = self._ctx.__enter__()
        self._tmp.mkdir()
        self._writer: Optional[pq.ParquetWriter] = None
        self._file_rows = 0
        self._n_files = 0

    def write(self, table: Union[pa.Table, Mapping[str, object]]) -> None:
        """Append rows (an Arrow table or a mapping column -> array)."""
        if not isinstance(table, pa.Table):
            table = pa.table(dict(table))
        missing = [c for c in self.schema.names if c not in table.column_names]
        if missing:
            raise InstanceLogError(self.path, f"table to write lacks columns {missing}")
        table = table.select(self.schema.names).cast(self.schema)
        while table.num_rows:
            if self._writer is None:
                name = self._tmp / f"part-{self._n_files:05d}.parquet"
                # Dictionary-encode ids only: floats and unique keys gain nothing from it and
                # it halves the write rate.
                self._writer = pq.ParquetWriter(name, self.schema, compression="snappy",
                                                use_dictionary=self.spec.sparse_names)
                self._n_files += 1
            take = min(table.num_rows, self.rows_per_file - self._file_rows)
            self._writer.write_table(table.slice(0, take), row_group_size=self.row_group_size)
            table = table.slice(take)
            self._file_rows += take
            self.rows_written += take
            if self._file_rows >= self.rows_per_file:
                self._writer.close()
                self._writer, self._file_rows = None, 0

    def close(self) -> Path:
        """Finish the files, write the spec and extra files, and rename into place."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.rows_written == 0:
            self.abort()
            raise InstanceLogError(self.path, "empty input: no rows to write")
        self.spec.save(self._tmp / spec_path(self._tmp).name)
        for f in self.extra_files:
            shutil.copy2(f, self._tmp / f.name)
        if self.provenance is not None:
            (self._tmp / PROVENANCE_FILE).write_text(
                json.dumps(self.provenance, indent=2, sort_keys=True, default=str) + "\n")
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the target path is left untouched."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass


def write_log(tables: Union[pa.Table, Iterable[pa.Table]], path: PathLike, spec: FeatureSpec,
              **writer_kwargs) -> Path:
    """Write one table or a stream of tables as a new instance log (see :class:`LogWriter`)."""
    with LogWriter(path, spec, **writer_kwargs) as w:
        for t in [tables] if isinstance(tables, pa.Table) else tables:
            w.write(t)
    return Path(path)


def read_provenance(log_path: PathLike) -> Optional[Dict[str, object]]:
    """The provenance saved with a log directory by :class:`LogWriter`, if any."""
    f = Path(log_path) / PROVENANCE_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def license_files(log_path: PathLike) -> List[Path]:
    """Licence/readme files kept beside a log's data, to be carried to anything derived from it."""
    p = Path(log_path)
    folder = p if p.is_dir() else p.parent
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and f.name.upper().startswith(("LICENSE", "LICENCE", "README")))


# --------------------------------------------------------------------------- validation
@dataclasses.dataclass
class LogSummary:
    """What validation learnt about a log."""

    path: str
    files: int
    rows: int
    users: int
    ts_min: int
    ts_max: int
    time_sorted: bool
    label_rates: Dict[str, float]
    sparse_mean_lengths: Dict[str, float]
    dense_means: Dict[str, float]

    def format(self) -> str:
        def listing(title: str, items: Dict[str, float], fmt: str) -> List[str]:
            text = "  ".join(f"{k}={v:{fmt}}" for k, v in items.items())
            return textwrap.wrap(text, width=100, initial_indent=f"  {title}: ",
                                 subsequent_indent="      ")

        return "\n".join([
            f"instance log  {self.path}",
            f"  files {self.files}   instances {self.rows:,}   users {self.users:,}   "
            f"instances/user {self.rows / max(self.users, 1):.1f}",
            f"  ts [{self.ts_min}, {self.ts_max}]  span {(self.ts_max - self.ts_min) / 86400:.1f} "
            f"days  stored in time order: {'yes' if self.time_sorted else 'no'}",
            *listing("label rates", self.label_rates, ".4f"),
            *listing("sparse fields, mean ids per instance", self.sparse_mean_lengths, ".2f"),
            *listing("dense fields, mean", self.dense_means, ".3g"),
        ])


def _type_name(t: pa.DataType) -> str:
    return str(t)


def _check_schema(path: Path, schema: pa.Schema, spec: FeatureSpec) -> None:
    names = set(schema.names)
    for col in spec.columns:
        if col not in names:
            raise InstanceLogError(path, "missing column required by the feature spec", column=col)
    extra = [n for n in schema.names if n not in set(spec.columns)]
    if extra:
        raise SpecError(f"{path}: the feature spec does not match the data: columns {extra} are "
                        "not described by the spec (add them to the spec or drop them)")
    for col in (INSTANCE_ID, USER_ID):
        if schema.field(col).type != pa.int64():
            raise InstanceLogError(path, f"wrong type: expected int64, got "
                                         f"{_type_name(schema.field(col).type)}", column=col)
    ts_type = schema.field(TS).type
    if not (ts_type == pa.int64() or pa.types.is_floating(ts_type)):
        raise InstanceLogError(path, f"wrong type: expected int64 seconds, got "
                                     f"{_type_name(ts_type)}", column=TS)
    for col in spec.labels:
        t = schema.field(col).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise InstanceLogError(path, f"wrong type: expected a 0/1 label (integer, float or "
                                         f"bool), got {_type_name(t)}", column=col)
    for f in spec.sparse:
        t = schema.field(f.name).type
        is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
        if is_list and not f.multi_valued:
            raise SpecError(f"{path}: the feature spec does not match the data: column "
                            f"{f.name!r} holds lists but the spec declares it single-valued")
        if not is_list and f.multi_valued and t == pa.int64():
            raise SpecError(f"{path}: the feature spec does not match the data: column "
                            f"{f.name!r} holds single ids but the spec declares it multi_valued")
        expected = pa.list_(pa.int64()) if f.multi_valued else pa.int64()
        value_type = t.value_type if is_list else t
        if value_type != pa.int64():
            raise InstanceLogError(path, f"wrong type: expected {expected}, got {_type_name(t)}",
                                   column=f.name)
    for f in spec.dense:
        t = schema.field(f.name).type
        if t != pa.float32():
            raise InstanceLogError(path, f"wrong type: expected float32, got {_type_name(t)}",
                                   column=f.name)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_no_nulls(path: Path, col: str, arr: pa.ChunkedArray, base: int, what: str) -> None:
    if arr.null_count:
        row = _first(np.asarray(arr.is_null().to_numpy(zero_copy_only=False)))
        raise InstanceLogError(path, f"null value, expected {what}", column=col, row=base + row)


def _check_batch(path: Path, table: pa.Table, spec: FeatureSpec, base: int) -> None:
    """Value checks for one row group whose first row is row ``base`` of the file."""
    for col in (INSTANCE_ID, USER_ID):
        _check_no_nulls(path, col, table[col], base, "an int64 id")
    ts = table[TS]
    if ts.null_count:
        raise InstanceLogError(path, "NaN/null timestamp, expected int64 seconds >= 0", column=TS,
                               row=base + _first(ts.is_null().to_numpy(zero_copy_only=False)))
    ts_np = ts.to_numpy()
    if ts_np.dtype.kind == "f":
        bad = ~np.isfinite(ts_np)
        if bad.any():
            raise InstanceLogError(path, "NaN timestamp, expected int64 seconds >= 0",
                                   column=TS, row=base + _first(bad))
        raise InstanceLogError(path, f"wrong type: expected int64 seconds, got "
                                     f"{_type_name(ts.type)}", column=TS)
    if (ts_np < 0).any():
        row = _first(ts_np < 0)
        raise InstanceLogError(path, f"negative timestamp {ts_np[row]}, expected seconds >= 0",
                               column=TS, row=base + row)
    for col in spec.labels:
        arr = table[col]
        if arr.null_count:
            raise InstanceLogError(path, "null/NaN label, expected 0 or 1", column=col,
                                   row=base + _first(arr.is_null().to_numpy(zero_copy_only=False)))
        y = arr.to_numpy().astype(np.float64, copy=False)
        bad = ~((y == 0) | (y == 1))
        if bad.any():
            row = _first(bad)
            raise InstanceLogError(path, f"label {y[row]:g} is not in {{0, 1}}", column=col,
                                   row=base + row)
    for f in spec.sparse:
        arr = table[f.name].combine_chunks()
        values = arr.flatten() if f.multi_valued else arr
        if values.null_count:
            raise InstanceLogError(path, "null id, expected int64 ids (use an empty list for "
                                         "'no value' in a multi-valued field)", column=f.name,
                                   row=base + _row_of_value(arr, f.multi_valued,
                                                            _first(values.is_null().to_numpy(
                                                                zero_copy_only=False))))
        if f.hashed:
            continue
        v = values.to_numpy()
        bad = (v < 0) | (v >= f.num_embeddings)
        if bad.any():
            i = _first(bad)
            raise InstanceLogError(
                path, f"id {v[i]} outside the vocabulary [0, {f.num_embeddings}) declared by the "
                      "feature spec (raise num_embeddings or mark the field hashed)",
                column=f.name, row=base + _row_of_value(arr, f.multi_valued, i))
    for f in spec.dense:
        arr = table[f.name]
        if arr.null_count:
            raise InstanceLogError(path, "null value, expected a finite float32", column=f.name,
                                   row=base + _first(arr.is_null().to_numpy(zero_copy_only=False)))
        x = arr.to_numpy()
        bad = ~np.isfinite(x)
        if bad.any():
            row = _first(bad)
            raise InstanceLogError(path, f"{x[row]} is not finite, expected a finite float32",
                                   column=f.name, row=base + row)


def _row_of_value(arr: pa.Array, multi_valued: bool, value_index: int) -> int:
    """The row holding flattened value ``value_index`` of a (list) column."""
    if not multi_valued:
        return value_index
    offsets = arr.offsets.to_numpy()
    return int(np.searchsorted(offsets, value_index, side="right") - 1)


def validate_log(path: PathLike, spec: Optional[FeatureSpec] = None) -> LogSummary:
    """Check every file, column and row of a log against its spec; return its summary.

    Streams one row group at a time (memory: one row group plus 16 bytes per row for the
    instance-id uniqueness and user counts). Raises :class:`InstanceLogError` or
    :class:`SpecError` naming the file, column and first offending row. Reads only.
    """
    path = Path(path)
    files = log_files(path)
    spec = spec if spec is not None else FeatureSpec.load(path)
    ids: List[np.ndarray] = []
    users: List[np.ndarray] = []
    rows = 0
    ts_min, ts_max = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    time_sorted, last_ts = True, np.iinfo(np.int64).min
    label_sums = {k: 0.0 for k in spec.labels}
    sparse_lens = {f.name: 0.0 for f in spec.sparse}
    dense_sums = {f.name: 0.0 for f in spec.dense}
    for file in files:
        pf = open_parquet(file)
        _check_schema(file, pf.schema_arrow, spec)
        base = 0
        for g in range(pf.num_row_groups):
            try:
                table = pf.read_row_group(g)
            except (OSError, pa.ArrowException) as e:
                raise InstanceLogError(file, f"unreadable or corrupted Parquet data in row group "
                                             f"{g} ({e})", row=base) from None
            _check_batch(file, table, spec, base)
            n = table.num_rows
            ts = table[TS].to_numpy()
            if n:
                ts_min, ts_max = min(ts_min, int(ts.min())), max(ts_max, int(ts.max()))
                time_sorted = time_sorted and ts[0] >= last_ts and bool((np.diff(ts) >= 0).all())
                last_ts = int(ts[-1])
            ids.append(table[INSTANCE_ID].to_numpy())
            users.append(table[USER_ID].to_numpy())
            for k in spec.labels:
                label_sums[k] += float(pc.sum(table[k].cast(pa.float64())).as_py() or 0.0)
            for f in spec.sparse:
                col = table[f.name]
                sparse_lens[f.name] += (float(pc.sum(pc.list_value_length(col)).as_py() or 0)
                                        if f.multi_valued else n - col.null_count)
            for f in spec.dense:
                dense_sums[f.name] += float(pc.sum(table[f.name].cast(pa.float64())).as_py() or 0)
            base += n
            rows += n
    if rows == 0:
        raise InstanceLogError(path, "empty input: the log has no rows")
    _check_unique_ids(files, ids)
    return LogSummary(
        path=str(path), files=len(files), rows=rows,
        users=int(np.unique(np.concatenate(users)).size),
        ts_min=int(ts_min), ts_max=int(ts_max), time_sorted=time_sorted,
        label_rates={k: v / rows for k, v in label_sums.items()},
        sparse_mean_lengths={k: v / rows for k, v in sparse_lens.items()},
        dense_means={k: v / rows for k, v in dense_sums.items()},
    )


def _check_unique_ids(files: List[Path], ids_per_group: List[np.ndarray]) -> None:
    ids = np.concatenate(ids_per_group)
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if dup.size == 0:
        return
    # Report the second occurrence (in file order) of the smallest duplicated position.
    second = int(order[dup + 1].min())
    value = ids[second]
    first = int(np.flatnonzero(ids == value)[0])
    file_rows = _file_row_counts(files)
    f2, r2 = _locate(files, file_rows, second)
    f1, r1 = _locate(files, file_rows, first)
    raise InstanceLogError(f2, f"duplicate instance_id {value} (first seen in {f1.name} row {r1})",
                           column=INSTANCE_ID, row=r2)


def _file_row_counts(files: List[Path]) -> np.ndarray:
    return np.array([open_parquet(f).metadata.num_rows for f in files], dtype=np.int64)


def _locate(files: List[Path], file_rows: np.ndarray, global_row: int) -> Tuple[Path, int]:
    starts = np.concatenate([[0], np.cumsum(file_rows)])
    i = int(np.searchsorted(starts, global_row, side="right") - 1)
    return files[i], int(global_row - starts[i])
