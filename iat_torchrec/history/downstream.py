"""The downstream batch: an :class:`~iat_torchrec.data.batch.InstanceBatch` plus its targets'
histories, and their item-id histories as extra sparse features ``hist_item_0 ..
hist_item_{k-1}`` (one per step, a bag of one item id, empty at padding)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, List, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iat_torchrec.data.batch import InstanceBatch
from iat_torchrec.history.batch import HistoryBatch
from iat_torchrec.history.ops import last_step_items

HIST_ITEM_PREFIX = "hist_item_"


def history_item_features(k: int) -> List[str]:
    """Names of the k per-step item-history features: ``hist_item_0 .. hist_item_{k-1}``."""
    return [f"{HIST_ITEM_PREFIX}{j}" for j in range(k)]


def add_history_items(sparse: KeyedJaggedTensor, item_ids: torch.Tensor) -> KeyedJaggedTensor:
    """``sparse`` plus the k item-history features of ``item_ids`` [B, k] (table ids, -1 =
    padding -> an empty bag)."""
    if sparse.weights_or_none() is not None:
        raise ValueError("weighted KJTs are not supported with item histories")
    b, k = item_ids.shape
    if sparse.stride() != b:
        raise ValueError(f"item_ids has {b} rows, the KJT a batch of {sparse.stride()}")
    real = (item_ids >= 0).t()  # [k, B], key-major like the KJT
    values = item_ids.t()[real].to(sparse.values().dtype)
    return KeyedJaggedTensor(
        keys=[*sparse.keys(), *history_item_features(k)],
        values=torch.cat([sparse.values(), values]),
        lengths=torch.cat([sparse.lengths(), real.reshape(-1).to(sparse.lengths().dtype)]))


@dataclass
class DownstreamBatch(InstanceBatch):
    """An :class:`InstanceBatch` plus what the history sources read.

    - ``history``: the target samples' histories (row ids of the token store the lookups serve,
      mask, matured label, gap bucket).
    - ``history_items``: [B, k] item ids of the item-history steps (the last k steps of
      ``history``, -1 = padding). The model reads their embeddings from ``sparse_features``,
      which carries the same ids as the features ``hist_item_0 .. hist_item_{k-1}``
      (:meth:`build` adds both).
    - ``target_codes``: [B, T, M] the target samples' own HGAQ codes (for L_align).
    - ``item_history``: the histories the item branch reads when they come from another store
      than ``history`` (say the target domain's own store, while ``history`` indexes another
      domain's IAT tokens); None: the item branch reads ``history``. ``history_items`` are then
      the last k steps of ``item_history``.
    """

    history: Optional[HistoryBatch] = None
    history_items: Optional[torch.Tensor] = None
    target_codes: Optional[torch.Tensor] = None
    item_history: Optional[HistoryBatch] = None

    @classmethod
    def build(cls, batch: InstanceBatch, history: Optional[HistoryBatch] = None,
              step_items: Optional[torch.Tensor] = None, item_history_len: int = 0,
              target_codes: Optional[torch.Tensor] = None,
              item_history: Optional[HistoryBatch] = None) -> "DownstreamBatch":
        """A downstream batch from an instance batch. ``step_items`` [B, L]: the item id of every
        step of the item branch's history (``item_history`` if given, else ``history``; table
        ids, anything at padding); with ``item_history_len`` k > 0 the last k steps' items go
        into ``history_items`` and ``sparse_features``."""
        sparse, items = batch.sparse_features, None
        if item_history_len > 0:
            steps = item_history if item_history is not None else history
            if steps is None or step_items is None:
                raise ValueError("an item history needs history and step_items")
            if step_items.shape != steps.mask.shape:
                raise ValueError(f"step_items {tuple(step_items.shape)} must match the history "
                                 f"{tuple(steps.mask.shape)}")
            items = last_step_items(step_items, steps.mask, item_history_len)
            sparse = add_history_items(sparse, items)
        base = {f.name: getattr(batch, f.name) for f in fields(InstanceBatch)}
        base["sparse_features"] = sparse
        return cls(**base, history=history, history_items=items, target_codes=target_codes,
                   item_history=item_history)

    def _map(self, fn: Callable[[Any], Any]) -> "DownstreamBatch":
        return DownstreamBatch(**{f.name: None if getattr(self, f.name) is None
                                  else fn(getattr(self, f.name)) for f in fields(self)})

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value.record_stream(stream)
