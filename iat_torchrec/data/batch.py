"""``InstanceBatch``: TorchRec's ``Batch`` plus the key columns of each row."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.datasets.utils import Batch


@dataclass
class InstanceBatch(Batch):
    """A TorchRec ``Batch`` (dense [B, D] float32, sparse KJT, labels [B, num_labels] float32)
    that also carries ``instance_id``, ``user_id`` and ``ts`` ([B] int64 each).

    It goes wherever a ``Batch`` goes (``TrainPipelineSparseDist`` included); the key columns
    are what token export, user-order training and per-user metrics need.
    """

    instance_id: torch.Tensor
    user_id: torch.Tensor
    ts: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "InstanceBatch":
        return InstanceBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            instance_id=self.instance_id.to(device=device, non_blocking=non_blocking),
            user_id=self.user_id.to(device=device, non_blocking=non_blocking),
            ts=self.ts.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        for t in (self.instance_id, self.user_id, self.ts):
            t.record_stream(stream)

    def pin_memory(self) -> "InstanceBatch":
        return InstanceBatch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            instance_id=self.instance_id.pin_memory(),
            user_id=self.user_id.pin_memory(),
            ts=self.ts.pin_memory(),
        )

    def __len__(self) -> int:
        return int(self.instance_id.numel())
