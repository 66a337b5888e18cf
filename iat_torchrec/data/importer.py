"""Import a user's own CSV or Parquet log into the canonical instance-log format.

The source holds one row per instance; a feature spec (JSON, :meth:`FeatureSpec.load`) says which
columns are labels, sparse and dense fields. The importer renames the key columns
(``--user_column userId``), parses multi-valued fields given in CSV as delimiter-separated ids
(``"3|17|4"``, empty = no ids), casts every column to the canonical schema (int64 ids and seconds,
0/1 labels, float32 dense), assigns ``instance_id`` by ``(ts, user_id)`` order when the source has
none, writes the rows sorted by ``(ts, instance_id)`` through :class:`LogWriter` (atomically), and
finally runs :func:`validate_log` on the output and returns its summary.

Hashed sparse fields are left as raw int64 ids (the reader hashes them into buckets); the ids of
the other sparse fields must already lie in ``[0, num_embeddings)``.

Memory: a CSV source is read whole, once. A Parquet source is read twice one row group at a time:
first its key columns only (24 bytes a row) to find the order, then, when it is already in
``(ts, instance_id)`` order (or ``(ts, user_id)`` order when instance ids are assigned), every row
group is converted and written as it is read. A Parquet source in any other order is converted
into memory whole and sorted before writing.

Errors (:class:`SourceFormatError`) name the file, the column and the row (for CSV, the line).
"""

from __future__ import annotations

import csv as _csv
import dataclasses
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from iat_torchrec.data.log import (
    DEFAULT_ROWS_PER_FILE,
    LogSummary,
    LogWriter,
    license_files,
    validate_log,
)
from iat_torchrec.data.spec import INSTANCE_ID, TS, USER_ID, FeatureSpec, SparseField

PathLike = Union[str, os.PathLike]

__all__ = [
    "SourceFormatError",
    "ImportConfig",
    "check_output_path",
    "import_log",
    "read_delimited",
]


class SourceFormatError(ValueError):
    """A source file that cannot be imported; the message names file, line or row, and column."""

    def __init__(self, path: PathLike, message: str, *, line: Optional[int] = None,
                 row: Optional[int] = None, column: Optional[str] = None) -> None:
        self.path, self.line, self.row, self.column = str(path), line, row, column
        self.message = message
        where = [self.path]
        if line is not None:
            where.append(f"line {line}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}")


# =========================================================================== delimited text
_UNIT_SEPARATOR = "\x1f"  # stands in for multi-character delimiters such as MovieLens' '::'


def _header(path: Path, delimiter: str, encoding: str) -> List[str]:
    with open(path, "rb") as f:
        first = f.readline()
    text = first.decode(encoding, errors="replace").lstrip("\ufeff").rstrip("\r\n")
    if not text:
        raise SourceFormatError(path, "empty file: expected a header line with column names",
                                line=1)
    if len(delimiter) > 1:
        return [c.strip() for c in text.split(delimiter)]
    return [c.strip() for c in next(_csv.reader([text], delimiter=delimiter))]


