"""A feature spec proposed from the data, for the user to review before importing.

Per source column (the user, timestamp and instance-id columns aside):

- a label: a column named in ``labels``, or, when none is named, every column whose values are
  all 0/1 (or true/false) and whose name contains one of :data:`LABEL_HINTS`;
- a multi-valued sparse field: text where some value holds the list delimiter;
- a sparse field: other text, integers and booleans; with a vocabulary when it has at most
  :data:`HASH_ABOVE` distinct values (``num_embeddings``: those + the unknown row), else hashed
  into the next power of two above its distinct count;
- a dense field: floating-point numbers.

Embedding dims grow with the cardinality (``6 * n ** 0.25``, a multiple of 4, 4 to 64). Groups
come from ``groups`` (``NAME=GROUP``) or from name hints (:data:`GROUP_HINTS`, else context).
Columns with missing values get a policy: the unknown id (sparse), or the training mean plus a
``<name>_missing`` indicator (dense). :class:`Inferred` also says the timestamp's format.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from iat_torchrec.data.spec import (DenseField, FeatureGroup, FeatureSpec, Missing, SparseField,
                                    SpecError)

LABEL_HINTS = ("click", "label", "like", "purchase", "buy", "convert", "target", "watch")
GROUP_HINTS = {FeatureGroup.USER: ("user", "age", "gender", "city", "country", "member"),
               FeatureGroup.ITEM: ("item", "product", "movie", "categ", "tag", "genre", "brand",
                                   "price", "shop", "seller", "title")}
HASH_ABOVE = 1_000_000
# numeric timestamps at least this large are taken as ms, us or ns (1e11 s is year 5138)
_TS_UNIT_ABOVE = (("ns", 1e17), ("us", 1e14), ("ms", 1e11))


@dataclasses.dataclass
class Inferred:
    """The proposed spec, the timestamp's unit (``ts_unit``) and format, and one line of
    reasons per column."""

    spec: FeatureSpec
    ts_unit: str
    ts_format: str
    reasons: List[str]

    def format(self) -> str:
        return "\n".join(["proposed feature spec:", *(f"  {r}" for r in self.reasons)])


def embedding_dim(cardinality: int) -> int:
    return int(min(64, max(4, 4 * math.ceil(6 * max(cardinality, 1) ** 0.25 / 4))))


def _group(name: str, groups: Dict[str, FeatureGroup]) -> FeatureGroup:
    if name in groups:
        return groups[name]
    low = name.lower()
    for group, hints in GROUP_HINTS.items():
        if any(h in low for h in hints):
            return group
    return FeatureGroup.CONTEXT


def _is_binary(arr: pa.Array) -> bool:
    arr = arr.drop_null()
    if not len(arr) or arr.null_count:
        return False
    if pa.types.is_boolean(arr.type):
        return True
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        return bool(pc.all(pc.is_in(arr.cast(pa.float64()), pa.array([0.0, 1.0]))).as_py())
    if pa.types.is_string(arr.type):
        low = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
        return bool(pc.all(pc.is_in(low, pa.array(["0", "1", "true", "false"]))).as_py())
    return False


def _ts_format(arr: pa.Array) -> tuple:
    """(ts_unit, a description) of the timestamp column."""
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        return "s", f"{arr.type} values"
    if pa.types.is_string(arr.type):
        return "s", "ISO-8601 text (without an offset: UTC)"
    x = pc.max(arr.cast(pa.float64())).as_py() or 0.0
    for unit, above in _TS_UNIT_ABOVE:
        if x >= above:
            return unit, f"numbers, taken as {unit} since the epoch from their size"
    return "s", "numbers of seconds"


def infer_spec(table: pa.Table, *, user_column: str, ts_column: str, instance_id_column: str,
               labels: Sequence[str] = (), groups: Sequence[str] = (),
               list_delimiter: str = "|") -> Inferred:
    """Propose a spec for the source ``table`` (see the module doc)."""
    group_of: Dict[str, FeatureGroup] = {}
    for item in groups:
        name, _, group = item.partition("=")
        try:
            group_of[name.strip()] = FeatureGroup(group.strip())
        except ValueError:
            raise SpecError(f"groups {item!r}: expected NAME=GROUP with GROUP one of "
                            f"{[g.value for g in FeatureGroup]}") from None
    keys = {user_column, ts_column, instance_id_column}
    for column in (user_column, ts_column):
        if column not in table.column_names:
            raise SpecError(f"column {column!r} is not in the source (columns: "
                            f"{table.column_names})")
    unknown = [c for c in labels if c not in table.column_names]
    if unknown:
        raise SpecError(f"labels {unknown} are not in the source (columns: {table.column_names})")
    columns = [c for c in table.column_names if c not in keys]
    label_names = list(labels) or [c for c in columns if _is_binary(table[c].combine_chunks())
                                   and any(h in c.lower() for h in LABEL_HINTS)]
    if not label_names:
        raise SpecError(f"no label column found (a 0/1 column named like {LABEL_HINTS}); name "
                        "the labels with --labels")
    reasons = [f"{c}: label (0/1)" for c in label_names]
    sparse: List[SparseField] = []
    dense: List[DenseField] = []
    for c in columns:
        if c in label_names:
            continue
        arr = table[c].combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        text = pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
        missing = arr.null_count > 0 or (text and bool(pc.any(pc.equal(
            pc.utf8_trim_whitespace(arr), "")).as_py()))  # (in a list: no ids, not missing)
        group = _group(c, group_of)
        if pa.types.is_floating(arr.type) or pa.types.is_decimal(arr.type):
            missing = missing or bool(pc.any(pc.is_nan(arr.cast(pa.float64()))).as_py())
            dense.append(DenseField(c, group=group,
                                    missing=Missing.MEAN if missing else Missing.ERROR,
                                    missing_indicator=missing))
            reasons.append(f"{c}: dense ({arr.type}), group {group.value}"
                           + ("; missing values: the mean, with an indicator" if missing else ""))
            continue
        multi = text and bool(pc.any(pc.match_substring(arr, list_delimiter)).as_py())
        if multi:
            values = pc.utf8_trim_whitespace(pc.list_flatten(pc.split_pattern(
                arr.drop_null(), pattern=list_delimiter)))
            values = values.filter(pc.not_equal(values, ""))
        else:
            values = arr.drop_null()
        n = len(pc.unique(values))
        hashed = n > HASH_ABOVE
        rows = 2 ** math.ceil(math.log2(n)) if hashed else n + 1
        sparse.append(SparseField(c, rows, embedding_dim(n), group, multi_valued=multi,
                                  hashed=hashed, vocabulary=not hashed,
                                  missing=Missing.UNKNOWN if missing and not multi
                                  else Missing.ERROR))
        reasons.append(f"{c}: sparse{', multi-valued' if multi else ''} ({arr.type}), {n:,} "
                       f"distinct, {'hashed into' if hashed else 'vocabulary of'} {rows:,} rows, "
                       f"dim {embedding_dim(n)}, group {group.value}"
                       + ("; missing ids: the unknown id" if missing and not multi else ""))
    ts_unit, ts_format = _ts_format(table[ts_column].combine_chunks())
    reasons.append(f"{ts_column}: timestamp, {ts_format} (--ts_unit {ts_unit})")
    return Inferred(FeatureSpec(sparse=sparse, dense=dense, labels=label_names), ts_unit,
                    ts_format, reasons)

