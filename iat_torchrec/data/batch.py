"""``InstanceBatch``: TorchRec's ``Batch`` plus the key columns of each row."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torchrec.datasets.utils import Batch


@dataclass
class InstanceBatch(Batch):
    """A TorchRec ``Batch`` (dense [B, D] float32, sparse KJT, labels [B, num_labels] float32)
    that also carries ``instance_id``, ``user_id`` and ``ts`` ([B] int64 each) and a per-row loss
    ``weight`` ([B] float32).

    It goes wherever a ``Batch`` goes (``TrainPipelineSparseDist`` included); the key columns
    are what token export, user-order training and per-user metrics need.
    """

    instance_id: torch.Tensor
    user_id: torch.Tensor
    ts: torch.Tensor
    weight: torch.Tensor  # [B] float32 row weight in the loss: 1, or 0 for a padding row

    def _map(self, fn: Callable[[Any], Any]) -> "InstanceBatch":
        return InstanceBatch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device, non_blocking: bool = False) -> "InstanceBatch":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            getattr(self, f.name).record_stream(stream)

    def pin_memory(self) -> "InstanceBatch":
        return self._map(lambda t: t.pin_memory())

    def as_padding(self) -> "InstanceBatch":
        """The same rows with weight 0: lets a rank that ran out of data take part in a
        collective step without changing the model."""
        return dataclasses.replace(self, weight=torch.zeros_like(self.weight))

    def __len__(self) -> int:
        return int(self.instance_id.numel())
