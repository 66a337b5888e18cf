"""Request features -> model inputs, checked against the feature spec.

A candidate (or an ingested instance) is a JSON object with one value per field of the spec:
a sparse field an id (an int; a list of ints when multi-valued), a dense field a number.
Ids are read as the instance log holds them:

- a ``hashed`` field takes any int64 id and hashes it into its buckets (the reader's
  :func:`~iat_torchrec.data.reader.hash_ids`);
- a field with a ``vocabulary`` takes the log's vocabulary ids; one outside
  ``[0, num_embeddings)`` is mapped to the unknown id 0 (counted in ``oov``);
- any other field must hold an id in ``[0, num_embeddings)``.

Anything else raises :class:`RequestError` naming the field (``candidates[3].brand``).

Example::

    dense, sparse, oov = candidate_features(spec, [{"item_id": 3, ..., "price": 0.5}])
    # dense [1, num_dense] float32, sparse a KeyedJaggedTensor over spec.sparse_names
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iat_torchrec.data.reader import hash_ids
from iat_torchrec.data.spec import FeatureSpec, SparseField

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class RequestError(ValueError):
    """A request that does not fit the spec: ``field`` names where (``candidates[0].price``),
    ``status`` the HTTP status to answer with."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


def check_int(value: Any, where: str, minimum: int = INT64_MIN) -> int:
    """An int64 (not a bool, not a float) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(where, f"expected an integer, got {type(value).__name__} "
                                  f"{_short(value)}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise RequestError(where, f"{value} does not fit in int64")
    if value < minimum:
        raise RequestError(where, f"{value} is below {minimum}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _sparse_ids(f: SparseField, value: Any, where: str) -> List[int]:
    if f.multi_valued:
        if not isinstance(value, list):
            raise RequestError(where, f"multi-valued field: expected a list of integer ids, "
                                      f"got {type(value).__name__} {_short(value)}")
        return [check_int(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return [check_int(value, where)]


def _map_ids(f: SparseField, ids: np.ndarray, owners: np.ndarray,
             prefix: str) -> Tuple[np.ndarray, int]:
    """Table ids of raw ids (hashed / vocabulary / plain) and how many were out of vocabulary;
    ``owners``: the candidate of each id (for the error message)."""
    if f.hashed:
        return hash_ids(ids, f.num_embeddings), 0
    bad = (ids < 0) | (ids >= f.num_embeddings)
    if not bad.any():
        return ids, 0
    if f.vocabulary:
        return np.where(bad, 0, ids), int(bad.sum())
    i = int(np.flatnonzero(bad)[0])
    raise RequestError(f"{prefix}[{owners[i]}].{f.name}",
                       f"id {int(ids[i])} is outside the field's ids [0, {f.num_embeddings}) "
                       "and the field has no unknown id (neither hashed nor a vocabulary)")


def candidate_features(spec: FeatureSpec, candidates: Sequence[Mapping[str, Any]],
                       prefix: str = "candidates", extra: Sequence[str] = ()
                       ) -> Tuple[torch.Tensor, KeyedJaggedTensor, int]:
    """``(dense [B, num_dense] float32, sparse KJT over spec.sparse_names, oov count)`` of
    ``candidates`` (dicts of field -> value); ``extra`` names keys allowed besides the spec's
    fields (an ingested instance's keys and labels). Well-formed candidates are read a field
    at a time (:func:`_columns`); anything else is checked candidate by candidate, which
    names the first bad value."""
    allowed = {*spec.sparse_names, *spec.dense_names, *extra}
    n = len(candidates)
    columns = _columns(spec, candidates, allowed)
    if columns is None:
        columns = _checked_columns(spec, candidates, allowed, prefix)
    dense, per_field = columns
    values, lengths, oov = [], [], 0
    for f in spec.sparse:
        lens, flat = per_field[f.name]
        owners = np.repeat(np.arange(n), lens)
        mapped, bad = _map_ids(f, flat, owners, prefix)
        values.append(mapped)
        lengths.append(lens)
        oov += bad
    kjt = KeyedJaggedTensor(keys=list(spec.sparse_names),
                            values=torch.from_numpy(np.concatenate(values)),
                            lengths=torch.from_numpy(np.concatenate(lengths)))
    return torch.from_numpy(dense), kjt, oov


# Dense values [B, num_dense] and, per sparse field, (ids per candidate [B], ids [total]).
Columns = Tuple[np.ndarray, Dict[str, Tuple[np.ndarray, np.ndarray]]]
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _columns(spec: FeatureSpec, candidates: Sequence[Mapping[str, Any]],
             allowed: set) -> Optional[Columns]:
    """The columns of well-formed candidates, read a field at a time; None as soon as
    anything is off (the checking path then names it)."""
    n = len(candidates)
    if not all(type(c) is dict and c.keys() <= allowed for c in candidates):
        return None
    per_field = {}
    try:
        for f in spec.sparse:
            col = [c[f.name] for c in candidates]
            if f.multi_valued:
                if not all(type(v) is list and all(type(x) is int for x in v) for v in col):
                    return None
                lens = np.fromiter(map(len, col), dtype=np.int64, count=n)
                flat = np.fromiter((x for v in col for x in v), dtype=np.int64,
                                   count=int(lens.sum()))
            else:
                if not all(type(v) is int for v in col):
                    return None
                lens, flat = np.ones(n, dtype=np.int64), np.fromiter(col, np.int64, count=n)
            per_field[f.name] = (lens, flat)
        dense = np.empty((n, len(spec.dense)), dtype=np.float32)
        for j, f in enumerate(spec.dense):
            col = [c[f.name] for c in candidates]
            if not all(type(v) is float or type(v) is int for v in col):
                return None
            values = np.array(col, dtype=np.float64)
            if not (np.isfinite(values).all() and (np.abs(values) <= FLOAT32_MAX).all()):
                return None
            dense[:, j] = values
    except (KeyError, OverflowError):  # a missing field, an id beyond int64
        return None
    return dense, per_field


def _checked_columns(spec: FeatureSpec, candidates: Sequence[Mapping[str, Any]],
                     allowed: set, prefix: str) -> Columns:
    """The columns, every value checked candidate by candidate: the first bad one raises
    :class:`RequestError` naming it."""
    n = len(candidates)
    dense = np.empty((n, len(spec.dense)), dtype=np.float32)
    rows: Dict[str, List[List[int]]] = {f.name: [] for f in spec.sparse}
    for i, c in enumerate(candidates):
        where = f"{prefix}[{i}]"
        if not isinstance(c, Mapping):
            raise RequestError(where, f"expected an object of field values, got "
                                      f"{type(c).__name__}")
        unknown = [k for k in c if k not in allowed]
        if unknown:
            raise RequestError(f"{where}.{unknown[0]}", "not a field of the feature spec")
        for f in spec.sparse:
            if f.name not in c or c[f.name] is None:
                raise RequestError(f"{where}.{f.name}", "missing sparse field")
            rows[f.name].append(_sparse_ids(f, c[f.name], f"{where}.{f.name}"))
        for j, f in enumerate(spec.dense):
            v = c.get(f.name)
            if v is None:
                raise RequestError(f"{where}.{f.name}", "missing dense field")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RequestError(f"{where}.{f.name}", f"expected a finite number, got "
                                                        f"{_short(v)}")
            if abs(v) > FLOAT32_MAX:
                raise RequestError(f"{where}.{f.name}", f"{v} is beyond the float32 range")
            dense[i, j] = v
    per_field = {}
    for name, ids in rows.items():
        lens = np.fromiter((len(r) for r in ids), dtype=np.int64, count=n)
        per_field[name] = (lens, np.fromiter((v for r in ids for v in r), dtype=np.int64,
                                             count=int(lens.sum())))
    return dense, per_field
