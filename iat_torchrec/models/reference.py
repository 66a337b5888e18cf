"""The history models' forward passes as they were before they were laid out for speed
(issue 12), kept as slow references: the parity tests compare the modules with them (outputs and
gradients), and ``apps/bench_mixer.py --reference`` times them beside the modules.

Each function takes a module of :mod:`iat_torchrec.models.mixer` or
:mod:`iat_torchrec.models.history` and computes its forward from the module's own parameters the
earlier way: every history step computed (no padding cut off), masks always applied, the sample
attention's columns and the heads copied into place, all of Q, K, V projected, DIN's
activation unit over the concatenated ``[q, k, q - k, q * k]``, step ids embedded by
``nn.Embedding``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from iat_torchrec.history.batch import steps_after
from iat_torchrec.models.padding import masked_ids, zero_padding


def attention(attn: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
              num_queries: Optional[int] = None) -> torch.Tensor:
    """``MultiHeadAttention``: x [N, S, dim], mask broadcastable to [N, h, S_q, S] ->
    [N, S_q, dim]."""
    n, s, dim = x.shape
    h = attn.num_heads
    q, k, v = (y.transpose(1, 2)  # [N, h, S, dh]
               for y in attn.in_proj(x).view(n, s, 3, h, dim // h).unbind(2))
    if num_queries is not None:
        q = q[:, :, :num_queries]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=attn.dropout if attn.training else 0.0)
    return attn.out_proj(out.transpose(1, 2).reshape(n, q.shape[2], dim))


def mixer_block(block: nn.Module, x: torch.Tensor, row_mask: Optional[torch.Tensor] = None,
                target_only: bool = False) -> torch.Tensor:
    """``SIFMixerBlock``: x [B, R, T, d], row_mask [B, R] -> [B, R or 1, T, d]."""
    b, r, t, d = x.shape
    y = block.token_norm(x).reshape(b * r, t, d)
    x = x + block.dropout(attention(block.token_attention, y)).view(b, r, t, d)
    y = block.sample_norm(x).transpose(1, 2).reshape(b * t, r, d)
    mask = None
    if row_mask is not None:
        mask = row_mask.unsqueeze(1).expand(b, t, r).reshape(b * t, 1, 1, r)
    a = attention(block.sample_attention, y, mask, num_queries=1 if target_only else None)
    a = a.view(b, t, -1, d).transpose(1, 2)
    x = (x[:, :1] if target_only else x) + block.dropout(a)
    return x + block.dropout(block.ffn(block.ffn_norm(x)))


def mixer_history_rows(mixer: nn.Module, history: torch.Tensor, history_mask: torch.Tensor,
                       recency: Optional[torch.Tensor] = None,
                       side: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``SIFMixer.history_rows``: [B, L, T, d0] plus encodings, masked steps zeroed."""
    b, length, t, d0 = history.shape
    if recency is None:
        recency = torch.arange(length - 1, -1, -1, device=history.device).clamp_(
            max=mixer.config.recency_buckets - 1).expand(b, length)
    recency = torch.where(history_mask, recency, 0)
    rows = history + mixer.recency_embedding(recency).view(b, length, t, d0)
    if side is not None:
        side = torch.where(history_mask, side, 0)
        rows = rows + mixer.side_embedding(side).view(b, length, t, d0)
    return torch.where(history_mask.view(b, length, 1, 1), rows, rows.new_zeros(()))


