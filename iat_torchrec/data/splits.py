"""Time-respecting train/valid/test splits of an instance log, written as separate logs.

Two methods:

- ``per_user`` (Protocol P1 for MovieLens): each user's rows, sorted by ``(ts, instance_id)``, are
  cut by fractions: with ``n`` rows the first ``floor(train_fraction * n)`` are train, the next
  ``floor((train_fraction + valid_fraction) * n) - floor(train_fraction * n)`` valid, the rest
  test. The floors are computed exactly (fractions as decimals, integer arithmetic), so 0.8/0.1
  gives exactly floor(0.8 n) and floor(0.9 n). (For a MovieLens log, whose instance ids follow
  (timestamp, user, movie), this is P1's per-user order by (timestamp, item id).)
- ``time``: one global cut: ``ts < cut1`` train, ``cut1 <= ts < cut2`` valid, the rest test.
  The cuts are given as timestamps (``cuts``) or as quantiles of ``ts`` (``quantiles``); a
  quantile ``q`` gives the cut ``sorted_ts[floor(q * n)]`` (train then holds at most
  ``floor(q * n)`` rows, fewer when rows tie at the cut). Without either, the quantiles are
  ``train_fraction`` and ``train_fraction + valid_fraction``.

Output: ``<output>/train``, ``<output>/valid``, ``<output>/test``, each a full instance log (data,
``feature_spec.json``, the source's licence/readme files), plus ``<output>/split.json`` (method,
parameters, cuts, row counts) and the licence files at the top; the whole directory is written
atomically. Rows keep the source's order. The source is only read; an output equal to, inside
or containing the source is refused.

Memory: 17 bytes per row (instance_id, user_id, ts for the order; one byte of assignment), and
one row group at a time for the data.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa

from iat_torchrec.atomic import atomic_output
from iat_torchrec.data.log import (
    DEFAULT_ROWS_PER_FILE,
    InstanceLogError,
    LogSummary,
    LogWriter,
    license_files,
    log_files,
    open_parquet,
    read_key_columns,
    validate_log,
)
from iat_torchrec.data.spec import FeatureSpec

PathLike = Union[str, os.PathLike]

__all__ = [
    "SPLIT_NAMES",
    "SPLIT_MANIFEST",
    "SplitMethod",
    "SplitConfig",
    "split_log",
    "split_per_user",
    "split_by_time",
    "per_user_assignment",
    "time_cut_assignment",
    "quantile_cuts",
]

SPLIT_NAMES = ("train", "valid", "test")
SPLIT_MANIFEST = "split.json"


class SplitMethod(str, enum.Enum):
    PER_USER = "per_user"
    TIME = "time"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass
class SplitConfig:
    """Split an instance log into train/valid/test logs that respect time."""

    source: str = dataclasses.field(metadata={"help": "instance log to split (read only)"})
    output: str = dataclasses.field(metadata={"help": "directory for train/, valid/, test/"})
    method: SplitMethod = dataclasses.field(default=SplitMethod.PER_USER, metadata={
        "help": "per_user: per-user chronological fractions (Protocol P1); time: global cuts"})
    train_fraction: float = dataclasses.field(default=0.8, metadata={
        "help": "fraction of each user's rows (per_user) or quantile of ts (time) for train"})
    valid_fraction: float = dataclasses.field(default=0.1, metadata={
        "help": "fraction for valid; the rest is test"})
    cuts: List[int] = dataclasses.field(default_factory=list, metadata={
        "help": "time method: two timestamps cut1 cut2 (train ts < cut1 <= valid ts < cut2)"})
    quantiles: List[float] = dataclasses.field(default_factory=list, metadata={
        "help": "time method: two quantiles of ts giving cut1 and cut2"})
    overwrite: bool = dataclasses.field(default=False,
                                        metadata={"help": "replace an existing output"})


# =========================================================================== assignments
def _exact(x: float, name: str) -> Fraction:
    if not np.isfinite(x) or x < 0 or x > 1:
        raise ValueError(f"{name} must lie in [0, 1], got {x!r}")
    return Fraction(repr(float(x)))  # the decimal the user wrote, not its binary neighbour


def _fractions(train_fraction: float, valid_fraction: float) -> Tuple[Fraction, Fraction]:
    a = _exact(train_fraction, "train_fraction")
    b = a + _exact(valid_fraction, "valid_fraction")
    if b > 1:
        raise ValueError(f"train_fraction + valid_fraction must be <= 1, got {float(b)!r}")
    return a, b


def _floor_times(n: np.ndarray, f: Fraction) -> np.ndarray:
    """floor(f * n) exactly, elementwise (n: int64 counts)."""
    if f.numerator and int(n.max(initial=0)) > (2 ** 62) // f.numerator:
        return np.array([(int(k) * f.numerator) // f.denominator for k in n], dtype=np.int64)
    return (n * f.numerator) // f.denominator


def per_user_assignment(user_id: np.ndarray, ts: np.ndarray, instance_id: np.ndarray,
                        train_fraction: float = 0.8, valid_fraction: float = 0.1) -> np.ndarray:
    """int8 per row: 0 train, 1 valid, 2 test, by per-user chronological fractions."""
    a, b = _fractions(train_fraction, valid_fraction)
    n = user_id.size
    order = np.lexsort((instance_id, ts, user_id))
    u = user_id[order]
    new_user = np.ones(n, bool)
    new_user[1:] = u[1:] != u[:-1]
    starts = np.flatnonzero(new_user)
    counts = np.diff(np.append(starts, n))
    rank = np.arange(n) - np.repeat(starts, counts)
    cut1 = np.repeat(_floor_times(counts, a), counts)
    cut2 = np.repeat(_floor_times(counts, b), counts)
    assigned = np.where(rank < cut1, 0, np.where(rank < cut2, 1, 2)).astype(np.int8)
    out = np.empty(n, np.int8)
    out[order] = assigned
    return out


def quantile_cuts(ts: np.ndarray, quantiles: Sequence[float]) -> List[int]:
    """Cut timestamps from quantiles: ``sorted_ts[floor(q * n)]`` (past the end: max ts + 1)."""
    s = np.sort(ts)
    n = s.size
    cuts = []
    for i, q in enumerate(quantiles):
        k = int(_floor_times(np.array([n], np.int64), _exact(q, f"quantiles[{i}]"))[0])
        cuts.append(int(s[k]) if k < n else int(s[-1]) + 1)
    return cuts


def time_cut_assignment(ts: np.ndarray, cut1: int, cut2: int) -> np.ndarray:
    """int8 per row: 0 for ts < cut1, 1 for cut1 <= ts < cut2, 2 for the rest."""
    if cut1 > cut2:
        raise ValueError(f"cuts must be ordered, got cut1 {cut1} > cut2 {cut2}")
    return np.where(ts < cut1, 0, np.where(ts < cut2, 1, 2)).astype(np.int8)


# =========================================================================== writing
def _check_paths(source: Path, output: Path) -> None:
    if not source.exists():
        raise InstanceLogError(source, "instance log not found")
    s = source.resolve()
    o = output.resolve()
    if s == o:
        raise ValueError(f"{output}: the output must differ from the source log")
    s_dir = s if s.is_dir() else s.parent
    if o.is_relative_to(s_dir):
        raise ValueError(f"{output}: the output must not lie inside the source log's directory "
                         f"{s_dir}")
    if s.is_relative_to(o):
        raise ValueError(f"{output}: the output must not contain the source log {source}")


def _write_splits(source: Path, files: List[Path], spec: FeatureSpec, assignment: np.ndarray,
                  output: Path, overwrite: bool, manifest: Dict[str, object],
                  rows_per_file: int) -> Dict[str, LogSummary]:
    counts = np.bincount(assignment, minlength=3)
    for k, name in enumerate(SPLIT_NAMES):
        if counts[k] == 0:
            raise ValueError(f"{source}: the {name} split would be empty "
                             f"(rows per split: {dict(zip(SPLIT_NAMES, counts.tolist()))})")
    carried = license_files(source)
    manifest = {**manifest, "source": str(source),
                "rows": dict(zip(SPLIT_NAMES, (int(c) for c in counts)))}
    with atomic_output(output, overwrite=overwrite) as tmp:
        tmp.mkdir()
        writers = [LogWriter(tmp / name, spec, rows_per_file=rows_per_file, extra_files=carried)
                   for name in SPLIT_NAMES]
        try:
            row = 0
            for f in files:
                pf = open_parquet(f)
                for g in range(pf.num_row_groups):
                    try:
                        table = pf.read_row_group(g)
                    except (OSError, pa.ArrowException) as e:
                        raise InstanceLogError(f, f"unreadable Parquet data in row group {g} "
                                                  f"({e})") from None
                    a = assignment[row:row + table.num_rows]
                    row += table.num_rows
                    for k, w in enumerate(writers):
                        mask = a == k
                        if mask.all():
                            w.write(table)
                        elif mask.any():
                            w.write(table.filter(pa.array(mask)))
            for w in writers:
                w.close()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        for f in carried:
            shutil.copy2(f, tmp / f.name)
        (tmp / SPLIT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        summaries = {name: validate_log(tmp / name, spec) for name in SPLIT_NAMES}
    for name, s in summaries.items():
        s.path = str(output / name)
    return summaries


def _prepare(source: PathLike, output: PathLike):
    src, out = Path(source), Path(output)
    _check_paths(src, out)
    files = log_files(src)
    spec = FeatureSpec.load(src)
    keys = read_key_columns(files)
    iid, uid, ts = keys.instance_id, keys.user_id, keys.ts
    return src, out, files, spec, iid, uid, ts


def split_per_user(source: PathLike, output: PathLike, *, train_fraction: float = 0.8,
                   valid_fraction: float = 0.1, overwrite: bool = False,
                   rows_per_file: int = DEFAULT_ROWS_PER_FILE) -> Dict[str, LogSummary]:
    """Per-user chronological split (Protocol P1); returns each split's validated summary."""
    src, out, files, spec, iid, uid, ts = _prepare(source, output)
    assignment = per_user_assignment(uid, ts, iid, train_fraction, valid_fraction)
    manifest = {"method": SplitMethod.PER_USER.value, "train_fraction": train_fraction,
                "valid_fraction": valid_fraction, "order": "per user by (ts, instance_id)"}
    return _write_splits(src, files, spec, assignment, out, overwrite, manifest, rows_per_file)