def _type_words(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "an integer"
    if pa.types.is_floating(t):
        return "a number"
    return str(t)


def _first_bad_cast(values: pa.Array, to: pa.DataType) -> Optional[int]:
    """Index of the first value of a string array that does not cast to ``to`` (bisection)."""
    def ok(a: pa.Array) -> bool:
        try:
            pc.cast(a, to, safe=True)
            return True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return False

    if ok(values):
        return None
    lo, hi = 0, len(values)  # the first bad value lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(values.slice(lo, mid - lo)):
            lo = mid
        else:
            hi = mid
    return lo


def read_delimited(path: PathLike, *, delimiter: str = ",",
                   column_names: Optional[Sequence[str]] = None,
                   column_types: Optional[Dict[str, pa.DataType]] = None,
                   required: Sequence[str] = (), include: Optional[Sequence[str]] = None,
                   encoding: str = "utf8", quoting: bool = True) -> pa.Table:
    """Read a delimited text file with pyarrow, with errors that name the file, line and column.

    ``column_names`` given means the file has no header line. ``required`` columns must be in the
    header; ``include`` restricts the columns read (default: all). ``delimiter`` may have several
    characters (``"::"``). Declared ``column_types`` must not be empty (null) anywhere.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceFormatError(path, "file not found")
    column_types = dict(column_types or {})
    if column_names is None:
        names = _header(path, delimiter, encoding)
        missing = [c for c in required if c not in names]
        if missing:
            raise SourceFormatError(
                path, f"missing column{'s' if len(missing) > 1 else ''} {missing} in the header "
                      f"line (expected at least {list(required)}, found {names})", line=1)
        header_lines = 1
    else:
        names = list(column_names)
        header_lines = 0
    include = [c for c in (include if include is not None else names)]

    if len(delimiter) > 1:
        data = path.read_bytes().replace(delimiter.encode(encoding), _UNIT_SEPARATOR.encode())
        source_fn: Callable[[], object] = lambda: pa.BufferReader(data)
        sep = _UNIT_SEPARATOR
    else:
        source_fn = lambda: str(path)
        sep = delimiter

    def read(types: Dict[str, pa.DataType], threads: bool = True, handler=None) -> pa.Table:
        ropts = pacsv.ReadOptions(encoding=encoding, use_threads=threads,
                                  column_names=None if header_lines else names)
        popts = pacsv.ParseOptions(delimiter=sep, quote_char='"' if quoting else False,
                                   invalid_row_handler=handler)
        copts = pacsv.ConvertOptions(column_types=types, include_columns=include,
                                     strings_can_be_null=False)
        return pacsv.read_csv(source_fn(), read_options=ropts, parse_options=popts,
                              convert_options=copts)

    try:
        table = read(column_types)
    except pa.ArrowInvalid as e:
        msg = str(e)
        if "parse error" in msg.lower():
            bad: List[object] = []

            def handler(row: object) -> str:
                if not bad:
                    bad.append(row)
                return "skip"

            try:
                read({c: pa.string() for c in include}, threads=False, handler=handler)
            except pa.ArrowInvalid:
                pass
            if bad:
                r = bad[0]
                text = str(getattr(r, "text", "")).replace(_UNIT_SEPARATOR, delimiter)
                raise SourceFormatError(
                    path, f"malformed line: expected {getattr(r, 'expected_columns', '?')} fields "
                          f"separated by {delimiter!r}, got {getattr(r, 'actual_columns', '?')}: "
                          f"{text[:200]!r}", line=getattr(r, "number", None)) from None
            raise SourceFormatError(path, f"malformed file ({msg})") from None
        # A conversion error: find the first value that does not convert.
        try:
            strings = read({c: pa.string() for c in include})
        except pa.ArrowInvalid:
            raise SourceFormatError(path, f"malformed file ({msg})") from None
        for col, t in column_types.items():
            if col not in strings.column_names:
                continue
            arr = strings[col].combine_chunks()
            i = _first_bad_cast(pc.utf8_trim_whitespace(arr), t)
            if i is not None:
                raise SourceFormatError(
                    path, f"expected {_type_words(t)}, got {arr[i].as_py()!r}",
                    line=i + 1 + header_lines, column=col) from None
        raise SourceFormatError(path, f"malformed file ({msg})") from None
    for col in column_types:
        if col in table.column_names and table[col].null_count:
            i = int(np.flatnonzero(table[col].is_null().to_numpy(zero_copy_only=False))[0])
            raise SourceFormatError(path, f"empty value, expected {_type_words(column_types[col])}",
                                    line=i + 1 + header_lines, column=col)
    return table


def check_output_path(source: Path, output: Path) -> None:
    """Refuse an output that is, lies inside (for a directory source) or contains the source,
    so that writing (or overwriting) the output can never touch the source."""
    s, o = source.resolve(), output.resolve()
    if s == o:
        raise ValueError(f"{output}: the output must differ from the source")
    if source.is_dir() and o.is_relative_to(s):
        raise ValueError(f"{output}: the output must not lie inside the source directory")
    if s.is_relative_to(o):
        raise ValueError(f"{output}: the output must not contain the source {source}")


# =========================================================================== configuration
@dataclasses.dataclass
class ImportConfig:
    """Import a CSV or Parquet log into the canonical instance-log format."""

    source: str = dataclasses.field(metadata={"help": "CSV file, Parquet file or directory of "
                                                      "Parquet files"})
    spec: str = dataclasses.field(metadata={"help": "feature spec JSON (FeatureSpec.load)"})
    output: str = dataclasses.field(metadata={"help": "instance log directory to write"})
    overwrite: bool = dataclasses.field(default=False,
                                        metadata={"help": "replace an existing output"})
    user_column: str = dataclasses.field(default=USER_ID,
                                         metadata={"help": "source column holding the user id"})
    ts_column: str = dataclasses.field(default=TS,
                                       metadata={"help": "source column holding the timestamp"})
    instance_id_column: str = dataclasses.field(
        default=INSTANCE_ID, metadata={"help": "source column holding instance ids; when absent "
                                               "ids are assigned in (ts, user_id) order"})
    ts_unit: str = dataclasses.field(default="s", metadata={
        "help": "unit of numeric timestamps in the source: s, ms, us or ns (stored as seconds)"})
    list_delimiter: str = dataclasses.field(
        default="|", metadata={"help": "separator of ids in multi-valued CSV fields"})
    csv_delimiter: str = dataclasses.field(default=",",
                                           metadata={"help": "CSV field separator"})
    rename: List[str] = dataclasses.field(default_factory=list, metadata={
        "help": "further renames, each SOURCE=TARGET (e.g. clicked=click)"})
    extra_files: List[str] = dataclasses.field(default_factory=list, metadata={
        "help": "files (licence, readme) to copy beside the log, in addition to LICENSE*/README* "
                "files found beside the source"})


_TS_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


# =========================================================================== column conversion
class _Where:
    """How to name a source position in an error: CSV lines or Parquet rows.

    ``index`` passed to :meth:`error` is a position in the converted array; ``row_map`` (when the
    array is a flattened list column) maps it to the row of the table first.
    """

    def __init__(self, path: Path, csv_lines: bool, base: int = 0,
                 row_map: Optional[np.ndarray] = None) -> None:
        self.path, self.csv_lines, self.base, self.row_map = path, csv_lines, base, row_map

    def mapped(self, row_map: np.ndarray) -> "_Where":
        return _Where(self.path, self.csv_lines, self.base, row_map)

    def error(self, message: str, column: str, index: int) -> SourceFormatError:
        if self.row_map is not None:
            index = int(self.row_map[index])
        if self.csv_lines:
            return SourceFormatError(self.path, message, line=self.base + index + 2, column=column)
        return SourceFormatError(self.path, message, row=self.base + index, column=column)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _null_check(arr: pa.Array, where: _Where, column: str, what: str) -> None:
    if arr.null_count:
        raise where.error(f"missing value (empty, null or NaN), expected {what}", column,
                          _first(arr.is_null().to_numpy(zero_copy_only=False)))


def _strings_to(arr: pa.Array, to: pa.DataType, where: _Where, column: str,
                what: str) -> pa.Array:
    arr = pc.utf8_trim_whitespace(arr)
    try:
        return pc.cast(arr, to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        i = _first_bad_cast(arr, to)
        raise where.error(f"expected {what}, got {arr[i].as_py()!r}", column,
                          i if i is not None else 0) from None


def _to_int64(arr: pa.Array, where: _Where, column: str, what: str = "an integer id") -> np.ndarray:
    """Any integer, integral float, bool or numeric string column -> int64 numpy."""
    _null_check(arr, where, column, what)
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        arr = _strings_to(arr, pa.int64(), where, column, what)
        t = arr.type
    if pa.types.is_boolean(t):
        return arr.to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_integer(t):
        x = arr.to_numpy(zero_copy_only=False)
        if x.dtype == np.uint64 and (x > np.iinfo(np.int64).max).any():
            i = _first(x > np.iinfo(np.int64).max)
            raise where.error(f"{x[i]} does not fit in int64", column, i)
        return x.astype(np.int64, copy=False)
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(x) | (x != np.floor(x)) | (np.abs(x) >= 2.0 ** 63)
        if bad.any():
            i = _first(bad)
            raise where.error(f"expected {what}, got {float(x[i])!r}", column, i)
        return x.astype(np.int64)
    raise where.error(f"expected {what}, got values of type {t}", column, 0)


def _to_ts(arr: pa.Array, where: _Where, unit: int) -> np.ndarray:
    """Timestamps -> int64 seconds (numeric values in ``unit`` per second; floors fractions)."""
    _null_check(arr, where, TS, "a timestamp")
    t = arr.type
    if pa.types.is_timestamp(t):
        per_s = _TS_UNITS[t.unit]
        x = arr.cast(pa.int64()).to_numpy(zero_copy_only=False)
        return np.floor_divide(x, per_s)
    if pa.types.is_date(t):
        return arr.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy(zero_copy_only=False)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            arr = pc.cast(pc.utf8_trim_whitespace(arr), pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            arr = _strings_to(arr, pa.float64(), where, TS, "a timestamp")
        t = arr.type
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        if not np.isfinite(x).all():
            i = _first(~np.isfinite(x))
            raise where.error(f"expected a timestamp, got {float(x[i])!r}", TS, i)
        x = np.floor(x / unit)
        return x.astype(np.int64)
    x = _to_int64(arr, where, TS, "a timestamp")
    return np.floor_divide(x, unit) if unit != 1 else x


def _check_ts(ts: np.ndarray, where: _Where) -> None:
    if ts.size and (ts < 0).any():
        i = _first(ts < 0)
        raise where.error(f"negative timestamp {ts[i]}, expected seconds >= 0", TS, i)


def _to_label(arr: pa.Array, where: _Where, column: str) -> np.ndarray:
    _null_check(arr, where, column, "a 0/1 label")
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        low = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
        if pc.all(pc.is_in(low, pa.array(["true", "false"]))).as_py():
            arr = pc.equal(low, "true")
        else:
            arr = _strings_to(arr, pa.float64(), where, column, "a 0/1 label")
    x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~((x == 0) | (x == 1))
    if bad.any():
        i = _first(bad)
        raise where.error(f"label {float(x[i])!r} is not 0 or 1", column, i)
    return x.astype(np.int8)


def _to_dense(arr: pa.Array, where: _Where, column: str) -> np.ndarray:
    _null_check(arr, where, column, "a finite number")
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = _strings_to(arr, pa.float64(), where, column, "a number")
    try:
        x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise where.error(f"expected a number, got values of type {arr.type}", column, 0) from None
    bad = ~np.isfinite(x) | (np.abs(x) > np.finfo(np.float32).max)
    if bad.any():
        i = _first(bad)
        raise where.error(f"{float(x[i])!r} is not a finite float32", column, i)
    return x.astype(np.float32)


def _check_ids(ids: np.ndarray, f: SparseField, where: _Where, row_of: Callable[[int], int]) -> None:
    if f.hashed or ids.size == 0:
        return
    bad = (ids < 0) | (ids >= f.num_embeddings)
    if bad.any():
        i = _first(bad)
        raise where.error(f"id {ids[i]} outside the vocabulary [0, {f.num_embeddings}) declared by "
                          "the feature spec (raise num_embeddings or mark the field hashed)",
                          f.name, row_of(i))


def _to_list(arr: pa.Array, f: SparseField, where: _Where, list_delimiter: str) -> pa.Array:
    """A multi-valued field: a list column, delimiter-separated id strings, or single ids."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    n = len(arr)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        arr = arr.fill_null("")
        parts = pc.split_pattern(arr, pattern=list_delimiter)
        lengths = pc.list_value_length(parts).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.utf8_trim_whitespace(pc.list_flatten(parts))
        keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
        rows = np.repeat(np.arange(n), lengths)
        flat = flat.filter(pa.array(keep))
        rows = rows[keep]
        lengths = np.bincount(rows, minlength=n).astype(np.int64)
        try:
            values = pc.cast(flat, pa.int64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            i = _first_bad_cast(flat, pa.int64())
            i = 0 if i is None else i
            raise where.error(f"expected integer ids separated by {list_delimiter!r}, got "
                              f"{flat[i].as_py()!r} in {arr[int(rows[i])].as_py()!r}",
                              f.name, int(rows[i])) from None
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        lengths = pc.list_value_length(arr).fill_null(0).to_numpy(
            zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(arr)
        rows = np.repeat(np.arange(n), lengths)
        if flat.null_count:
            i = _first(flat.is_null().to_numpy(zero_copy_only=False))
            raise where.error("null id inside a list, expected int64 ids", f.name, int(rows[i]))
        values = _to_int64(flat, where.mapped(rows), f.name)
    else:  # single ids given for a multi-valued field: one-element lists (null = empty)
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        lengths = valid.astype(np.int64)
        rows = np.flatnonzero(valid)
        values = _to_int64(arr.filter(pa.array(valid)), where, f.name) if rows.size else \
            np.zeros(0, np.int64)
    _check_ids(values, f, where, lambda i: int(rows[i]))
    offsets = np.zeros(n + 1, dtype=np.int32 if values.size < 2 ** 31 else np.int64)
    np.cumsum(lengths, out=offsets[1:])
    list_type = pa.list_(pa.int64()) if offsets.dtype == np.int32 else pa.large_list(pa.int64())
    return pa.Array.from_buffers(list_type, n, [None, pa.py_buffer(offsets)],
                                 children=[pa.array(values, pa.int64())])


# =========================================================================== the importer
@dataclasses.dataclass
class _Plan:
    spec: FeatureSpec
    source_of: Dict[str, str]  # canonical column -> source column
    has_instance_id: bool
    ts_unit: int
    list_delimiter: str


def _rename_map(user_column: str, ts_column: str, instance_id_column: str,
                rename: Sequence[str]) -> Dict[str, str]:
    """canonical (target) name -> source name."""
    out = {USER_ID: user_column, TS: ts_column, INSTANCE_ID: instance_id_column}
    for item in rename:
        if "=" not in item:
            raise ValueError(f"rename {item!r}: expected SOURCE=TARGET")
        src, dst = (s.strip() for s in item.split("=", 1))
        if not src or not dst:
            raise ValueError(f"rename {item!r}: expected SOURCE=TARGET")
        out[dst] = src
    return out


def _plan(path: Path, source_columns: Sequence[str], spec: FeatureSpec,
          names: Dict[str, str], ts_unit: str, list_delimiter: str) -> _Plan:
    source_of = {c: names.get(c, c) for c in spec.columns}
    has_iid = source_of[INSTANCE_ID] in source_columns
    missing = [(c, s) for c, s in source_of.items()
               if s not in source_columns and not (c == INSTANCE_ID)]
    if missing:
        c, s = missing[0]
        hint = {USER_ID: " (name the source column with --user_column)",
                TS: " (name the source column with --ts_column)"}.get(c, "")
        what = f"column {s!r}" + (f" (for {c!r})" if s != c else "")
        raise SourceFormatError(path, f"missing {what} required by the feature spec{hint}; "
                                      f"the source has columns {list(source_columns)}")
    if ts_unit not in _TS_UNITS:
        raise ValueError(f"ts_unit {ts_unit!r}: expected one of {sorted(_TS_UNITS)}")
    if not list_delimiter:
        raise ValueError("list_delimiter must not be empty")
    return _Plan(spec, source_of, has_iid, _TS_UNITS[ts_unit], list_delimiter)


def _convert(table: pa.Table, plan: _Plan, where: _Where) -> pa.Table:
    """Source table (source names) -> canonical table (instance_id taken or left as -1)."""
    def col(name: str) -> pa.Array:
        return table[plan.source_of[name]].combine_chunks()

    n = table.num_rows
    out: Dict[str, pa.Array] = {}
    if plan.has_instance_id:
        out[INSTANCE_ID] = pa.array(_to_int64(col(INSTANCE_ID), where, INSTANCE_ID), pa.int64())
    else:
        out[INSTANCE_ID] = pa.array(np.full(n, -1, np.int64))
    out[USER_ID] = pa.array(_to_int64(col(USER_ID), where, USER_ID, "an integer user id"),
                            pa.int64())
    ts = _to_ts(col(TS), where, plan.ts_unit)
    _check_ts(ts, where)
    out[TS] = pa.array(ts, pa.int64())
    for name in plan.spec.labels:
        out[name] = pa.array(_to_label(col(name), where, name), pa.int8())
    for f in plan.spec.sparse:
        if f.multi_valued:
            out[f.name] = _to_list(col(f.name), f, where, plan.list_delimiter)
        else:
            ids = _to_int64(col(f.name), where, f.name)
            _check_ids(ids, f, where, lambda i: i)
            out[f.name] = pa.array(ids, pa.int64())
    for f in plan.spec.dense:
        out[f.name] = pa.array(_to_dense(col(f.name), where, f.name), pa.float32())
    return pa.table(out)


def _order(ts: np.ndarray, users: np.ndarray, iid: Optional[np.ndarray]) -> np.ndarray:
    """Write order: (ts, instance_id), or (ts, user_id, source position) when ids are assigned."""
    if iid is not None:
        return np.lexsort((iid, ts))
    return np.lexsort((np.arange(ts.size), users, ts))


def _check_unique(iid_sorted: np.ndarray, order: np.ndarray,
                  locate: Callable[[int], Tuple[Path, int]], csv_lines: bool) -> None:
    """Raise on a repeated instance id; ``iid_sorted[k]`` is the id of source row ``order[k]``;
    ``locate`` maps a source row to (file, row in that file)."""
    by_id = np.argsort(iid_sorted, kind="stable")
    s = iid_sorted[by_id]
    dup = np.flatnonzero(s[1:] == s[:-1])
    if dup.size:
        a, b = sorted((int(order[by_id[dup[0]]]), int(order[by_id[dup[0] + 1]])))
        pa_, ra = locate(a)
        pb, rb = locate(b)
        first = f"{pa_.name} {'line' if csv_lines else 'row'} {ra + 2 if csv_lines else ra}"
        if csv_lines:
            raise SourceFormatError(pb, f"duplicate instance_id {s[dup[0]]} (first seen at {first})",
                                    line=rb + 2, column=INSTANCE_ID)
        raise SourceFormatError(pb, f"duplicate instance_id {s[dup[0]]} (first seen at {first})",
                                row=rb, column=INSTANCE_ID)


def _parquet_files(path: Path) -> List[Path]:
    if path.is_dir():
        files = sorted(f for f in path.glob("*.parquet") if not f.name.startswith("."))
        if not files:
            raise SourceFormatError(path, "no .parquet files in this directory")
        return files
    return [path]


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise SourceFormatError(path, f"unreadable Parquet file ({e})") from None


def _source_kind(path: Path) -> str:
    if not path.exists():
        raise SourceFormatError(path, "source not found")
    if path.is_dir():
        return "parquet"
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    raise SourceFormatError(path, f"unrecognised source type {suffix!r}: expected a .csv file, a "
                                  ".parquet file or a directory of .parquet files")


def import_log(source: PathLike, spec: Union[PathLike, FeatureSpec], output: PathLike, *,
               overwrite: bool = False, user_column: str = USER_ID, ts_column: str = TS,
               instance_id_column: str = INSTANCE_ID, ts_unit: str = "s",
               list_delimiter: str = "|", csv_delimiter: str = ",",
               rename: Sequence[str] = (), extra_files: Sequence[PathLike] = (),
               rows_per_file: int = DEFAULT_ROWS_PER_FILE) -> LogSummary:
    """Import ``source`` (CSV, Parquet file, or directory of Parquet files) as an instance log.

    Keyword names match :class:`ImportConfig` (``import_log(**dataclasses.asdict(cfg))``).
    Returns :func:`validate_log`'s summary of the written log.
    """
    src = Path(source)
    out = Path(output)
    feature_spec = spec if isinstance(spec, FeatureSpec) else FeatureSpec.load(spec)
    check_output_path(src, out)
    names = _rename_map(user_column, ts_column, instance_id_column, rename)
    kind = _source_kind(src)
    carried = [*license_files(src), *(Path(f) for f in extra_files)]
    if src.is_file() and src in carried:
        carried.remove(src)
    for f in carried:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: extra file not found")
    # Unique by name: a later file of the same name would overwrite an earlier one.
    carried = list({f.name: f for f in carried}.values())
    writer_kwargs = dict(overwrite=overwrite, rows_per_file=rows_per_file, extra_files=carried,
                         provenance={"source": "import", "path": str(src.resolve()),
                                     "user_column": user_column, "ts_column": ts_column,
                                     "instance_id_column": instance_id_column,
                                     "ts_unit": ts_unit, "rename": list(rename)})

    if kind == "csv":
        _import_csv(src, feature_spec, names, ts_unit, list_delimiter, csv_delimiter, out,
                    writer_kwargs)
    else:
        _import_parquet(src, feature_spec, names, ts_unit, list_delimiter, out, writer_kwargs)
    return validate_log(out, feature_spec)


_WRITE_CHUNK = 1_000_000


def _write_sorted(table: pa.Table, order: np.ndarray, out: Path, spec: FeatureSpec,
                  writer_kwargs: dict) -> None:
    with LogWriter(out, spec, **writer_kwargs) as w:
        for start in range(0, table.num_rows, _WRITE_CHUNK):
            w.write(table.take(pa.array(order[start:start + _WRITE_CHUNK])))


def _import_csv(src: Path, spec: FeatureSpec, names: Dict[str, str], ts_unit: str,
                list_delimiter: str, csv_delimiter: str, out: Path, writer_kwargs: dict) -> None:
    header = _header(src, csv_delimiter, "utf8")
    plan = _plan(src, header, spec, names, ts_unit, list_delimiter)
    include = [plan.source_of[c] for c in spec.columns
               if c != INSTANCE_ID or plan.has_instance_id]
    # Multi-valued fields are read as text and split here; the rest is inferred, then cast.
    types = {plan.source_of[f.name]: pa.string() for f in spec.sparse if f.multi_valued}
    table = read_delimited(src, delimiter=csv_delimiter, include=include,
                           column_types=types)
    where = _Where(src, csv_lines=True)
    canon = _convert(table, plan, where)
    del table
    ts = canon[TS].to_numpy()
    users = canon[USER_ID].to_numpy()
    iid = canon[INSTANCE_ID].to_numpy() if plan.has_instance_id else None
    order = _order(ts, users, iid)
    if iid is not None:
        _check_unique(iid[order], order, lambda i: (src, i), csv_lines=True)
    else:
        assigned = np.empty(ts.size, np.int64)
        assigned[order] = np.arange(ts.size, dtype=np.int64)
        canon = canon.set_column(0, INSTANCE_ID, pa.array(assigned))
    _write_sorted(canon, order, out, spec, writer_kwargs)


def _import_parquet(src: Path, spec: FeatureSpec, names: Dict[str, str], ts_unit: str,
                    list_delimiter: str, out: Path, writer_kwargs: dict) -> None:
    files = _parquet_files(src)
    pfs = [_open(f) for f in files]
    plan = _plan(files[0], pfs[0].schema_arrow.names, spec, names, ts_unit, list_delimiter)
    for f, pf in zip(files[1:], pfs[1:]):
        _plan(f, pf.schema_arrow.names, spec, names, ts_unit, list_delimiter)
        if (plan.source_of[INSTANCE_ID] in pf.schema_arrow.names) != plan.has_instance_id:
            raise SourceFormatError(f, f"column {plan.source_of[INSTANCE_ID]!r} is in some source "
                                       "files but not in others")
    source_cols = [plan.source_of[c] for c in spec.columns
                   if c != INSTANCE_ID or plan.has_instance_id]
    key_cols = [plan.source_of[c] for c in (INSTANCE_ID, USER_ID, TS)
                if c != INSTANCE_ID or plan.has_instance_id]

    def groups() -> Iterator[Tuple[Path, int, int, pq.ParquetFile]]:
        """(file, row group, first row of the group in its file, open file)."""
        for f, pf in zip(files, pfs):
            base = 0
            for g in range(pf.num_row_groups):
                yield f, g, base, pf
                base += pf.metadata.row_group(g).num_rows

    def read(pf: pq.ParquetFile, f: Path, g: int, cols: List[str]) -> pa.Table:
        try:
            return pf.read_row_group(g, columns=cols)
        except (OSError, pa.ArrowException) as e:
            raise SourceFormatError(f, f"unreadable Parquet data in row group {g} ({e})") from None

    # Pass 1: keys only, to find the write order.
    ts_parts, user_parts, iid_parts, starts = [], [], [], []
    global_row = 0
    for f, g, base, pf in groups():
        t = read(pf, f, g, key_cols)
        where = _Where(f, csv_lines=False, base=base)
        ts = _to_ts(t[plan.source_of[TS]].combine_chunks(), where, plan.ts_unit)
        _check_ts(ts, where)
        ts_parts.append(ts)
        user_parts.append(_to_int64(t[plan.source_of[USER_ID]].combine_chunks(), where, USER_ID,
                                    "an integer user id"))
        if plan.has_instance_id:
            iid_parts.append(_to_int64(t[plan.source_of[INSTANCE_ID]].combine_chunks(), where,
                                       INSTANCE_ID))
        starts.append((global_row, f, base))
        global_row += t.num_rows
    n = global_row
    ts_all = np.concatenate(ts_parts) if ts_parts else np.zeros(0, np.int64)
    users = np.concatenate(user_parts) if user_parts else np.zeros(0, np.int64)
    iid = np.concatenate(iid_parts) if plan.has_instance_id and iid_parts else None
    del ts_parts, user_parts, iid_parts
    order = _order(ts_all, users, iid)
    starts_arr = np.array([s[0] for s in starts] + [n], dtype=np.int64)

    def locate(i: int) -> Tuple[Path, int]:
        k = int(np.searchsorted(starts_arr, i, side="right") - 1)
        return starts[k][1], starts[k][2] + i - int(starts_arr[k])

    if iid is not None:
        _check_unique(iid[order], order, locate, csv_lines=False)
        assigned = None
    else:
        assigned = np.empty(n, np.int64)
        assigned[order] = np.arange(n, dtype=np.int64)
    in_order = bool((order == np.arange(n)).all())
    del ts_all, users, iid

    # Pass 2: convert every row group; stream when already in order.
    if in_order:
        with LogWriter(out, spec, **writer_kwargs) as w:
            row = 0
            for f, g, base, pf in groups():
                t = _convert(read(pf, f, g, source_cols), plan, _Where(f, False, base))
                if assigned is not None:
                    t = t.set_column(0, INSTANCE_ID, pa.array(assigned[row:row + t.num_rows]))
                row += t.num_rows
                w.write(t)
        return
    parts = [_convert(read(pf, f, g, source_cols), plan, _Where(f, False, base))
             for f, g, base, pf in groups()]
    table = pa.concat_tables(parts)
    del parts
    if assigned is not None:
        table = table.set_column(0, INSTANCE_ID, pa.array(assigned))
    _write_sorted(table, order, out, spec, writer_kwargs)
