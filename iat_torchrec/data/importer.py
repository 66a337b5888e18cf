"""Import a user's own CSV or Parquet log into the canonical instance-log format.

The source holds one row per instance; a feature spec (JSON, :meth:`FeatureSpec.load`) says which
columns are labels, sparse and dense fields. The importer renames the key columns
(``--user_column userId``), parses multi-valued fields given in CSV as delimiter-separated ids
(``"3|17|4"``, empty = no ids), casts every column to the canonical schema (int64 ids and seconds,
0/1 labels, float32 dense), assigns ``instance_id`` by ``(ts, user_id)`` order when the source has
none, writes the rows sorted by ``(ts, instance_id)`` through :class:`LogWriter` (atomically), and
finally runs :func:`validate_log` on the output.

Ids (:mod:`iat_torchrec.data.vocab`): a field with ``vocabulary`` maps its raw ids (text or any
integer) through a vocabulary built on the training window (the first ``vocab_fraction`` of the
rows in time order), or reused from an earlier import (``vocab_from``); ids it lacks get the
unknown id 0 and are counted. A hashed field keeps integer ids raw and turns other text into
:func:`stable_hash64` (the reader maps raw ids into buckets). Other sparse fields need integer
ids in ``[0, num_embeddings)``. User ids given as text go through a growing user vocabulary.
The vocabularies and the dense means used are saved in the log's ``vocab/`` folder.

Missing values follow each field's ``missing`` policy (:class:`Missing`); without one they are an
error. The :class:`ImportReport` counts unknown ids and filled values per field.

Memory: the key columns (24 bytes a row) are read first to find the order; when the source is
already in that order every part (the CSV, read whole, or a Parquet row group) is converted and
written as it is read, else the converted source is held whole and sorted before writing.

Errors (:class:`SourceFormatError`) name the file, the column and the row (for CSV, the line).
"""

from __future__ import annotations

import csv as _csv
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from iat_torchrec.data.log import (
    DEFAULT_ROWS_PER_FILE,
    LogSummary,
    LogWriter,
    license_files,
    validate_log,
)
from iat_torchrec.config import ConfigError
from iat_torchrec.atomic import atomic_output
from iat_torchrec.data.infer import Inferred, infer_spec
from iat_torchrec.data.spec import (INSTANCE_ID, TS, USER_ID, DenseField, FeatureSpec, Missing,
                                    SparseField)
from iat_torchrec.data.vocab import (VOCAB_DIR, KeyCounter, Vocabulary, as_keys,
                                     load_vocabularies, save_vocabularies, stable_hash64)

PathLike = Union[str, os.PathLike]

