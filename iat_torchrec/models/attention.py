"""Multi-head attention laid out for tiny heads: one fused projection, heads and batch folded
into the attention's batch without copies, queries projected only where they are read.

The history models (the SIF-Mixer's token and sample attention, the BST and IAT Transformers)
run heads of 8 to 32 values over thousands of short sequences; what costs there is not the
arithmetic but copies and small products. Here the input projection is one matrix product over
all positions (``in_proj``, Q, K and V fused, or K and V only when just the first
``num_queries`` positions attend), and Q, K, V reach ``scaled_dot_product_attention`` as strided
views of its output ``[..., 3, heads, head_dim]``, whichever axis holds the sequence: the
SIF-Mixer's sample attention reads its columns from a rows-first tensor ``[S, N, dim]``
(``seq_first``) with no transpose copy in or out.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``, with the option of
    querying from the first positions only.

    Args:
        dim: model width.
        num_heads: heads (``dim`` must divide evenly).
        dropout: attention dropout (training only).
        device: where the parameters live.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj = nn.Linear(dim, 3 * dim, device=device)
        self.out_proj = nn.Linear(dim, dim, device=device)

    def _heads(self, y: torch.Tensor, parts: int, seq_first: bool) -> Sequence[torch.Tensor]:
        """A projection [N, S, parts * dim] (or [S, N, ...]) -> ``parts`` views [N, h, S, dh]."""
        h = self.num_heads
        y = y.unflatten(-1, (parts, h, y.shape[-1] // (parts * h)))
        return y.permute(2, 1, 3, 0, 4).unbind(0) if seq_first else \
            y.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                num_queries: Optional[int] = None, seq_first: bool = False) -> torch.Tensor:
        """x [N, S, dim] (``seq_first``: [S, N, dim], any strides), mask broadcastable to
        [N, heads, S_q, S] (bool, True = attend; None = all) -> [N, S_q, dim] (``seq_first``:
        a view [S_q, N, dim]): the first ``num_queries`` positions attend (default: all)."""
        dim = x.shape[-1]
        w, b = self.in_proj.weight, self.in_proj.bias
        if num_queries is None:
            q, k, v = self._heads(F.linear(x, w, b), 3, seq_first)
        else:
            (q,) = self._heads(F.linear(x.narrow(0 if seq_first else 1, 0, num_queries),
                                        w[:dim], b[:dim]), 1, seq_first)
            k, v = self._heads(F.linear(x, w[dim:], b[dim:]), 2, seq_first)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        # [N, h, S_q, dh] -> [N, S_q, dim]: free where SDPA returns it heads-inner (CPU, CUDA).
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return out.transpose(0, 1) if seq_first else out


__all__: Sequence[str] = ("MultiHeadAttention",)
