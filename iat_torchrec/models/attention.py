"""Multi-head attention of the history models (the SIF-Mixer's token and sample attention, the
BST and IAT Transformers): one input projection weight (``in_proj``, Q, K and V stacked), applied
as three products so that Q, K and V each come out as their own tensor [N, S, dim] (Q for the
first ``num_queries`` positions only when just those attend), handed to
``scaled_dot_product_attention`` as head views [N, h, S, dh] of it without copies.

Three products rather than one fused [N, S, 3 dim] product: with heads of 8 or 16 values, the
attention's backward writes the gradients of strided views of one fused tensor element-wise
(fills and copies of 8-wide rows) and a stack before the projection's backward. Measured on one
CPU core, forward + backward of one attention: 9-19% faster at the SIF-Mixer's shapes of the
main job (batch 24, L = 128, T = 4 or 27, width 16), up to 35% at batch 512, the same at the IAT
branch's width 128.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class QueryGroups:
    """Which shared sequence each query row reads: ``groups`` [N] (nondecreasing) maps query
    row n to memory row ``groups[n]`` of ``count`` rows; ``slot`` [N] is n's place among its
    group's rows and ``width`` the largest group. A request's C candidates (query rows) share
    its one history (memory row), so the history is encoded once per request.

    The rows are laid out on a grid [count, width, ...] (zero-filled where a group is smaller)
    so that every query of a group attends to its group's memory in one batched product,
    without copying the memory per query.

    Example::

        g = QueryGroups.of(torch.tensor([0, 0, 0, 1]), count=2)    # 3 + 1 candidates
        g.to_grid(torch.arange(4.0))      # [[0, 1, 2], [3, 0, 0]]
    """

    groups: torch.Tensor
    slot: torch.Tensor
    width: int
    count: int

    @classmethod
    def of(cls, groups: torch.Tensor, count: int) -> "QueryGroups":
        """From ``groups`` [N] nondecreasing in [0, count)."""
        sizes = torch.bincount(groups, minlength=count)
        first = torch.cumsum(sizes, 0) - sizes
        slot = torch.arange(groups.numel(), device=groups.device) - first[groups]
        return cls(groups, slot, int(sizes.max()) if groups.numel() else 0, count)

    def repeat(self, times: int) -> "QueryGroups":
        """The groups of rows n * times + j (j < times) reading memory rows
        groups[n] * times + j: e.g. each of a sample's T columns its history's column."""
        j = torch.arange(times, device=self.groups.device)
        return QueryGroups((self.groups[:, None] * times + j).flatten(),
                           self.slot.repeat_interleave(times), self.width, self.count * times)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, ...] -> [count, width, ...], zeros where a group has fewer rows."""
        grid = x.new_zeros(self.count, self.width, *x.shape[1:])
        grid[self.groups, self.slot] = x
        return grid

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """[count, width, ...] -> x [N, ...] (inverse of :meth:`to_grid`)."""
        return grid[self.groups, self.slot]

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Memory rows x [count, ...] -> the row of each query [N, ...] (a copy)."""
        return x.index_select(0, self.groups)


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

    def _project(self, x: torch.Tensor, part: int) -> torch.Tensor:
        """Part ``part`` (0 = Q, 1 = K, 2 = V) of the input projection: x [N, S, dim] ->
        heads [N, h, S, dh], a view of a contiguous [N, S, dim]."""
        dim = x.shape[-1]
        rows = slice(part * dim, (part + 1) * dim)
        y = F.linear(x, self.in_proj.weight[rows], self.in_proj.bias[rows])
        return y.unflatten(-1, (self.num_heads, dim // self.num_heads)).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                num_queries: Optional[int] = None) -> torch.Tensor:
        """x [N, S, dim], mask broadcastable to [N, heads, S_q, S] (bool, True = attend; None =
        all) -> [N, S_q, dim]: the first ``num_queries`` positions attend (default: all)."""
        q = self._project(x if num_queries is None else x[:, :num_queries], 0)
        k, v = self._project(x, 1), self._project(x, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        # [N, h, S_q, dh] -> [N, S_q, dim]: free where SDPA returns it heads-inner (CPU, CUDA).
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def attend(self, x: torch.Tensor, memory: torch.Tensor,
               memory_mask: Optional[torch.Tensor] = None,
               groups: Optional[QueryGroups] = None) -> torch.Tensor:
        """Queries that see their own positions and a memory the memory does not share with
        them: x [N, Q, dim] attends to x's Q positions and to ``memory`` [M, S, dim] (row n
        reads memory row n, or ``groups.groups[n]``), ``memory_mask`` [M, S] bool (True =
        attend; None = all) -> [N, Q, dim]. The memory's keys and values are projected once
        per memory row, however many query rows read it."""
        q, k_own, v_own = (self._project(x, i) for i in range(3))  # [N, h, Q, dh]
        k_mem, v_mem = self._project(memory, 1), self._project(memory, 2)  # [M, h, S, dh]
        n, h, nq, _ = q.shape
        if groups is not None:  # queries of a group side by side: [M, h, width * Q, dh]
            q, k_own, v_own = (groups.to_grid(t).transpose(1, 2).flatten(2, 3)
                               for t in (q, k_own, v_own))
        mask = None
        if memory_mask is not None or groups is not None:
            row = torch.arange(q.shape[2], device=x.device) // nq
            own = row[:, None] == row[None, :]  # a query sees its own row's positions only
            m, s = memory.shape[:2]
            mem = (torch.ones(m, s, dtype=torch.bool, device=x.device) if memory_mask is None
                   else memory_mask)
            mask = torch.cat([own.expand(m, 1, *own.shape),
                              mem.view(m, 1, 1, s).expand(m, 1, own.shape[0], s)], dim=-1)
        out = F.scaled_dot_product_attention(
            q, torch.cat([k_own, k_mem], 2), torch.cat([v_own, v_mem], 2), attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0)
        if groups is not None:  # [M, h, width * Q, dh] -> [N, h, Q, dh]
            out = groups.from_grid(out.unflatten(2, (groups.width, nq)).transpose(1, 2))
        return self.out_proj(out.transpose(1, 2).flatten(2))


def visible_keys(mask: torch.Tensor) -> torch.Tensor:
    """A key mask [M, S] for self-attention over sequences that may hold no real position:
    such a sequence sees all its (zeroed) positions, so no softmax is empty; the others are
    unchanged. What those positions compute is never read."""
    return mask | ~mask.any(1, keepdim=True)


__all__: Sequence[str] = ("QueryGroups", "MultiHeadAttention", "visible_keys")
