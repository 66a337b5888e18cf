"""History shards: per target sample, its history as ``(begin, length)`` offsets into a store's
time index; and the direct query that gives the same histories without shards.

**Shards hold offsets, not ids.** A history is one contiguous range of positions in the store's
:class:`~iat_torchrec.tokens.time_index.UserTimeIndex`, so a shard stores ``(begin, length)``
per sample (12 bytes instead of 4 * max_len) and the ``[B, L]`` row ids, mask and side
information are materialised per batch by :class:`~iat_torchrec.history.HistoryMaterializer`
(on the training device). Side information depends only on (t, ts_i, label_i, label delay), all
of which the index and the shard hold, so nothing is lost.

The shards of a target log are a directory: one Parquet part per assembling rank
(:data:`SHARD_SCHEMA`) and a manifest naming the store version they index
(:func:`iat_torchrec.stages.assemble.assemble_history` writes them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from iat_torchrec.data.spec import INSTANCE_ID, TS, USER_ID
from iat_torchrec.history import (HistoryBatch, HistoryLayout, HistoryMaterializer,
                                  materialize_history)
from iat_torchrec.tokens.npyfile import file_crc32
from iat_torchrec.tokens.store import TokenStore
from iat_torchrec.tokens.time_index import stable_argsort

PathLike = Union[str, os.PathLike]

SHARDS_FORMAT = "iat_torchrec.history_shards"
SHARDS_FORMAT_VERSION = 1
SHARDS_MANIFEST = "manifest.json"
BEGIN, LENGTH = "begin", "length"
SHARD_SCHEMA = pa.schema([pa.field(INSTANCE_ID, pa.int64(), nullable=False),
                          pa.field(USER_ID, pa.int64(), nullable=False),
                          pa.field(TS, pa.int64(), nullable=False),
                          pa.field(BEGIN, pa.int64(), nullable=False),
                          pa.field(LENGTH, pa.int32(), nullable=False)])


class HistoryShardsError(ValueError):
    """History shards that are missing, corrupted, or do not belong to the given store."""


def query_history(store: TokenStore, user_id: np.ndarray, t: np.ndarray, layout: HistoryLayout,
                  allow_unknown_users: bool = False, method: str = "auto") -> HistoryBatch:
    """The vectorised query over a batch of (user, t), materialised on CPU: the last
    ``layout.max_len`` instances of each user with ts < t, oldest first, with side information.
    Raises :class:`~iat_torchrec.tokens.time_index.UnknownUserError` for users absent from the
    store unless ``allow_unknown_users`` (they get all-masked histories)."""
    index = store.time_index
    begin, length, _ = index.query(user_id, t, layout.max_len, allow_unknown_users)
    return materialize_history(
        torch.from_numpy(begin), torch.from_numpy(length),
        torch.from_numpy(np.ascontiguousarray(t, dtype=np.int64)),
        torch.from_numpy(np.asarray(index.rows)), torch.from_numpy(np.asarray(index.ts)),
        torch.from_numpy(np.asarray(index.label)),
        torch.tensor(layout.gap_boundaries_s or [], dtype=torch.int64), layout, method)


class HistoryShards:
    """Opened history shards: ``(begin, length, t)`` of every target sample by instance id.

    Holds 28 bytes per sample. Offsets refer to one version of one store's time index:
    :meth:`check_store` (called by :meth:`materializer`) refuses any other.
    """

    def __init__(self, path: Path, manifest: Dict[str, Any], instance_id: np.ndarray,
                 begin: np.ndarray, length: np.ndarray, ts: np.ndarray) -> None:
        self.path, self.manifest = path, manifest
        self.instance_id, self.begin, self.length, self.ts = instance_id, begin, length, ts
        self.layout = HistoryLayout(max_len=int(manifest["max_len"]),
                                    label_delay_s=int(manifest["label_delay_s"]),
                                    gap_boundaries_s=tuple(manifest["gap_boundaries_s"]))

    @property
    def num_samples(self) -> int:
        return int(self.instance_id.size)

    @classmethod
    def open(cls, path: PathLike, verify: bool = True) -> "HistoryShards":
        """Read the manifest and every part (checking sizes and, with ``verify``, CRC32s)."""
        path = Path(path)
        mf = path / SHARDS_MANIFEST
        if not mf.is_file():
            raise HistoryShardsError(f"{mf}: manifest missing: not history shards, or ones whose "
                                     "writing never completed")
        try:
            m = json.loads(mf.read_text())
            if m.get("format") != SHARDS_FORMAT or m.get("format_version") != SHARDS_FORMAT_VERSION:
                raise ValueError(f"format {m.get('format')!r} version {m.get('format_version')!r}, "
                                 f"expected {SHARDS_FORMAT!r} version {SHARDS_FORMAT_VERSION}")
            parts = list(m["parts"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HistoryShardsError(f"{mf}: unreadable or unsupported manifest ({e})") from None
        cols: Dict[str, List[np.ndarray]] = {c: [] for c in SHARD_SCHEMA.names}
        for p in parts:
            f = path / p["name"]
            if not f.is_file():
                raise HistoryShardsError(f"{f}: part listed in the manifest is missing")
            if f.stat().st_size != p["bytes"]:
                raise HistoryShardsError(f"{f}: {f.stat().st_size} bytes, the manifest says "
                                         f"{p['bytes']}: truncated or replaced")
            if verify and f"{file_crc32(f, offset=0):08x}" != p["crc32"]:
                raise HistoryShardsError(f"{f}: checksum mismatch: the file is corrupted")
            try:
                table = pq.read_table(f)
            except (OSError, pa.ArrowException) as e:
                raise HistoryShardsError(f"{f}: unreadable Parquet ({e})") from None
            if table.num_rows != p["rows"] or not table.schema.equals(SHARD_SCHEMA):
                raise HistoryShardsError(f"{f}: {table.num_rows} rows of schema {table.schema}, "
                                         f"the manifest says {p['rows']} rows of {SHARD_SCHEMA}")
            for c in cols:
                cols[c].append(table[c].to_numpy())
        arrays = {c: np.concatenate(v) if v else np.empty(0, dtype=np.int64)
                  for c, v in cols.items()}
        order = stable_argsort(arrays[INSTANCE_ID])
        ids = arrays[INSTANCE_ID][order]
        dup = np.flatnonzero(ids[1:] == ids[:-1])
        if dup.size:
            raise HistoryShardsError(f"{path}: instance_id {ids[dup[0]]} has two histories: the "
                                     "target log's instance ids are not unique")
        return cls(path, m, ids, arrays[BEGIN][order], arrays[LENGTH][order].astype(np.int64),
                   arrays[TS][order])

    def lookup(self, instance_ids: Union[np.ndarray, torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(begin, length, t)`` int64 tensors of the given target samples."""
        ids = np.asarray(instance_ids.cpu() if isinstance(instance_ids, torch.Tensor)
                         else instance_ids, dtype=np.int64)
        pos = np.searchsorted(self.instance_id, ids)
        np.minimum(pos, max(self.num_samples - 1, 0), out=pos)
        found = self.instance_id[pos] == ids if self.num_samples else np.zeros(ids.size, bool)
        if not found.all():
            missing = np.unique(ids[~found])
            raise HistoryShardsError(f"{self.path}: {missing.size} instance id(s) have no history "
                                     f"here (first {missing[:5].tolist()}): shards assembled "
                                     "for another target log?")
        return (torch.from_numpy(self.begin[pos]), torch.from_numpy(self.length[pos]),
                torch.from_numpy(self.ts[pos]))

    def check_store(self, store: TokenStore) -> None:
        """Raise unless ``store`` is the store version whose time index these offsets index."""
        s = self.manifest["store"]
        if (store.version, store.index_checksum) != (s["version"], s["index_checksum"]):
            raise HistoryShardsError(
                f"{self.path}: assembled against {s['path']} version {s['version']} (index "
                f"{s['index_checksum']}), but {store.path} is version {store.version} (index "
                f"{store.index_checksum}): the offsets would point at the wrong rows; re-run "
                "apps/assemble.py")

    def materializer(self, store: TokenStore,
                     device: Union[str, torch.device] = "cpu") -> HistoryMaterializer:
        """A :class:`HistoryMaterializer` for these shards on ``device`` (store checked)."""
        self.check_store(store)
        return HistoryMaterializer(store.time_index, self.layout, device)

