"""Ingest: newly logged instances into a bundle's stores, durably and atomically.

An instance is a JSON object with ``instance_id``, ``user_id``, ``ts`` (seconds), its labels
(the spec's label names, 0/1; a label not known yet may be left out and sent later with
:meth:`Ingestor.update_labels`; it counts as 0 until then) and its fields in the feature
spec's form (:mod:`~iat_torchrec.serving.features`). :meth:`Ingestor.ingest`:

1. checks every instance (a :class:`~iat_torchrec.serving.features.RequestError` naming the
   field, or an id already stored / given twice: status 409) and computes each one's IAT token
   with the bundle's frozen source model (the pre-SIT token z, what compress stores) and its
   HGAQ codes with the frozen tokenizer;
2. writes the batch to the write-ahead log ``ingest/pending-<id>.npz`` (fsync), then appends
   it to each store (:meth:`~iat_torchrec.tokens.store.TokenStore.appender`: a new segment and
   index, published by one atomic, fsync'ed manifest swap), then drops the log entry;
3. only then acknowledges.

A server killed at any point loses nothing acknowledged and shows nothing half-written: a
store's unfinished append was never named by its manifest, and :meth:`Ingestor.recover` (run
when a server starts) re-applies every pending batch to the stores that lack it, so the IAT and
SIF stores always end up holding the same instances.

Item-id branches (BST / DIN) need the item of every history-store row: for ingested rows it is
kept in ``ingest/items-<history store version>.npy`` (instance id, item id), written before
the append that creates that version.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from iat_torchrec.data.spec import SparseField
from iat_torchrec.serving.bundle import Bundle
from iat_torchrec.serving.features import RequestError, candidate_features, check_int
from iat_torchrec.tokens.store import TokenStore, TokenStoreError, fsync_dir

KEYS = ("instance_id", "user_id", "ts")


class Ingestor:
    """Appends instances to ``bundle``'s stores (one writer: the server's scoring thread).

    Args:
        bundle: the loaded bundle; its ``ingest`` entry says which frozen models it carries.
    """

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        self.labels = list(self.spec.labels)
        self.dir = bundle.ingest_dir
        self.source = bundle.source_model()
        self.tokenizer = bundle.tokenizer()
        self.store_names = [n for n in ("iat", "sif") if bundle.store_path(n) is not None]
        item_len = int(bundle.manifest["item_history_len"])
        self.item_field: Optional[SparseField] = None
        if item_len:
            field = self.spec.field(bundle.manifest["item_feature"])
            assert isinstance(field, SparseField)
            self.item_field = field

    @property
    def enabled(self) -> bool:
        """Whether this bundle can ingest: every store it reads has its frozen model."""
        need = {"iat": self.source, "sif": self.tokenizer}
        return all(need[n] is not None for n in self.store_names)

    def _why_disabled(self) -> str:
        missing = [n for n in self.store_names
                   if {"iat": self.source, "sif": self.tokenizer}[n] is None]
        what = {"iat": "--source_checkpoint", "sif": "--tokenizer_checkpoint"}
        return ("this bundle was exported without " + " and ".join(what[n] for n in missing)
                + ": it cannot compress new instances")

    # ----------------------------------------------------------------- checking
    def _keys(self, instances: Sequence[Mapping[str, Any]]) -> Dict[str, np.ndarray]:
        cols: Dict[str, List[int]] = {k: [] for k in (*KEYS, *self.labels)}
        for i, inst in enumerate(instances):
            where = f"instances[{i}]"
            if not isinstance(inst, Mapping):
                raise RequestError(where, "expected an object with instance_id, user_id, ts, "
                                          "labels and the spec's fields")
            for k in KEYS:
                if inst.get(k) is None:
                    raise RequestError(f"{where}.{k}", "missing")
                cols[k].append(check_int(inst[k], f"{where}.{k}", minimum=0))
            for name in self.labels:
                v = inst.get(name, 0)
                if v is None:
                    v = 0
                if isinstance(v, bool) or v not in (0, 1):
                    raise RequestError(f"{where}.{name}", f"expected a label 0 or 1, got {v!r}")
                cols[name].append(int(v))
        out = {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}
        ids = out["instance_id"]
        uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
        if (counts > 1).any():
            dup = int(uniq[counts > 1][0])
            raise RequestError("instances", f"instance_id {dup} is given more than once",
                               status=409)
        return out

    def _known(self, ids: np.ndarray, store: TokenStore) -> np.ndarray:
        """Which of ``ids`` ``store`` already holds."""
        if store.num_rows == 0:
            return np.zeros(ids.shape, bool)
        s = store._id_sorted  # noqa: SLF001  (the store's own sorted ids: no copy)
        pos = np.minimum(np.searchsorted(s, ids), s.shape[0] - 1)
        return np.asarray(s[pos] == ids)

    # ----------------------------------------------------------------- ingesting
    @torch.no_grad()
    def encode(self, instances: Sequence[Mapping[str, Any]]) -> Dict[str, np.ndarray]:
        """Key columns, labels, tokens / codes and item ids of ``instances`` (checked)."""
        if not self.enabled:
            raise RequestError("instances", self._why_disabled(), status=409)
        if not instances:
            raise RequestError("instances", "empty: give at least one instance")
        batch = self._keys(instances)
        dense, sparse, _ = candidate_features(self.spec, instances, prefix="instances",
                                              extra=(*KEYS, *self.labels))
        if self.source is not None:
            batch["tokens"] = self.source.tokens(sparse, dense).float().numpy()
        if self.tokenizer is not None:
            batch["codes"] = self.tokenizer.tokenize(dense, sparse).numpy()
        if self.item_field is not None:
            batch["items"] = sparse[self.item_field.name].values().numpy().astype(np.int64)
        return batch

    def ingest(self, instances: Sequence[Mapping[str, Any]],
               stores: Mapping[str, TokenStore]) -> Dict[str, Any]:
        """Append ``instances`` to ``stores`` (the open ``iat`` / ``sif`` stores); returns the
        acknowledgement (count, new store versions). Raises :class:`RequestError` (409) for an
        instance id already stored, before anything is written."""
        batch = self.encode(instances)
        for name in self.store_names:
            known = self._known(batch["instance_id"], stores[name])
            if known.any():
                raise RequestError("instances", f"instance_id "
                                   f"{int(batch['instance_id'][known][0])} is already in the "
                                   f"{name} store: an instance is ingested once (labels that "
                                   "arrive later go to /labels)", status=409)
        self.dir.mkdir(exist_ok=True)
        pending = self.dir / f"pending-{uuid.uuid4().hex}.npz"
        _write_durably(pending, batch)
        self.apply(batch, stores)
        pending.unlink()
        fsync_dir(self.dir)
        return {"ingested": int(batch["instance_id"].size),
                "store_versions": {n: s.version for n, s in stores.items() if s is not None}}

    def apply(self, batch: Mapping[str, np.ndarray], stores: Dict[str, TokenStore]) -> None:
        """Append the rows of ``batch`` that each store lacks (all of them, or none, per
        store); ``stores`` is updated in place with the new versions."""
        hist = self.bundle.manifest["history_store"]
        first = batch[self.labels[0]]
        for name in self.store_names:
            store = stores[name]
            missing = ~self._known(batch["instance_id"], store)
            if not missing.any():
                continue
            if name == hist and "items" in batch:
                pairs = np.stack([batch["instance_id"][missing], batch["items"][missing]], 1)
                _write_durably(self.dir / f"items-{store.version + 1:05d}.npy", pairs)
            rows = batch["tokens" if name == "iat" else "codes"][missing]
            with store.appender() as w:
                w.append(batch["instance_id"][missing], batch["user_id"][missing],
                         batch["ts"][missing], first[missing], rows)
            stores[name] = TokenStore.open(store.path, verify=False)

    def recover(self, stores: Dict[str, TokenStore]) -> int:
        """Finish every batch a killed server left in the write-ahead log; returns how many."""
        done = 0
        for p in sorted(self.dir.glob("pending-*.npz")) if self.dir.is_dir() else []:
            try:
                with np.load(p, allow_pickle=False) as z:
                    batch = {k: z[k] for k in z.files}
            except (OSError, ValueError):  # torn before its fsync: never acknowledged
                p.unlink()
                continue
            self.apply(batch, stores)
            p.unlink()
            done += 1
        for p in self.dir.glob(".*.tmp-*") if self.dir.is_dir() else []:
            p.unlink()
        return done

    def items(self, store: TokenStore) -> Dict[int, int]:
        """Instance id -> item id of every ingested row of the history store ``store``."""
        out: Dict[int, int] = {}
        for p in sorted(self.dir.glob("items-*.npy")) if self.dir.is_dir() else []:
            if int(p.stem.split("-")[1]) <= store.version:
                for i, item in np.load(p, allow_pickle=False).tolist():
                    out[int(i)] = int(item)
        return out

    def update_labels(self, updates: Sequence[Mapping[str, Any]],
                      stores: Dict[str, TokenStore]) -> Dict[str, Any]:
        """Labels that arrived later: ``[{"instance_id": ..., "<label>": 0/1}]`` (the spec's
        first label: the one histories carry). Unknown instance ids: 404, nothing changed."""
        name = self.labels[0]
        ids, labs = [], []
        for i, u in enumerate(updates):
            where = f"labels[{i}]"
            if not isinstance(u, Mapping) or u.get("instance_id") is None:
                raise RequestError(f"{where}.instance_id", "missing")
            ids.append(check_int(u["instance_id"], f"{where}.instance_id", minimum=0))
            v = u.get(name)
            if isinstance(v, bool) or v not in (0, 1):
                raise RequestError(f"{where}.{name}", f"expected a label 0 or 1, got {v!r}")
            labs.append(int(v))
        if not ids:
            raise RequestError("labels", "empty: give at least one label")
        id_arr = np.asarray(ids, dtype=np.int64)
        for n in self.store_names:
            known = self._known(id_arr, stores[n])
            if not known.all():
                raise RequestError(f"labels[{int(np.flatnonzero(~known)[0])}].instance_id",
                                   f"instance {int(id_arr[~known][0])} is not in the {n} store",
                                   status=404)
        for n in self.store_names:
            try:
                stores[n] = stores[n].update_labels(id_arr, np.asarray(labs))
            except TokenStoreError as e:
                raise RequestError("labels", str(e), status=409) from None
        return {"updated": len(ids),
                "store_versions": {n: s.version for n, s in stores.items() if s is not None}}


def _write_durably(path: Path, arrays: Any) -> None:
    """Write ``arrays`` (a dict: .npz, an array: .npy) under a temporary name, fsync, rename,
    fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        if isinstance(arrays, Mapping):
            np.savez(f, **arrays)
        else:
            np.save(f, arrays, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