__all__ = [
    "SourceFormatError",
    "ImportConfig",
    "ImportReport",
    "run_import",
    "write_inferred_spec",
    "output_spec",
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
        raise ConfigError(f"{output}: the output must differ from the source")
    if source.is_dir() and o.is_relative_to(s):
        raise ConfigError(f"{output}: the output must not lie inside the source directory")
    if s.is_relative_to(o):
        raise ConfigError(f"{output}: the output must not contain the source {source}")


# =========================================================================== configuration
@dataclasses.dataclass
class ImportConfig:
    """Import a CSV or Parquet log into the canonical instance-log format."""

    source: str = dataclasses.field(metadata={"help": "CSV file, Parquet file or directory of "
                                                      "Parquet files"})
    spec: str = dataclasses.field(metadata={"help": "feature spec JSON (FeatureSpec.load)"})
    output: str = dataclasses.field(default="", metadata={
        "help": "instance log directory to write (required unless --infer)"})
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
    vocab_from: str = dataclasses.field(default="", metadata={
        "help": "a log imported before: reuse its vocabularies and dense means (vocab/) so that "
                "the same raw id gets the same row; user ids it lacks are appended"})
    infer: bool = dataclasses.field(default=False, metadata={
        "help": "propose a spec from the source (iat_torchrec.data.infer), write it to --spec "
                "for review and stop"})
    labels: List[str] = dataclasses.field(default_factory=list, metadata={
        "help": "--infer: the label columns (default: 0/1 columns named like a label)"})
    groups: List[str] = dataclasses.field(default_factory=list, metadata={
        "help": "--infer: feature groups, each NAME=GROUP (user, item, context, cross); the "
                "rest from name hints"})
    dry_run: bool = dataclasses.field(default=False, metadata={
        "help": "import into a temporary folder, report what would be imported, keep nothing"})
    vocab_fraction: float = dataclasses.field(default=1.0, metadata={
        "help": "the training window: vocabularies and dense means are built on this first "
                "fraction of the rows in time order (set it to the train split's fraction)"})


_TS_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


# =========================================================================== column conversion
_CSV_PART_ROWS = 1 << 18  # rows of a CSV source converted at a time


class _Where:
    """How to name a source position in an error: CSV lines or Parquet rows.

    ``index`` passed to :meth:`error` is a position in the converted array; ``row_map`` (when the
    array is a flattened list column) maps it to the row of the table first.
    """

    def __init__(self, path: Path, csv_lines: bool, base: int = 0,
                 row_map: Optional[np.ndarray] = None,
                 names: Optional[Mapping[str, str]] = None) -> None:
        self.path, self.csv_lines, self.base, self.row_map = path, csv_lines, base, row_map
        self.names = dict(names or {})  # log column -> the source's own name, for errors

    def mapped(self, row_map: np.ndarray) -> "_Where":
        return _Where(self.path, self.csv_lines, self.base, row_map, self.names)

    def error(self, message: str, column: str, index: int) -> SourceFormatError:
        if self.row_map is not None:
            index = int(self.row_map[index])
        column = self.names.get(column, column)
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


_TS_TEXT_TYPES = (pa.int64(), pa.float64(),
                  *(pa.timestamp(u, tz) for u in ("s", "ns") for tz in (None, "UTC")))


def _to_ts(arr: pa.Array, where: _Where, unit: int) -> np.ndarray:
    """Timestamps -> int64 seconds: numbers in ``unit`` per second (fractions floored), Arrow
    timestamps and dates, or ISO-8601 text (``2024-05-01T12:00:00``, read as UTC, or with an
    offset or ``Z``)."""
    _null_check(arr, where, TS, "a timestamp")
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        arr = pc.utf8_trim_whitespace(arr)
        for to in _TS_TEXT_TYPES:
            try:
                arr = pc.cast(arr, to)
                break
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
        else:  # the bad value: the first one the format of the longest parsed prefix fails on
            i = max(_first_bad_cast(arr, to) for to in _TS_TEXT_TYPES)
            raise where.error("expected a timestamp (a number of seconds, or ISO-8601 such as "
                              f"2024-05-01T12:00:00), got {arr[i].as_py()!r}", TS, i)
        t = arr.type
    if pa.types.is_timestamp(t):
        per_s = _TS_UNITS[t.unit]
        x = arr.cast(pa.int64()).to_numpy(zero_copy_only=False)
        return np.floor_divide(x, per_s)
    if pa.types.is_date(t):
        return arr.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy(zero_copy_only=False)
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


def _dense_values(arr: pa.Array, where: _Where, column: str) -> Tuple[np.ndarray, np.ndarray]:
    """A dense column as float64 and its mask of missing values (empty, null or NaN)."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = _strings_to(arr, pa.float64(), where, column, "a number")
    try:
        x = arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False).copy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise where.error(f"expected a number, got values of type {arr.type}", column, 0) from None
    missing = np.isnan(x)
    bad = ~missing & (~np.isfinite(x) | (np.abs(x) > np.finfo(np.float32).max))
    if bad.any():
        i = _first(bad)
        raise where.error(f"{float(x[i])!r} is not a finite float32", column, i)
    return x, missing


def _missing_error(where: _Where, column: str, index: int, what: str, hint: str) -> Exception:
    return where.error(f"missing value (empty, null or NaN), expected {what}; {hint}", column,
                       index)


def _check_ids(ids: np.ndarray, f: SparseField, where: _Where, row_of: Callable[[int], int]) -> None:
    if f.hashed or f.vocabulary or ids.size == 0:
        return
    bad = (ids < 0) | (ids >= f.num_embeddings)
    if bad.any():
        i = _first(bad)
        raise where.error(f"id {ids[i]} outside the vocabulary [0, {f.num_embeddings}) declared by "
                          "the feature spec (raise num_embeddings, mark the field hashed or give "
                          "it a vocabulary)", f.name, row_of(i))


def _list_tokens(arr: pa.Array, f: SparseField, where: _Where,
                 list_delimiter: str) -> Tuple[pa.Array, np.ndarray, np.ndarray]:
    """A multi-valued field's ids (a list column, delimiter-separated text, or single ids):
    the flat values, the row of each and the number per row."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    n = len(arr)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        parts = pc.split_pattern(arr.fill_null(""), pattern=list_delimiter)
        lengths = pc.list_value_length(parts).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.utf8_trim_whitespace(pc.list_flatten(parts))
        keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
        rows = np.repeat(np.arange(n), lengths)[keep]
        flat = flat.filter(pa.array(keep))
        if not (f.vocabulary or f.hashed) and len(flat):
            i = _first_bad_cast(flat, pa.int64())
            if i is not None:
                raise where.error(f"expected integer ids separated by {list_delimiter!r}, got "
                                  f"{flat[i].as_py()!r} in {arr[int(rows[i])].as_py()!r}",
                                  f.name, int(rows[i]))
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        lengths = pc.list_value_length(arr).fill_null(0).to_numpy(
            zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(arr)
        rows = np.repeat(np.arange(n), lengths)
        if flat.null_count:
            i = _first(flat.is_null().to_numpy(zero_copy_only=False))
            raise where.error("null id inside a list, expected ids", f.name, int(rows[i]))
    else:  # single ids given for a multi-valued field: one-element lists (null = empty)
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(valid)
        flat = arr.filter(pa.array(valid))
    return flat, rows, np.bincount(rows, minlength=n).astype(np.int64)


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.Array:
    n = lengths.size
    offsets = np.zeros(n + 1, dtype=np.int32 if values.size < 2 ** 31 else np.int64)
    np.cumsum(lengths, out=offsets[1:])
    list_type = pa.list_(pa.int64()) if offsets.dtype == np.int32 else pa.large_list(pa.int64())
    return pa.Array.from_buffers(list_type, n, [None, pa.py_buffer(offsets)],
                                 children=[pa.array(values, pa.int64())])


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


# Text of up to 18 digits always fits int64: a hashed field reads it as that integer.
_INTEGER_TEXT = r"^[+-]?[0-9]{1,18}$"


# =========================================================================== id mapping
@dataclasses.dataclass
class ImportReport:
    """What an import did beyond the log itself: vocabulary sizes, ids mapped to the unknown id
    because the vocabulary lacks them, and missing values filled, per column."""

    log: LogSummary
    vocabulary_sizes: Dict[str, int] = dataclasses.field(default_factory=dict)
    unknown_ids: Dict[str, int] = dataclasses.field(default_factory=dict)
    missing_filled: Dict[str, int] = dataclasses.field(default_factory=dict)

    def format(self) -> str:
        def line(title: str, items: Dict[str, int]) -> List[str]:
            return [f"  {title}: " + "  ".join(f"{k}={v:,}" for k, v in items.items())] \
                if items else []

        return "\n".join([self.log.format(), *line("vocabulary rows", self.vocabulary_sizes),
                          *line("ids not in the vocabulary (-> unknown id)", self.unknown_ids),
                          *line("missing values filled", self.missing_filled)])


@dataclasses.dataclass
class _Codes:
    """How raw values become stored ones: vocabularies (per vocabulary field, and ``user_id``
    when user ids are text), dense fill values; and the counts for the report."""

    vocabularies: Dict[str, Vocabulary]
    fill: Dict[str, float]
    means: Dict[str, float]
    unknown: Dict[str, int] = dataclasses.field(default_factory=dict)
    filled: Dict[str, int] = dataclasses.field(default_factory=dict)

    def count(self, counts: Dict[str, int], name: str, k: int) -> None:
        if k:
            counts[name] = counts.get(name, 0) + int(k)


def _sparse_ids(values: pa.Array, f: SparseField, codes: _Codes, where: _Where) -> np.ndarray:
    """One sparse field's values (single ids or a list's flat ids; ``where`` maps them to rows)
    -> int64 ids: through the vocabulary, hashed text, or the integers themselves."""
    if not (f.vocabulary or (f.hashed and _is_text(values.type))):
        ids = _to_int64(values, where, f.name)
        _check_ids(ids, f, where, lambda i: i)
        return ids
    keys = as_keys(values)
    missing = pc.or_kleene(keys.is_null(), pc.equal(keys, "")).fill_null(True).to_numpy(
        zero_copy_only=False)
    if missing.any():
        if f.missing is not Missing.UNKNOWN:
            raise _missing_error(where, f.name, _first(missing), "an id",
                                 "declare \"missing\": \"unknown\" for the field in the spec to "
                                 "map it to the unknown id")
        codes.count(codes.filled, f.name, missing.sum())
    if f.vocabulary:
        ids, unseen = codes.vocabularies[f.name].lookup(keys)
        codes.count(codes.unknown, f.name, (unseen & ~missing).sum())
        return ids
    keys = keys.fill_null("")
    integer = pc.match_substring_regex(keys, _INTEGER_TEXT).to_numpy(zero_copy_only=False)
    ids = stable_hash64(keys)
    if integer.any():
        ids[integer] = pc.cast(keys.filter(pa.array(integer)), pa.int64()).to_numpy()
    return ids


def _dense_column(arr: pa.Array, f: DenseField, codes: _Codes,
                  where: _Where) -> Tuple[np.ndarray, np.ndarray]:
    """float32 values (missing ones filled by the field's policy) and the missing mask."""
    x, missing = _dense_values(arr, where, f.name)
    if missing.any():
        if f.missing is Missing.ERROR:
            raise _missing_error(where, f.name, _first(missing), "a finite number",
                                 "declare \"missing\": \"mean\" or \"constant\" (with "
                                 "\"fill_value\") for the field in the spec to fill it")
        x[missing] = codes.fill[f.name]
        codes.count(codes.filled, f.name, missing.sum())
    return x.astype(np.float32), missing


# =========================================================================== the importer
@dataclasses.dataclass
class _Plan:
    spec: FeatureSpec
    source_of: Dict[str, str]  # canonical column -> source column
    has_instance_id: bool
    ts_unit: int
    list_delimiter: str


def output_spec(spec: FeatureSpec, vocabulary_sizes: Dict[str, int]) -> FeatureSpec:
    """The spec of the imported log: vocabulary fields sized to their vocabularies, a 0/1 dense
    field ``<name>_missing`` after each dense field that asks for one, no missing policies (the
    log has no missing values)."""
    sparse = [dataclasses.replace(f, missing=Missing.ERROR,
                                  num_embeddings=vocabulary_sizes.get(f.name, f.num_embeddings))
              for f in spec.sparse]
    dense: List[DenseField] = []
    for f in spec.dense:
        dense.append(dataclasses.replace(f, missing=Missing.ERROR, fill_value=0.0,
                                         missing_indicator=False))
        if f.missing_indicator:
            dense.append(DenseField(f.indicator_name, group=f.group))
    return dataclasses.replace(spec, sparse=sparse, dense=dense)


def _rename_map(user_column: str, ts_column: str, instance_id_column: str,
                rename: Sequence[str]) -> Dict[str, str]:
    """canonical (target) name -> source name."""
    out = {USER_ID: user_column, TS: ts_column, INSTANCE_ID: instance_id_column}
    for item in rename:
        if "=" not in item:
            raise ConfigError(f"rename {item!r}: expected SOURCE=TARGET")
        src, dst = (s.strip() for s in item.split("=", 1))
        if not src or not dst:
            raise ConfigError(f"rename {item!r}: expected SOURCE=TARGET")
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
        raise ConfigError(f"ts_unit {ts_unit!r}: expected one of {sorted(_TS_UNITS)}")
    if not list_delimiter:
        raise ConfigError("list_delimiter must not be empty")
    return _Plan(spec, source_of, has_iid, _TS_UNITS[ts_unit], list_delimiter)


def _user_keys(arr: pa.Array, where: _Where) -> pa.Array:
    keys = as_keys(arr)
    empty = pc.or_kleene(keys.is_null(), pc.equal(keys, "")).fill_null(True).to_numpy(
        zero_copy_only=False)
    if empty.any():
        raise where.error("missing value (empty or null), expected a user id", USER_ID,
                          _first(empty))
    return keys


def _users(arr: pa.Array, codes: _Codes, where: _Where) -> np.ndarray:
    if USER_ID in codes.vocabularies:
        return codes.vocabularies[USER_ID].lookup(_user_keys(arr, where))[0]
    return _to_int64(arr, where, USER_ID, "an integer user id")


def _convert(table: pa.Table, plan: _Plan, codes: _Codes, where: _Where) -> pa.Table:
    """Source table (source names) -> canonical table (instance_id taken or left as -1)."""
    def col(name: str) -> pa.Array:
        return table[plan.source_of[name]].combine_chunks()

    n = table.num_rows
    out: Dict[str, pa.Array] = {}
    if plan.has_instance_id:
        out[INSTANCE_ID] = pa.array(_to_int64(col(INSTANCE_ID), where, INSTANCE_ID), pa.int64())
    else:
        out[INSTANCE_ID] = pa.array(np.full(n, -1, np.int64))
    out[USER_ID] = pa.array(_users(col(USER_ID), codes, where), pa.int64())
    ts = _to_ts(col(TS), where, plan.ts_unit)
    _check_ts(ts, where)
    out[TS] = pa.array(ts, pa.int64())
    for name in plan.spec.labels:
        out[name] = pa.array(_to_label(col(name), where, name), pa.int8())
    for f in plan.spec.sparse:
        if f.multi_valued:
            flat, rows, lengths = _list_tokens(col(f.name), f, where, plan.list_delimiter)
            ids = _sparse_ids(flat, f, codes, where.mapped(rows)) if len(flat) else \
                np.zeros(0, np.int64)
            out[f.name] = _list_array(ids, lengths)
        else:
            out[f.name] = pa.array(_sparse_ids(col(f.name), f, codes, where), pa.int64())
    for f in plan.spec.dense:
        x, missing = _dense_column(col(f.name), f, codes, where)
        out[f.name] = pa.array(x, pa.float32())
        if f.missing_indicator:
            out[f.indicator_name] = pa.array(missing.astype(np.float32))
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


class _Source:
    """The source as parts (a CSV file: one table; Parquet: its row groups), each with the
    :class:`_Where` that names its rows; read once per pass."""

    def __init__(self, src: Path, kind: str, spec: FeatureSpec, names: Dict[str, str],
                 ts_unit: str, list_delimiter: str, csv_delimiter: str) -> None:
        self.csv_lines = kind == "csv"
        if self.csv_lines:
            self.files = [src]
            header = _header(src, csv_delimiter, "utf8")
            self.plan = _plan(src, header, spec, names, ts_unit, list_delimiter)
            # Multi-valued and vocabulary fields are read as text (their keys are the text as
            # given); the rest is inferred, then cast.
            types = {self.plan.source_of[f.name]: pa.string() for f in spec.sparse
                     if f.multi_valued or f.vocabulary}
            self._table = read_delimited(src, delimiter=csv_delimiter, include=self.columns,
                                         column_types=types)
            self.rows = self._table.num_rows
            self.group_starts = np.array([0, self.rows], np.int64)
            return
        self.files = _parquet_files(src)
        self._pfs = [_open(f) for f in self.files]
        self.plan = _plan(self.files[0], self._pfs[0].schema_arrow.names, spec, names, ts_unit,
                          list_delimiter)
        iid_column = self.plan.source_of[INSTANCE_ID]
        for f, pf in zip(self.files[1:], self._pfs[1:]):
            _plan(f, pf.schema_arrow.names, spec, names, ts_unit, list_delimiter)
            if (iid_column in pf.schema_arrow.names) != self.plan.has_instance_id:
                raise SourceFormatError(f, f"column {iid_column!r} is in some source files but "
                                           "not in others")
        self._groups = [(fi, g, base) for fi, pf in enumerate(self._pfs)
                        for g, base in zip(range(pf.num_row_groups), np.cumsum(
                            [0] + [pf.metadata.row_group(g).num_rows
                                   for g in range(pf.num_row_groups)]).tolist())]
        sizes = [self._pfs[fi].metadata.row_group(g).num_rows for fi, g, _ in self._groups]
        self.group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.rows = int(self.group_starts[-1])

    @property
    def columns(self) -> List[str]:
        """The source columns the spec reads."""
        return [self.plan.source_of[c] for c in self.plan.spec.columns
                if c != INSTANCE_ID or self.plan.has_instance_id]

    def column_type(self, canonical: str) -> pa.DataType:
        name = self.plan.source_of[canonical]
        schema = self._table.schema if self.csv_lines else self._pfs[0].schema_arrow
        return schema.field(name).type

    def parts(self, canonical: Sequence[str],
              progress: Optional[tqdm] = None) -> Iterator[Tuple[int, pa.Table, _Where]]:
        """(first global row, table of the source columns of ``canonical``, where) per part."""
        cols = [self.plan.source_of[c] for c in canonical]
        if self.csv_lines:  # read whole; converted in slices (progress, bounded temporaries)
            table = self._table.select(cols)
            for start in range(0, max(self.rows, 1), _CSV_PART_ROWS):
                t = table.slice(start, _CSV_PART_ROWS)
                yield start, t, _Where(self.files[0], csv_lines=True, base=start,
                                       names=self.plan.source_of)
                if progress is not None:
                    progress.update(t.num_rows)
            return
        for start, (fi, g, base) in zip(self.group_starts, self._groups):
            try:
                t = self._pfs[fi].read_row_group(g, columns=cols)
            except (OSError, pa.ArrowException) as e:
                raise SourceFormatError(self.files[fi], f"unreadable Parquet data in row group "
                                                        f"{g} ({e})") from None
            yield int(start), t, _Where(self.files[fi], csv_lines=False, base=base,
                                        names=self.plan.source_of)
            if progress is not None:
                progress.update(t.num_rows)

    def locate(self, i: int) -> Tuple[Path, int]:
        """(file, row in that file) of global row ``i``."""
        if self.csv_lines:
            return self.files[0], i
        k = int(np.searchsorted(self.group_starts, i, side="right") - 1)
        fi, _, base = self._groups[k]
        return self.files[fi], base + i - int(self.group_starts[k])


def run_import(*, infer: bool, labels: Sequence[str], groups: Sequence[str], dry_run: bool,
               **kwargs) -> Union[ImportReport, Inferred]:
    """What ``datasets/import_log.py`` runs (the fields of :class:`ImportConfig`): with
    ``infer`` :func:`write_inferred_spec`, else :func:`import_log` (into a temporary folder,
    then dropped, with ``dry_run``)."""
    if infer:
        return write_inferred_spec(labels=labels, groups=groups, **kwargs)
    if not dry_run:
        return import_log(**kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        return import_log(**{**kwargs, "output": Path(tmp) / "dry_run", "overwrite": False})


def read_source(source: PathLike, csv_delimiter: str = ",") -> pa.Table:
    """The whole source as read (CSV types inferred by pyarrow; Parquet as stored)."""
    src = Path(source)
    if _source_kind(src) == "csv":
        return read_delimited(src, delimiter=csv_delimiter)
    return pa.concat_tables([_open(f).read() for f in _parquet_files(src)])


def write_inferred_spec(source: PathLike, spec: PathLike, *, overwrite: bool = False,
                        user_column: str = USER_ID, ts_column: str = TS,
                        instance_id_column: str = INSTANCE_ID, list_delimiter: str = "|",
                        csv_delimiter: str = ",", labels: Sequence[str] = (),
                        groups: Sequence[str] = (), **_: object) -> Inferred:
    """Propose a spec for ``source`` (:func:`infer_spec`) and write it to ``spec``; the other
    import settings are accepted and unused."""
    inferred = infer_spec(read_source(source, csv_delimiter), user_column=user_column,
                          ts_column=ts_column, instance_id_column=instance_id_column,
                          labels=labels, groups=groups, list_delimiter=list_delimiter)
    with atomic_output(spec, overwrite=overwrite) as tmp:
        inferred.spec.save(tmp)
    inferred.reasons.append(f"written to {spec}: review it, then import with --spec {spec} "
                            f"--ts_unit {inferred.ts_unit} (without --infer)")
    return inferred


def import_log(source: PathLike, spec: Union[PathLike, FeatureSpec], output: PathLike, *,
               overwrite: bool = False, user_column: str = USER_ID, ts_column: str = TS,
               instance_id_column: str = INSTANCE_ID, ts_unit: str = "s",
               list_delimiter: str = "|", csv_delimiter: str = ",",
               rename: Sequence[str] = (), extra_files: Sequence[PathLike] = (),
               vocab_from: str = "", vocab_fraction: float = 1.0,
               rows_per_file: int = DEFAULT_ROWS_PER_FILE) -> ImportReport:
    """Import ``source`` (CSV, Parquet file, or directory of Parquet files) as an instance log.

    Keyword names match :class:`ImportConfig` (:func:`run_import` takes all of them).
    Returns the :class:`ImportReport`, with :func:`validate_log`'s summary of the written log.
    """
    if not output:
        raise ConfigError("--output: the instance log directory to write is required")
    src = Path(source)
    out = Path(output)
    feature_spec = spec if isinstance(spec, FeatureSpec) else FeatureSpec.load(spec)
    check_output_path(src, out)
    if not 0.0 < vocab_fraction <= 1.0:
        raise ConfigError(f"vocab_fraction {vocab_fraction}: expected a fraction in (0, 1]")
    names = _rename_map(user_column, ts_column, instance_id_column, rename)
    kind = _source_kind(src)
    carried = [*license_files(src), *(Path(f) for f in extra_files)]
    if src.is_file() and src in carried:
        carried.remove(src)
    for f in carried:
        if not f.is_file():
            raise SourceFormatError(f, "extra file not found")
    # Unique by name: a later file of the same name would overwrite an earlier one.
    carried = list({f.name: f for f in carried}.values())
    saved, saved_means = load_vocabularies(vocab_from) if vocab_from else ({}, {})
    provenance = {"source": "import", "path": str(src.resolve()), "user_column": user_column,
                  "ts_column": ts_column, "instance_id_column": instance_id_column,
                  "ts_unit": ts_unit, "rename": list(rename),
                  "vocab_from": str(Path(vocab_from).resolve()) if vocab_from else "",
                  "vocab_fraction": vocab_fraction}
    with atomic_output(out, overwrite=overwrite) as tmp:
        source_ = _Source(src, kind, feature_spec, names, ts_unit, list_delimiter, csv_delimiter)
        vocabulary_fields = {f.name for f in feature_spec.sparse if f.vocabulary}
        codes = _Codes({k: v for k, v in saved.items()
                        if k == USER_ID or k in vocabulary_fields}, {}, dict(saved_means))
        order, assigned = _key_pass(source_, codes)
        train = np.zeros(source_.rows, bool)
        train[order[:int(np.ceil(vocab_fraction * source_.rows))]] = True
        _training_pass(source_, codes, train)
        sizes = {k: len(v) for k, v in codes.vocabularies.items()}
        final_spec = output_spec(feature_spec, sizes)
        with LogWriter(tmp, final_spec, rows_per_file=rows_per_file, extra_files=carried,
                       provenance=provenance) as w:
            _write(source_, codes, order, assigned, w)
        if codes.vocabularies or codes.means:
            save_vocabularies(tmp / VOCAB_DIR, codes.vocabularies, codes.means)
    return ImportReport(validate_log(out, final_spec), sizes, codes.unknown, codes.filled)


def _key_pass(source: _Source, codes: _Codes) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Read the key columns: build the user vocabulary when user ids are text (or a saved one
    exists), check instance ids; returns the write order and the assigned instance ids (None
    when the source has its own)."""
    plan = source.plan
    keys = [INSTANCE_ID, USER_ID, TS] if plan.has_instance_id else [USER_ID, TS]
    text_users = USER_ID in codes.vocabularies or _is_text(source.column_type(USER_ID))
    ts_parts, user_parts, iid_parts = [], [], []
    for _, t, where in source.parts(keys):
        ts = _to_ts(t[plan.source_of[TS]].combine_chunks(), where, plan.ts_unit)
        _check_ts(ts, where)
        ts_parts.append(ts)
        users = t[plan.source_of[USER_ID]].combine_chunks()
        user_parts.append(pc.dictionary_encode(_user_keys(users, where)) if text_users
                          else _to_int64(users, where, USER_ID, "an integer user id"))
        if plan.has_instance_id:
            iid_parts.append(_to_int64(t[plan.source_of[INSTANCE_ID]].combine_chunks(), where,
                                       INSTANCE_ID))
    if text_users:
        vocab = Vocabulary.growing(pa.concat_arrays([p.dictionary for p in user_parts]),
                                   codes.vocabularies.get(USER_ID))
        codes.vocabularies[USER_ID] = vocab
        user_parts = [vocab.lookup(p.dictionary)[0][p.indices.to_numpy()] for p in user_parts]
    ts_all = np.concatenate(ts_parts) if ts_parts else np.zeros(0, np.int64)
    users = np.concatenate(user_parts) if user_parts else np.zeros(0, np.int64)
    iid = np.concatenate(iid_parts) if plan.has_instance_id and iid_parts else None
    order = _order(ts_all, users, iid)
    if iid is not None:
        _check_unique(iid[order], order, source.locate, source.csv_lines)
        return order, None
    assigned = np.empty(source.rows, np.int64)
    assigned[order] = np.arange(source.rows, dtype=np.int64)
    return order, assigned


def _training_pass(source: _Source, codes: _Codes, train: np.ndarray) -> None:
    """Build the vocabularies and dense means not given by ``--vocab_from`` on the training
    rows; set every dense fill value."""
    spec, plan = source.plan.spec, source.plan
    to_count = [f for f in spec.sparse if f.vocabulary and f.name not in codes.vocabularies]
    to_mean = [f for f in spec.dense if f.missing is Missing.MEAN and f.name not in codes.means]
    counters = {f.name: KeyCounter() for f in to_count}
    sums = {f.name: [0.0, 0] for f in to_mean}
    if to_count or to_mean:
        for start, t, where in source.parts([f.name for f in (*to_count, *to_mean)]):
            rows = train[start:start + t.num_rows]
            for f in to_count:
                arr = t[plan.source_of[f.name]].combine_chunks()
                if f.multi_valued:
                    flat, at, _ = _list_tokens(arr, f, where, plan.list_delimiter)
                    counters[f.name].add(as_keys(flat).filter(pa.array(rows[at])))
                else:
                    counters[f.name].add(as_keys(arr).filter(pa.array(rows)))
            for f in to_mean:
                x, missing = _dense_values(t[plan.source_of[f.name]].combine_chunks(), where,
                                           f.name)
                keep = rows & ~missing
                sums[f.name][0] += float(x[keep].sum())
                sums[f.name][1] += int(keep.sum())
    for f in to_count:
        codes.vocabularies[f.name] = Vocabulary.build(counters[f.name].counts(), f.min_count,
                                                      f.num_embeddings)
    for f in to_mean:
        total, n = sums[f.name]
        if n == 0:
            raise SourceFormatError(source.files[0], "no value in the training window to take the "
                                                     "mean of", column=f.name)
        codes.means[f.name] = total / n
    for f in spec.dense:
        if f.missing is not Missing.ERROR:
            codes.fill[f.name] = codes.means[f.name] if f.missing is Missing.MEAN else f.fill_value


_WRITE_CHUNK = 1_000_000


def _write(source: _Source, codes: _Codes, order: np.ndarray, assigned: Optional[np.ndarray],
           writer: LogWriter) -> None:
    """Convert every part and write the rows in ``order``: streamed when the source is already
    in that order, else converted into memory whole and sorted."""
    canonical = [c for c in source.plan.spec.columns
                 if c != INSTANCE_ID or source.plan.has_instance_id]
    n = source.rows
    in_order = bool((order == np.arange(n)).all())
    progress = tqdm(total=n, unit="rows", unit_scale=True, desc="import", disable=None)
    with progress:
        parts = []
        for start, t, where in source.parts(canonical, progress):
            t = _convert(t, source.plan, codes, where)
            if assigned is not None:
                t = t.set_column(0, INSTANCE_ID, pa.array(assigned[start:start + t.num_rows]))
            if in_order:
                writer.write(t)
            else:
                parts.append(t)
    if in_order:
        return
    table = pa.concat_tables(parts)
    del parts
    for start in range(0, n, _WRITE_CHUNK):
        writer.write(table.take(pa.array(order[start:start + _WRITE_CHUNK])))