def split_by_time(source: PathLike, output: PathLike, *, cuts: Optional[Sequence[int]] = None,
                  quantiles: Optional[Sequence[float]] = None, overwrite: bool = False,
                  rows_per_file: int = DEFAULT_ROWS_PER_FILE) -> Dict[str, LogSummary]:
    """Global time cut; exactly one of ``cuts`` (two timestamps) or ``quantiles`` (two
    quantiles of ts). Returns each split's validated summary."""
    if (cuts is None) == (quantiles is None):
        raise ValueError("give exactly one of cuts (two timestamps) or quantiles (two values)")
    given = cuts if cuts is not None else quantiles
    if len(given) != 2:
        raise ValueError(f"expected two {'cuts' if cuts is not None else 'quantiles'} "
                         f"(train/valid and valid/test), got {list(given)}")
    src, out, files, spec, iid, uid, ts = _prepare(source, output)
    del iid, uid
    if quantiles is not None:
        if quantiles[0] > quantiles[1]:
            raise ValueError(f"quantiles must be ordered, got {list(quantiles)}")
        c1, c2 = quantile_cuts(ts, quantiles)
    else:
        c1, c2 = (int(c) for c in cuts)
    assignment = time_cut_assignment(ts, c1, c2)
    manifest = {"method": SplitMethod.TIME.value, "cuts": [c1, c2],
                "quantiles": list(quantiles) if quantiles is not None else None}
    return _write_splits(src, files, spec, assignment, out, overwrite, manifest, rows_per_file)


