"""The Source Instance Transformer of the IAT source model's user-order scheme (METHOD.md, "Stage
1a"), and the cache that streams each user's earlier tokens into it across batches. PyTorch only
(no torchrec), so it runs and is tested wherever PyTorch is installed.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


class SourceInstanceTransformer(nn.Module):
    """Causal Transformer over a user's token sequence (pre-LayerNorm). Each token attends to
    itself and the user's previous ``context`` tokens, with a linear recency bias on the
    attention scores (ALiBi-style, slope ``1 / context``) in place of absolute positions: an
    output depends only on the tokens it sees and how far back they are, so it does not change
    with where batch boundaries fall, given the streamed context.

    With ``num_labels`` > 0, :meth:`forward` also takes the labels and timestamps of the tokens:
    the first layer's keys and values then come in two copies per token, without and with the
    token's label embedding (a learned vector per label and value, summed over labels), and a
    query at time t sees the labelled copy of an earlier token exactly when its label had
    matured by t (``ts_j + label_delay <= t``, ``ts_j < t``), the plain copy otherwise (its
    own token always plain). Later layers read outputs that saw only labels matured by their
    own time, which are matured at any later query: no label reaches a query before it is
    known.

    Example::

        sit = SourceInstanceTransformer(64, layers=2, heads=4, context=63, num_labels=1)
        out = sit(z, labels=y, ts=ts, label_delay=0)   # [U, S, 64], [U, S, 1], [U, S]
    """

    def __init__(self, dim: int, layers: int, heads: int, context: int, num_labels: int = 0,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True, device=device)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.context = context
        self.num_layers = layers
        self.num_heads = heads
        # Row 2 k + y: label k with value y (N(0, 1) init: on the scale of the normed tokens).
        self.label_embedding = (nn.Embedding(2 * num_labels, dim, device=device)
                                if num_labels else None)

    def _bias(self, s: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[S, S] additive scores: recency bias inside the causal window, -inf outside."""
        i = torch.arange(s, device=device)
        gap = (i.unsqueeze(1) - i.unsqueeze(0)).to(dtype)
        allowed = (gap >= 0) & (gap <= self.context)
        return torch.where(allowed, -gap / max(self.context, 1), float("-inf"))

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                ts: Optional[torch.Tensor] = None, label_delay: int = 0) -> torch.Tensor:
        """tokens [U, S, d] (labels [U, S, num_labels] in {0, 1} and ts [U, S] int when the SIT
        reads labels) -> outputs [U, S, d]. Rows are left-aligned: any padding follows a row's
        real tokens, so causal attention never lets a real token see it (and a padding position
        always has itself to attend to: no empty softmax). Outputs at padding positions are
        meaningless."""
        bias = self._bias(tokens.shape[1], tokens.device, tokens.dtype)
        if self.label_embedding is None:
            return self.encoder(tokens, mask=bias)
        if labels is None or ts is None:
            raise ValueError("this SIT reads labels: give labels and ts")
        first, *rest = self.encoder.layers
        x = tokens
        y = first.norm1(x)
        ids = 2 * torch.arange(labels.shape[-1], device=x.device) + labels.long()
        labelled = y + self.label_embedding(ids).sum(-2)
        matured = (ts.unsqueeze(2) > ts.unsqueeze(1)) & (
            ts.unsqueeze(1) + label_delay <= ts.unsqueeze(2))  # [U, S_q, S_k]
        plain = torch.where(matured, float("-inf"), bias)
        with_label = torch.where(matured, bias, float("-inf"))
        mask = torch.cat([plain, with_label], 2).repeat_interleave(self.num_heads, 0)
        kv = torch.cat([y, labelled], 1)
        x = x + first.dropout1(first.self_attn(y, kv, kv, attn_mask=mask,
                                               need_weights=False)[0])
        x = x + first._ff_block(first.norm2(x))
        for layer in rest:
            x = layer(x, src_mask=bias)
        return x


class UserContextCache:
    """Each user's last ``size`` tokens (and, for a SIT that reads labels, their labels and
    timestamps), carried from batch to batch (stop-gradient context for the streaming
    user-order scheme). Lives on the rank that owns the user."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.tokens: Dict[int, torch.Tensor] = {}
        self.labels: Dict[int, torch.Tensor] = {}
        self.ts: Dict[int, torch.Tensor] = {}

    @staticmethod
    def _padded(cached: Dict[int, torch.Tensor], users: List[int], size: int,
                tail: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = torch.zeros(len(users), size, *tail, dtype=dtype, device=device)
        for i, u in enumerate(users):
            prev = cached.get(u)
            if prev is not None:
                out[i, :prev.shape[0]] = prev.to(device)
        return out

    def context(self, users: List[int], dim: int, device: torch.device
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Left-aligned context [U, size, d] and its length per user [U]."""
        lengths = torch.tensor([self.tokens[u].shape[0] if u in self.tokens else 0
                                for u in users], dtype=torch.long, device=device)
        return (self._padded(self.tokens, users, self.size, (dim,), torch.float32, device),
                lengths)

    def side(self, users: List[int], num_labels: int, device: torch.device
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The context's labels [U, size, num_labels] and timestamps [U, size], left-aligned
        like :meth:`context`."""
        return (self._padded(self.labels, users, self.size, (num_labels,), torch.float32,
                             device),
                self._padded(self.ts, users, self.size, (), torch.long, device))

    def update(self, users: List[int], segments: List[torch.Tensor],
               labels: Optional[List[torch.Tensor]] = None,
               ts: Optional[List[torch.Tensor]] = None) -> None:
        """Append each user's new tokens [n, d] (with their labels [n, L] and ts [n] when
        given) and keep the last ``size``."""
        if not self.size:
            return
        parts = [(self.tokens, segments)]
        if labels is not None and ts is not None:
            parts += [(self.labels, labels), (self.ts, ts)]
        for cached, segs in parts:
            for u, seg in zip(users, segs):
                prev = cached.get(u)
                seq = seg if prev is None else torch.cat([prev.to(seg.device), seg])
                cached[u] = seq[-self.size:].detach().cpu()

    def clear(self) -> None:
        """Forget every user's context (tokens, labels and timestamps together)."""
        for cached in (self.tokens, self.labels, self.ts):
            cached.clear()

    def snapshot(self) -> Dict[str, object]:
        """A copy of the state that later updates leave unchanged (for :meth:`load_state_dict`)."""
        return {"size": self.size, "tokens": dict(self.tokens), "labels": dict(self.labels),
                "ts": dict(self.ts)}

    def state_dict(self) -> Dict[str, object]:
        return {"size": self.size, "tokens": self.tokens, "labels": self.labels, "ts": self.ts}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.size = int(state["size"])
        self.tokens = dict(state["tokens"])
        self.labels = dict(state.get("labels", {}))
        self.ts = dict(state.get("ts", {}))


__all__: Sequence[str] = ("SourceInstanceTransformer", "UserContextCache")
