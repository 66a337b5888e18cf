"""Multi-head attention of the history models (the SIF-Mixer's token and sample attention, the
BST and IAT Transformers): one input projection over all positions (Q, K and V fused, or K and V
only when just the first ``num_queries`` positions attend, Q then projected for those alone),
Q, K, V handed to ``scaled_dot_product_attention`` as strided views of it, heads folded into
the attention's batch without copies.
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

    def _heads(self, y: torch.Tensor, parts: int) -> Sequence[torch.Tensor]:
        """A projection [N, S, parts * dim] -> ``parts`` views [N, h, S, dh]."""
        h = self.num_heads
        y = y.unflatten(-1, (parts, h, y.shape[-1] // (parts * h)))
        return y.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                num_queries: Optional[int] = None) -> torch.Tensor:
        """x [N, S, dim], mask broadcastable to [N, heads, S_q, S] (bool, True = attend; None =
        all) -> [N, S_q, dim]: the first ``num_queries`` positions attend (default: all)."""
        dim = x.shape[-1]
        w, b = self.in_proj.weight, self.in_proj.bias
        if num_queries is None:
            q, k, v = self._heads(F.linear(x, w, b), 3)
        else:
            (q,) = self._heads(F.linear(x[:, :num_queries], w[:dim], b[:dim]), 1)
            k, v = self._heads(F.linear(x, w[dim:], b[dim:]), 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        # [N, h, S_q, dh] -> [N, S_q, dim]: free where SDPA returns it heads-inner (CPU, CUDA).
        return self.out_proj(out.transpose(1, 2).flatten(2))


__all__: Sequence[str] = ("MultiHeadAttention",)