def split_log(source: PathLike, output: PathLike, *,
              method: Union[SplitMethod, str] = SplitMethod.PER_USER,
              train_fraction: float = 0.8, valid_fraction: float = 0.1,
              cuts: Sequence[int] = (), quantiles: Sequence[float] = (),
              overwrite: bool = False,
              rows_per_file: int = DEFAULT_ROWS_PER_FILE) -> Dict[str, LogSummary]:
    """Dispatch on ``method``; keyword names match :class:`SplitConfig`
    (``split_log(**dataclasses.asdict(cfg))``). For ``time`` without cuts or quantiles, the
    quantiles are ``train_fraction`` and ``train_fraction + valid_fraction``."""
    method = SplitMethod(method)
    if method is SplitMethod.PER_USER:
        if cuts or quantiles:
            raise ValueError("cuts/quantiles apply to the time method only")
        return split_per_user(source, output, train_fraction=train_fraction,
                              valid_fraction=valid_fraction, overwrite=overwrite,
                              rows_per_file=rows_per_file)
    if cuts and quantiles:
        raise ValueError("give cuts or quantiles, not both")
    if cuts:
        return split_by_time(source, output, cuts=list(cuts), overwrite=overwrite,
                             rows_per_file=rows_per_file)
    if not quantiles:
        a, b = _fractions(train_fraction, valid_fraction)
        quantiles = [float(a), float(b)]
    return split_by_time(source, output, quantiles=list(quantiles), overwrite=overwrite,
                         rows_per_file=rows_per_file)
