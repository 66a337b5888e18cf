"""The history contract: how histories are cut (:class:`HistoryLayout`), the label codes of
their steps, and a batch of materialised histories (:class:`HistoryBatch`).

For a target sample of user u at time t the history is u's last ``max_len`` store rows with
``ts < t`` strictly (ties excluded), oldest first (left-aligned, padded at the end, with a mask).
Per step, side information:

- the instance's label, only if known at t (``ts_i + label_delay_s <= t``), else
  :data:`LABEL_UNKNOWN`; padding steps hold :data:`LABEL_PAD`;
- the gap ``t - ts_i`` (always >= 1 s), bucketed by ``gap_boundaries_s``: bucket b counts the
  boundaries <= gap, so buckets are ``0 .. len(boundaries)``; padding steps hold
  ``len(boundaries) + 1``.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import numpy as np
import torch

LABEL_NEGATIVE, LABEL_POSITIVE, LABEL_UNKNOWN, LABEL_PAD = 0, 1, 2, 3
LABEL_VOCAB_SIZE = 4
DEFAULT_GAP_BOUNDARIES_S: Tuple[int, ...] = (
    60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 3 * 86400,
    7 * 86400, 14 * 86400, 30 * 86400, 60 * 86400, 90 * 86400, 180 * 86400, 365 * 86400)


@dataclasses.dataclass(frozen=True)
class HistoryLayout:
    """How histories are cut and described: length, label delay, gap buckets."""

    max_len: int = 256
    label_delay_s: int = 0
    gap_boundaries_s: Tuple[int, ...] = DEFAULT_GAP_BOUNDARIES_S

    def __post_init__(self) -> None:
        object.__setattr__(self, "gap_boundaries_s", tuple(int(b) for b in self.gap_boundaries_s))
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.label_delay_s < 0:
            raise ValueError(f"label_delay_s must be >= 0, got {self.label_delay_s}")
        b = np.asarray(self.gap_boundaries_s, dtype=np.int64)
        if b.size and (b[0] <= 0 or (np.diff(b) <= 0).any()):
            raise ValueError(f"gap_boundaries_s must be positive and strictly increasing, got "
                             f"{list(self.gap_boundaries_s)}")

    @property
    def gap_pad(self) -> int:
        """The gap bucket of padding steps."""
        return len(self.gap_boundaries_s) + 1

    @property
    def gap_vocab_size(self) -> int:
        """Distinct gap-bucket values, padding included (an embedding table's size)."""
        return len(self.gap_boundaries_s) + 2


@dataclasses.dataclass
class HistoryBatch:
    """Materialised histories of B target samples, L = max_len steps, oldest first.

    ``row_ids`` [B, L] int64 store rows (-1 at padding, which FBGEMM's lookup returns as zeros),
    ``mask`` [B, L] bool (True = real step), ``label`` [B, L] int64 (LABEL_* values),
    ``gap_bucket`` [B, L] int64, ``length`` [B] int64.
    """

    row_ids: torch.Tensor
    mask: torch.Tensor
    label: torch.Tensor
    gap_bucket: torch.Tensor
    length: torch.Tensor

    def tensors(self) -> List[torch.Tensor]:
        """The fields in order (no copies, unlike ``dataclasses.astuple``)."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def to(self, device: torch.device, non_blocking: bool = False) -> "HistoryBatch":
        return HistoryBatch(*(t.to(device=device, non_blocking=non_blocking)
                              for t in self.tensors()))

    def pin_memory(self) -> "HistoryBatch":
        return HistoryBatch(*(t.pin_memory() for t in self.tensors()))

    def record_stream(self, stream: torch.Stream) -> None:
        for t in self.tensors():
            t.record_stream(stream)


def steps_after(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] int64: how many real steps follow each step (0 for the newest real step)."""
    m = mask.long()
    return m.flip(1).cumsum(1).flip(1) - m
