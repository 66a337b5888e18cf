"""The downstream batch provider: a target log (train / valid / test split) read as
:class:`~iat_torchrec.history.DownstreamBatch` objects, one partition per rank.

Each batch is the :class:`~iat_torchrec.data.reader.InstanceLogReader` batch of this rank (same
orders, same dealing of rows to ranks), plus, depending on what it is given:

- **history** (``history`` shards + the ``store`` they index): the targets' histories by
  timestamp (METHOD.md, "Stage 2"), materialised per batch on ``device`` by the shards'
  :class:`~iat_torchrec.history.HistoryMaterializer`. The shards must have been
  assembled against exactly this store version (:meth:`HistoryShards.check_store`) and for this
  target log (the shards' ``t`` of every target must equal its ``ts``).
- **item-id history** (``item_feature`` and ``item_history_len`` k, with ``item_logs``): the
  item ids of the last k real history steps, oldest first, -1 at padding, added to
  ``sparse_features`` as ``hist_item_0 .. hist_item_{k-1}`` (:func:`add_history_items`) and kept
  in ``history_items``. The item of each store row comes from the instance logs that were
  exported into the store (read once into ``row_items``, aligned with store rows).
- **target codes** (``code_store``, kind sif): each target sample's own HGAQ codes
  ``[B, T, M]`` uint8 (for L_align), looked up by instance id.
- **the item branch's own history** (``item_shards`` + ``item_store``): when the item-id
  history comes from another store than ``history`` (the target domain's own store, while
  ``history`` indexes another domain's IAT tokens, joined on the user id), its histories are
  materialised from these shards into ``item_history`` and the item ids come from that store's
  rows (``item_logs`` are then the logs exported into ``item_store``).

Decisions:

- The batch's own tensors, ``history_items`` and ``target_codes`` stay on the CPU (as the
  plain reader's: TorchRec's pipelines copy a batch to the device themselves); only the history
  is materialised on ``device``, where its time-index buffers live.
- The item history is computed on the CPU straight from the shards' ``(begin, length)``
  (:func:`~iat_torchrec.history.last_range_steps`: a history is one contiguous range of
  time-index positions), without a device round trip; a test checks that it picks the same
  steps as :func:`~iat_torchrec.history.last_steps_index` on the materialised history, which
  :meth:`DownstreamBatch.build` and the model's :func:`~iat_torchrec.history.last_steps` use.
- A null item (a single-valued field may hold nulls: an empty bag) gives id -1: an empty
  bag at that step, like padding; the step's label and gap still count.
- Labels: the spec always lists them (:class:`FeatureSpec` requires it); every label column of
  the target log must be present and hold no nulls (checked up front from the Parquet
  statistics, or by reading the label columns where a file has none).
- Label delay: a history step's label is shown once it has matured in the *store's* domain
  (the delay the store recorded at export, which assembly uses by default): shards assembled
  with a shorter delay than their store's are refused (labels would leak); a store that records
  none is held to the target spec's ``label_delay_s``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import torch

from iat_torchrec.data.batch import InstanceBatch
from iat_torchrec.data.log import InstanceLogError, log_files, open_parquet
from iat_torchrec.data.reader import InstanceLogReader, ReaderConfig, hash_ids
from iat_torchrec.data.spec import INSTANCE_ID, FeatureSpec, SparseField
from iat_torchrec.history import DownstreamBatch, add_history_items, last_range_steps
from iat_torchrec.tokens.shards import HistoryShards, HistoryShardsError
from iat_torchrec.tokens.store import TokenStore, TokenStoreError

PathLike = Union[str, os.PathLike]

_NO_ITEM = -2  # row_items value of a store row no item log covered (never left after building)


class DownstreamDataError(ValueError):
    """Inputs of the downstream reader that do not fit together."""


# --------------------------------------------------------------------------- checks
def check_labels(path: PathLike, spec: FeatureSpec) -> None:
    """Raise unless every label column of the spec is present in every file of the log at
    ``path`` and holds no nulls (downstream training and evaluation need every target's label).
    Uses the Parquet null-count statistics; reads a label column only where a file lacks them."""
    if not spec.labels:  # FeatureSpec already refuses this; kept for specs built otherwise
        raise DownstreamDataError(f"{path}: the feature spec lists no label column")
    for f in log_files(path):
        pf = open_parquet(f)
        names = pf.schema_arrow.names
        meta = pf.metadata
        for label in spec.labels:
            if label not in names:
                raise InstanceLogError(f, "missing label column required by the feature spec",
                                       column=label)
            pq_index = _parquet_column_index(pf, label)
            nulls = 0
            for g in range(meta.num_row_groups):
                col = meta.row_group(g).column(pq_index) if pq_index is not None else None
                stats = col.statistics if col is not None else None
                if stats is not None and stats.has_null_count:
                    nulls += int(stats.null_count)
                else:
                    nulls += int(pf.read_row_group(g, columns=[label])[label].null_count)
            if nulls:
                rows = meta.num_rows
                what = ("has no values (all null)" if nulls == rows
                        else f"has {nulls} null value(s) of {rows}")
                raise InstanceLogError(f, f"label column {what}: every target sample needs its "
                                          "label for downstream training and evaluation",
                                       column=label)


def _parquet_column_index(pf, name: str) -> Optional[int]:
    """The Parquet leaf column of a flat (non-nested) Arrow column, or None."""
    schema = pf.metadata.schema
    for i in range(len(schema)):
        if schema.column(i).path == name:
            return i
    return None


def check_label_delay(spec: FeatureSpec, store: Optional[TokenStore],
                      shards: Optional[HistoryShards], target: PathLike) -> None:
    """Raise if the shards show labels sooner than they mature: before the store's recorded
    label delay (its own domain's), or the target spec's when the store records none."""
    if shards is None:
        return
    recorded = store.label_delay_s if store is not None else None
    want = int(recorded) if recorded is not None else int(spec.label_delay_s)
    if shards.layout.label_delay_s < want:
        whose = (f"the store {store.path} was exported with" if recorded is not None
                 else f"the target log {target} has")
        raise DownstreamDataError(
            f"{shards.path}: history shards assembled with label_delay_s="
            f"{shards.layout.label_delay_s}, but {whose} label_delay_s={want}: labels would "
            "be shown before they mature; re-run apps/assemble.py")


# --------------------------------------------------------------------------- item ids
def store_row_items(store: TokenStore, logs: Sequence[PathLike], field: SparseField) -> np.ndarray:
    """The item id (table id: hashed if the field is) of every store row, int64 aligned with
    store rows, read from the instance logs that were exported into the store. A null item gives
    -1. Raises if a log instance is not in the store or a store row is in none of the logs."""
    if field.multi_valued:
        raise DownstreamDataError(f"item field {field.name!r} is multi-valued; the item-id "
                                  "history needs a single-valued field")
    if not logs:
        raise DownstreamDataError(f"{store.path}: an item-id history needs item_logs, the "
                                  "instance logs that were exported into the store")
    out = np.full(store.num_rows, _NO_ITEM, dtype=np.int64)
    for log in logs:
        for f in log_files(log):
            pf = open_parquet(f)
            if field.name not in pf.schema_arrow.names:
                raise InstanceLogError(f, "missing item column", column=field.name)
            for g in range(pf.num_row_groups):
                try:
                    t = pf.read_row_group(g, columns=[INSTANCE_ID, field.name])
                except (OSError, pa.ArrowException) as e:
                    raise InstanceLogError(f, f"unreadable Parquet data in row group {g} "
                                              f"({e})") from None
                ids = t[INSTANCE_ID].to_numpy()
                col = t[field.name]
                valid = ~col.is_null().to_numpy(zero_copy_only=False)
                items = np.full(ids.size, -1, dtype=np.int64)
                items[valid] = col.drop_null().to_numpy().astype(np.int64)
                if field.hashed:
                    items[valid] = hash_ids(items[valid], field.num_embeddings)
                try:
                    rows = store.rows_of(ids)
                except TokenStoreError as e:
                    raise DownstreamDataError(
                        f"{f}: instances of this item log are not in the token store ({e}): "
                        "item_logs must be the logs exported into the store") from None
                out[rows] = items
    missing = np.flatnonzero(out == _NO_ITEM)
    if missing.size:
        ids = store.column("instance_id", missing[:5])
        shown = ", ".join(str(int(i)) for i in ids)
        more = f" and {missing.size - 5} more" if missing.size > 5 else ""
        raise DownstreamDataError(
            f"{store.path}: {missing.size} store row(s) have no item in the item logs "
            f"{[str(p) for p in logs]} (instance ids {shown}{more}): pass every log exported "
            "into the store")
    return out


# --------------------------------------------------------------------------- the reader
class DownstreamReader:
    """Iterate over this rank's partition of a target log as :class:`DownstreamBatch` objects.

    Args:
        path: the target log (a train / valid / test split).
        spec: its feature spec (default: the spec saved beside the log).
        config: batch size, order, seed, drop_last, chunk size (as :class:`InstanceLogReader`).
        rank, world_size: this process's partition; every row goes to exactly one rank.
        history: history shards assembled for this target log (``None``: no history).
        store: the token store the shards index (required with ``history``).
        device: where histories are materialised.
        item_feature: the sparse field whose ids form the item-id history ("": none).
        item_history_len: k, the item-id history's length (needs ``history``).
        item_logs: the instance logs exported into the item branch's store (``item_store`` if
            given, else ``store``): the items of history steps.
        code_store: a SIF store with every target's own codes (``target_codes``).
        item_shards, item_store: the item branch's own history shards of this target log and
            the store they index, when its history comes from another store than ``history``
            (``item_history`` of the batches); default: ``history`` and ``store``.
        tmp_dir: the inner reader's external-shuffle directory.
    """

    def __init__(self, path: PathLike, spec: Optional[FeatureSpec] = None,
                 config: Optional[ReaderConfig] = None, rank: int = 0, world_size: int = 1, *,
                 history: Optional[HistoryShards] = None, store: Optional[TokenStore] = None,
                 device: Union[str, torch.device] = "cpu", item_feature: str = "",
                 item_history_len: int = 0, item_logs: Sequence[PathLike] = (),
                 code_store: Optional[TokenStore] = None,
                 item_shards: Optional[HistoryShards] = None,
                 item_store: Optional[TokenStore] = None,
                 tmp_dir: Optional[PathLike] = None) -> None:
        self.path = Path(path)
        self.spec = spec if spec is not None else FeatureSpec.load(self.path)
        self.reader = InstanceLogReader(self.path, self.spec, config, rank, world_size, tmp_dir)
        self.config = self.reader.config
        check_labels(self.path, self.spec)
        self.device = torch.device(device)
        self.history, self.store = history, store
        if (history is None) != (store is None):
            raise DownstreamDataError("history shards and the token store they index go "
                                      "together: give both or neither")
        check_label_delay(self.spec, store, history, self.path)
        self.materializer = None
        if history is not None:
            self.materializer = history.materializer(store, self.device)  # check_store inside
        if item_history_len < 0:
            raise DownstreamDataError(f"item_history_len must be >= 0, got {item_history_len}")
        self.item_history_len = int(item_history_len)
        self.item_feature = item_feature
        self.row_items: Optional[np.ndarray] = None
        self._index_rows: Optional[np.ndarray] = None
        if (item_shards is None) != (item_store is None):
            raise DownstreamDataError("the item history's shards and the store they index go "
                                      "together: give both or neither")
        self.item_materializer = None
        if item_shards is not None:
            if self.item_history_len == 0:
                raise DownstreamDataError("item history shards are read by the item branch: "
                                          "give item_history_len > 0")
            check_label_delay(self.spec, item_store, item_shards, self.path)
            self.item_materializer = item_shards.materializer(item_store, self.device)
        self.item_shards = item_shards if item_shards is not None else history
        self.item_store = item_store if item_store is not None else store
        if self.item_history_len > 0:
            if self.item_shards is None:
                raise DownstreamDataError("an item-id history (item_history_len > 0) needs the "
                                          "history shards and their store")
            if not item_feature:
                raise DownstreamDataError("item_history_len > 0 needs item_feature")
            if item_feature not in self.spec.sparse_names:
                raise DownstreamDataError(f"item_feature {item_feature!r} is not a sparse field "
                                          f"of the spec ({self.spec.sparse_names})")
            field = self.spec.field(item_feature)
            assert isinstance(field, SparseField)
            self.row_items = store_row_items(self.item_store, list(item_logs), field)
            self._index_rows = np.asarray(self.item_store.time_index.rows, dtype=np.int64)
        self.code_store = code_store
        if code_store is not None and code_store.kind != "sif":
            raise DownstreamDataError(f"{code_store.path}: target codes come from a SIF store, "
                                      f"got kind {code_store.kind!r}")

    @property
    def num_rows(self) -> int:
        """Rows in the whole target log."""
        return self.reader.num_rows

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of the shuffled order for this epoch."""
        self.reader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.reader)

    def __iter__(self) -> Iterator[DownstreamBatch]:
        for batch in self.reader:
            yield self.extend(batch)

    # ------------------------------------------------------------------ one batch
    def extend(self, batch: InstanceBatch) -> DownstreamBatch:
        """The downstream batch of an instance batch of the target log."""
        labels = batch.labels
        if not bool(torch.isfinite(labels).all()):
            raise DownstreamDataError(f"{self.path}: a target sample without a label value "
                                      "(NaN); labels must exist")
        history = items = codes = item_history = None
        sparse = batch.sparse_features
        if self.history is not None:
            begin, length, t = self._ranges(self.history, batch)
            history = self.materializer(begin, length, t)
            if self.item_materializer is not None:
                begin, length, t = self._ranges(self.item_shards, batch)
                item_history = self.item_materializer(begin, length, t)
            if self.item_history_len > 0:
                items = self._items(begin.numpy(), length.numpy())
                sparse = add_history_items(sparse, items)
        if self.code_store is not None:
            try:
                rows = self.code_store.rows_of(batch.instance_id.numpy())
            except TokenStoreError as e:
                raise DownstreamDataError(f"target samples of {self.path} are missing from the "
                                          f"code store: {e}") from None
            codes = torch.from_numpy(np.ascontiguousarray(self.code_store.tokens(rows)))
        return DownstreamBatch(
            dense_features=batch.dense_features, sparse_features=sparse, labels=labels,
            instance_id=batch.instance_id, user_id=batch.user_id, ts=batch.ts,
            weight=torch.ones(len(batch), dtype=torch.float32),
            history=history, history_items=items, target_codes=codes, item_history=item_history)

    def _ranges(self, shards: HistoryShards, batch: InstanceBatch):
        """``(begin, length, t)`` of the batch's targets in ``shards``, which must have been
        assembled for this target log."""
        begin, length, t = shards.lookup(batch.instance_id)
        if not torch.equal(t, batch.ts):
            bad = int(torch.nonzero(t != batch.ts)[0, 0])
            raise HistoryShardsError(
                f"{shards.path}: instance {int(batch.instance_id[bad])} has ts "
                f"{int(batch.ts[bad])} in {self.path} but {int(t[bad])} in the shards: "
                "shards assembled for another target log")
        return begin, length, t

    def _items(self, begin: np.ndarray, length: np.ndarray) -> torch.Tensor:
        """[B, k] item ids of the last k real steps, oldest first, -1 after them."""
        assert self.row_items is not None and self._index_rows is not None
        k = self.item_history_len
        if self._index_rows.size == 0:  # an empty store: every history is empty
            return torch.full((begin.size, k), -1, dtype=torch.int64)
        pos, valid = last_range_steps(begin, length, self.item_shards.layout.max_len, k)
        items = np.where(valid, self.row_items[self._index_rows[pos]], -1)
        return torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64))


__all__: List[str] = ["DownstreamReader", "DownstreamDataError", "check_labels",
                      "check_label_delay", "store_row_items"]
