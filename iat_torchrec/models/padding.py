"""Padding of history batches ``[B, L, ...]`` with a mask ``[B, L]`` (True = real step), as the
history models read it: ids and values of padded steps neutralised, and the steps that are
padding in every sample of the batch cut off before any arithmetic (exact: the models never let
a padded step reach a real one).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def masked_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``ids`` with padded steps replaced by 0 (a valid row of any embedding table)."""
    return torch.where(mask, ids, 0)


def embed(table: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """``table(ids)`` [..., dim] as a row gather, whose backward (an index_add) is several times
    faster on CPU than the embedding's for the small tables of step ids (labels, gaps)."""
    return table.weight.index_select(0, ids.reshape(-1)).view(*ids.shape, table.embedding_dim)


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` [B, L, d] with padded steps set to 0 (whatever they held, NaN included)."""
    return torch.where(mask.unsqueeze(-1), x, x.new_zeros(()))


def real_span(mask: torch.Tensor, keep_end: bool = False) -> Tuple[slice, bool]:
    """The smallest span of steps that holds every real step of the batch (right-aligned
    histories: the leading all-padding steps cut off), and whether every step in it is real.

    Args:
        mask: [B, L] bool.
        keep_end: the span ends at L (for models that count steps from the end by index).

    Returns:
        (slice of the L axis, all steps real). Without any real step the span is the last step
        (if L > 0), so that every parameter still takes part in the graph (DDP expects it). One
        device-to-host copy of 2 L bools.
    """
    length = mask.shape[1]
    any_real, all_real = torch.stack([mask.any(0), mask.all(0)]).cpu().unbind(0)
    real = any_real.nonzero().flatten().tolist()
    if not real:
        return slice(max(length - 1, 0), length), length == 0
    span = slice(real[0], length if keep_end else real[-1] + 1)
    return span, bool(all_real[span].all())


def trim(mask: torch.Tensor, *steps: Optional[torch.Tensor], keep_end: bool = False
         ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]], bool]:
    """``mask`` [B, L] and ``steps`` [B, L, ...] (None passes) cut to :func:`real_span`:
    (mask [B, L'], steps [B, L', ...], whether all L' steps are real)."""
    span, all_real = real_span(mask, keep_end)
    if span == slice(0, mask.shape[1]):
        return mask, list(steps), all_real
    return mask[:, span], [None if x is None else x[:, span] for x in steps], all_real


__all__: Sequence[str] = ("masked_ids", "embed", "zero_padding", "real_span", "trim")