def sif_mixer(mixer: nn.Module, target_features: torch.Tensor,
              history: Optional[torch.Tensor] = None,
              history_mask: Optional[torch.Tensor] = None,
              recency: Optional[torch.Tensor] = None,
              side: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``SIFMixer.forward``: target [B, T, target_dim], history [B, L, T, d0] -> [B, out]."""
    b = target_features.shape[0]
    x = (mixer.align(target_features) + mixer.target_embedding).unsqueeze(1)
    row_mask = None
    if history is not None and history.shape[1] > 0:
        length = history.shape[1]
        if history_mask is None:
            history_mask = torch.ones(b, length, dtype=torch.bool, device=history.device)
        rows = mixer_history_rows(mixer, history, history_mask.bool(), recency, side)
        x = torch.cat([x, rows.to(x.dtype)], dim=1)
        row_mask = torch.cat([history_mask.new_ones(b, 1, dtype=torch.bool),
                              history_mask.bool()], dim=1)
    last = len(mixer.blocks) - 1
    for i, block in enumerate(mixer.blocks):
        x = mixer_block(block, x, row_mask, target_only=i == last)
    target = mixer.norm(x[:, 0])
    return target.mean(1) if mixer.config.pooling == "mean" else target.flatten(1)


def transformer_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor,
                      first_only: bool = False) -> torch.Tensor:
    """``TransformerBlock``: x [B, S, dim], mask [B, S] -> [B, S or 1, dim]."""
    b, s, _ = x.shape
    a = attention(block.attention, block.attention_norm(x), mask.view(b, 1, 1, s),
                  num_queries=1 if first_only else None)
    x = (x[:, :1] if first_only else x) + block.dropout(a)
    return x + block.dropout(block.ffn(block.ffn_norm(x)))


def _encode(blocks: Sequence[nn.Module], x: torch.Tensor, mask: torch.Tensor,
            first_only: bool) -> torch.Tensor:
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        x = transformer_block(block, x, mask, first_only=first_only and i == last)
    return x


def din(module: nn.Module, query: torch.Tensor, items: torch.Tensor, label: torch.Tensor,
        gap_bucket: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``DINAttention.forward``: query [B, D], items [B, L, D] -> [B, D]."""
    mask = mask.bool()
    k = zero_padding(items, mask) + module.label_embedding(masked_ids(label, mask))
    if module.gap_embedding is not None:
        k = k + module.gap_embedding(masked_ids(gap_bucket, mask))
    k = zero_padding(k, mask)
    q = query.unsqueeze(1).expand_as(k)
    unit_in = torch.cat([q, k, q - k, q * k], dim=-1)
    scores = module.activation_unit(unit_in.reshape(-1, unit_in.shape[-1])).view(mask.shape)
    if module.config.softmax:
        scores = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), -1)
    weights = torch.where(mask, scores, scores.new_zeros(()))
    return (weights.unsqueeze(-1) * k).sum(1)


def bst_history_tokens(module: nn.Module, items: torch.Tensor, label: torch.Tensor,
                       gap_bucket: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``BSTEncoder.history_tokens``: [B, L, D], padded steps zero."""
    h = zero_padding(items, mask) + module.label_embedding(masked_ids(label, mask))
    if module.gap_embedding is not None:
        h = h + module.gap_embedding(masked_ids(gap_bucket, mask))
    if module.position_embedding is not None:
        pos = steps_after(mask).clamp(max=module.config.position_buckets - 1)
        h = h + module.position_embedding(masked_ids(pos, mask))
    return zero_padding(h, mask)


def bst(module: nn.Module, target: torch.Tensor, items: torch.Tensor, label: torch.Tensor,
        gap_bucket: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``BSTEncoder.forward``: target [B, D], items [B, L, D] -> [B, D]."""
    mask = mask.bool()
    x = torch.cat([(target + module.target_embedding).unsqueeze(1),
                   bst_history_tokens(module, items, label, gap_bucket, mask).to(target.dtype)],
                  1)
    full = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
    target_only = module.config.output == "target"
    x = module.norm(_encode(module.blocks, x, full, target_only))
    if target_only:
        return x[:, 0]
    x = zero_padding(x, full)
    return x.sum(1) / full.sum(1, keepdim=True).to(x.dtype)


def iat_steps(branch: nn.Module, tokens: torch.Tensor, label: torch.Tensor,
              gap_bucket: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``IATBranch.steps``: per-step inputs [B, L, adapt_dim + side_dim]."""
    e = zero_padding(tokens.detach().to(branch.adapt.weight.dtype), mask)
    side = (branch.label_embedding(masked_ids(label, mask))
            + branch.gap_embedding(masked_ids(gap_bucket, mask)))
    x = torch.cat([torch.sigmoid(branch.adapt(e)), side], dim=-1)
    if branch.position_embedding is not None:
        pos = steps_after(mask).clamp(max=branch.config.position_buckets - 1)
        x = x + branch.position_embedding(masked_ids(pos, mask))
    return zero_padding(x, mask)


def iat_branch(branch: nn.Module, tokens: torch.Tensor, label: torch.Tensor,
               gap_bucket: torch.Tensor, mask: torch.Tensor, query: torch.Tensor
               ) -> torch.Tensor:
    """``IATBranch.forward``: tokens [B, L, d], query [B, query_dim] -> [B, output_dim]."""
    mask = mask.bool()
    x = torch.cat([branch.query(query).unsqueeze(1),
                   iat_steps(branch, tokens, label, gap_bucket, mask)], dim=1)
    full = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
    x = _encode(branch.blocks, x, full, first_only=True)
    return branch.output(branch.norm(x[:, 0]))


__all__: Sequence[str] = (
    "attention", "mixer_block", "mixer_history_rows", "sif_mixer", "transformer_block", "din",
    "bst_history_tokens", "bst", "iat_steps",
    "iat_branch",
)
