"""Vocabularies and a stable hash: raw string (or large integer) ids -> embedding rows.

A :class:`Vocabulary` maps the text of a raw id (its *key*: a string as given, trimmed; an
integer as its decimal text) to a row. Sparse fields use one with an out-of-vocabulary row
``OOV = 0`` (unseen, rare and missing ids), then one row per kept key, most frequent first, ties
in key order: the same counts always give the same rows. The user id uses one without an OOV row
that only grows: a later import appends its new users, in key order, after the known ones.

Vocabularies are saved in a log's ``vocab/`` folder, one Parquet file per column (``key``,
``count``; row i holds the key of id i), and read back by later imports (``--vocab_from``) and
by serving (:meth:`Vocabulary.lookup`).

:func:`stable_hash64` is the hash of string ids in hashed fields: the first 8 bytes of BLAKE2b
(``hashlib.blake2b(key.encode("utf-8"), digest_size=8)``, little-endian, as int64). It depends
on nothing but the key, so it is the same in every process, run and Python version; the reader
then maps the raw id into the field's buckets (:func:`iat_torchrec.data.reader.hash_ids`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iat_torchrec.atomic import atomic_output

PathLike = Union[str, os.PathLike]

OOV = 0
VOCAB_DIR = "vocab"
DENSE_MEANS_FILE = "dense_means.json"


def as_keys(arr: pa.Array) -> pa.Array:
    """The keys of raw id values: strings trimmed, integers (and integral floats) as decimal
    text; nulls stay null."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.utf8_trim_whitespace(arr.cast(pa.string()))
    if pa.types.is_floating(t):
        arr = pc.cast(arr, pa.int64())  # raises on a fraction: ids are integers or text
    return pc.cast(arr, pa.string())


def stable_hash64(keys: pa.Array) -> np.ndarray:
    """int64 BLAKE2b-64 of each key (see the module doc); each distinct key is hashed once."""
    enc = pc.dictionary_encode(keys).combine_chunks() if isinstance(keys, pa.ChunkedArray) \
        else pc.dictionary_encode(keys)
    uniques = np.array([int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest(),
                                       "little", signed=True)
                        for k in enc.dictionary.to_pylist()], dtype=np.int64)
    return uniques[enc.indices.to_numpy(zero_copy_only=False)]


class KeyCounter:
    """Counts of keys over any number of string arrays (nulls are not counted)."""

    def __init__(self) -> None:
        self._parts: List[pa.Table] = []

    def add(self, keys: pa.Array) -> None:
        if len(keys):
            vc = pc.value_counts(keys.drop_null())
            self._parts.append(pa.table({"key": vc.field("values"), "count": vc.field("counts")}))

    def counts(self) -> pa.Table:
        """``key``, ``count`` (int64), one row per distinct key."""
        if not self._parts:
            return pa.table({"key": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        t = pa.concat_tables(self._parts).group_by("key").aggregate([("count", "sum")])
        return t.rename_columns(["key", "count"]).cast(
            pa.schema([("key", pa.string()), ("count", pa.int64())]))


class Vocabulary:
    """Keys and their training counts; id i is ``keys[i]`` (``None`` at the OOV row)."""

    def __init__(self, keys: pa.Array, counts: np.ndarray, has_oov: bool) -> None:
        self.keys, self.counts, self.has_oov = keys.cast(pa.string()), counts, has_oov
        self._known = keys.slice(1) if has_oov else keys

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def build(cls, counts: pa.Table, min_count: int = 1,
              max_size: Optional[int] = None) -> "Vocabulary":
        """An OOV-row vocabulary of the keys seen at least ``min_count`` times, at most
        ``max_size`` rows (OOV included), most frequent first; what is left out counts to OOV."""
        order = pc.sort_indices(counts, sort_keys=[("count", "descending"),
                                                    ("key", "ascending")])
        counts = counts.take(order)
        c = counts["count"].to_numpy()
        keep = int((c >= min_count).sum())
        if max_size is not None:
            keep = min(keep, max_size - 1)
        folded = int(c[keep:].sum())
        keys = pa.concat_arrays([pa.nulls(1, pa.string()),
                                 counts["key"].combine_chunks().slice(0, keep)])
        return cls(keys, np.concatenate([[folded], c[:keep]]).astype(np.int64), has_oov=True)

    @classmethod
    def growing(cls, keys: pa.Array, base: Optional["Vocabulary"] = None) -> "Vocabulary":
        """A vocabulary without OOV row: ``base``'s keys, then the new distinct ``keys`` in key
        order."""
        new = pc.unique(keys.drop_null())
        if base is not None:
            new = new.filter(pc.invert(pc.is_in(new, base.keys)))
        new = new.take(pc.sort_indices(new))
        old = base.keys if base is not None else pa.array([], pa.string())
        old_counts = base.counts if base is not None else np.zeros(0, np.int64)
        return cls(pa.concat_arrays([old, new.cast(pa.string())]),
                   np.concatenate([old_counts, np.zeros(len(new), np.int64)]), has_oov=False)

    def lookup(self, keys: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
        """Ids of ``keys`` and a mask of the keys that are not in the vocabulary (their id is
        OOV; without an OOV row they are -1)."""
        idx = pc.index_in(keys, value_set=self._known).to_numpy(zero_copy_only=False)
        unseen = np.isnan(idx) if idx.dtype.kind == "f" else idx < 0
        ids = np.where(unseen, 0, idx).astype(np.int64)
        if self.has_oov:
            return np.where(unseen, OOV, ids + 1), unseen
        return np.where(unseen, -1, ids), unseen

    # ----------------------------------------------------------------- files
    def save(self, path: PathLike) -> None:
        with atomic_output(path, overwrite=True) as tmp:
            table = pa.table({"key": self.keys, "count": pa.array(self.counts, pa.int64())})
            table = table.replace_schema_metadata({"has_oov": json.dumps(self.has_oov)})
            pq.write_table(table, tmp)

    @classmethod
    def load(cls, path: PathLike) -> "Vocabulary":
        table = pq.read_table(path)
        has_oov = json.loads(table.schema.metadata[b"has_oov"])
        return cls(table["key"].combine_chunks(), table["count"].to_numpy(), has_oov)


def save_vocabularies(folder: PathLike, vocabularies: Dict[str, Vocabulary],
                      dense_means: Dict[str, float]) -> None:
    """Write ``folder/<column>.parquet`` per vocabulary and the dense means used for filling."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, v in vocabularies.items():
        v.save(folder / f"{name}.parquet")
    with atomic_output(folder / DENSE_MEANS_FILE, overwrite=True) as tmp:
        tmp.write_text(json.dumps(dense_means, indent=2, sort_keys=True) + "\n")


def load_vocabularies(log_path: PathLike) -> Tuple[Dict[str, Vocabulary], Dict[str, float]]:
    """The vocabularies and dense means saved in ``<log>/vocab/`` (a log directory or the
    ``vocab`` folder itself); empty when there are none."""
    folder = Path(log_path)
    if folder.name != VOCAB_DIR:
        folder = folder / VOCAB_DIR
    vocabularies = {f.stem: Vocabulary.load(f) for f in sorted(folder.glob("*.parquet"))
                    if not f.name.startswith(".")}
    means_file = folder / DENSE_MEANS_FILE
    means = json.loads(means_file.read_text()) if means_file.is_file() else {}
    return vocabularies, means
