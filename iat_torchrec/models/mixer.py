"""The SIF-Mixer: row/column attention over the target sample and its history of samples.

The input is a tensor H [B, L+1, T, d0] per batch (METHOD.md, "Stage 3"): row 0 is the target
sample, its T sub-token features mapped into codebook space by the alignment projection W_res;
rows 1..L are history samples (HGAQ codebook sums, or IAT tokens mapped to T x d0 by
:class:`IATHistoryProjection`) plus a recency encoding (and optional side information such as
the matured label). N pre-LayerNorm residual blocks each run

- token-level multi-head attention within each row (over the T sub-tokens),
- sample-level multi-head attention within each column (over the L+1 rows, padded steps masked),
- a position-wise FFN (width ``ffn_mult * d0``),

and the output is the mean of the (final-LayerNorm'd) target row. Cost O(L^2 T d0 + L T^2 d0)
instead of O((L T)^2 d0) for flat attention over all tokens.

Two forms:

- :class:`SIFMixer` (form b): ``forward(target_features [B, T, d_in], history [B, L, T, d0],
  history_mask [B, L]) -> [B, output_dim]``, with :meth:`SIFMixer.alignment_loss`.
- :class:`SIFMixerInteractionArch` (form a): a drop-in ``InteractionArch`` of
  ``torchrec.models.dlrm.DLRM``: ``forward(dense_features [B, D], sparse_features) ->
  [B, output_dim]``; the target row holds DLRM's dense embedding and one token per sparse feature.

Decisions where METHOD.md is silent:

- The alignment projection is one linear map per sub-token slot (slots hold different fields).
- The recency and side-information encodings are learned per (bucket, sub-token column), added to
  every history row; without recency ids, a step's bucket is its distance from the end of the
  (right-aligned) history, clipped to the last bucket. The target row gets a learned
  per-column embedding instead.
- Masked history steps are zeroed before the blocks, so whatever they hold (NaN included) cannot
  reach the output; row 0 is never masked, so no softmax is ever empty.
- The last block computes sample attention and FFN for the target row only (the output reads
  nothing else), which saves most of that block's work and changes no result.
- The history steps that are padding in every sample of the batch are cut off first
  (:func:`~iat_torchrec.models.padding.trim`; without padding left, attention runs unmasked),
  step ids are embedded by a row gather, and the last block projects queries for the target row
  only; none changes a result (``iat_torchrec.models.reference`` keeps the earlier forward for
  the tests).
- Default heads: 2 (head size 8 at d0 = 16); GELU in the FFN; ``pooling="flatten"`` keeps the
  whole target row [B, T * d0] for an OverArch that wants more than the mean.

The paper's two ablations of the structure (``SIFMixerConfig.structure``, same inputs, rows,
masks, number of blocks and FFNs; the default ``mixer`` is the above):

- ``flat``: each block is one pre-LayerNorm multi-head self-attention over all (L+1) T tokens of
  a sample, [B, (L+1) T, d0], padded steps' T tokens masked as keys, then the FFN
  (:class:`~iat_torchrec.models.history.TransformerBlock`); the last block computes the target
  row's T tokens only; output as above from the target row [B, T, d0]. Cost O((L T)^2 d0).
- ``pooled``: each row's T sub-tokens (the target's included) are mean-pooled into one token
  first, [B, L+1, d0]; each block is sample-level self-attention over the rows (padded steps
  masked) then the FFN; the output is the target row's token [B, d0] (``pooling`` must be
  ``mean``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from iat_torchrec.models.attention import MultiHeadAttention, QueryGroups, visible_keys
from iat_torchrec.models.history import TransformerBlock
from iat_torchrec.models.padding import embed, trim

if TYPE_CHECKING:  # the annotation only: this module needs torch alone at run time
    from torchrec.sparse.jagged_tensor import KeyedTensor

POOLINGS = ("mean", "flatten")
STRUCTURES = ("mixer", "flat", "pooled")
# [B, F, D], or a torchrec KeyedTensor of pooled embeddings.
SparseFeatures = Union[torch.Tensor, "KeyedTensor"]


@dataclasses.dataclass
class SIFMixerConfig:
    """Sizes of the SIF-Mixer (paper defaults where the paper gives them)."""

    d0: int = dataclasses.field(default=16, metadata={"help": "token size (codeword size)"})
    num_blocks: int = dataclasses.field(default=4, metadata={"help": "N: mixer blocks"})
    num_heads: int = dataclasses.field(default=2, metadata={"help": "attention heads"})
    ffn_mult: int = dataclasses.field(default=4, metadata={"help": "FFN width / d0"})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout"})
    recency_buckets: int = dataclasses.field(
        default=64, metadata={"help": "recency (time-gap bucket) ids per history step"})
    side_values: int = dataclasses.field(
        default=4, metadata={"help": "side-information ids per history step (0: none)"})
    side_init_std: float = dataclasses.field(default=0.02, metadata={
        "help": "std of the initial recency and side-information encodings"})
    pooling: str = dataclasses.field(
        default="mean", metadata={"help": "mean | flatten: how the target row is output"})
    alignment_weight: float = dataclasses.field(
        default=0.25, metadata={"help": "weight of L_align in the downstream loss"})
    structure: str = dataclasses.field(default="mixer", metadata={
        "help": "mixer: row / column attention | flat: one attention over all (L+1) T tokens | "
                "pooled: each row's T sub-tokens mean-pooled first, attention over rows (the "
                "paper's ablations)"})
    history_sees_target: bool = dataclasses.field(default=True, metadata={
        "help": "structure mixer: the history rows' column attention sees the target row too "
                "(so each candidate re-mixes the history) | false: history rows attend among "
                "themselves and the target row reads them, so a request's candidates share "
                "one mixed history"})

    def __post_init__(self) -> None:
        for name in ("d0", "num_blocks", "num_heads", "ffn_mult", "recency_buckets"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SIFMixerConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.d0 % self.num_heads:
            raise ValueError(f"SIFMixerConfig: d0 ({self.d0}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if not self.side_init_std > 0:
            raise ValueError(f"SIFMixerConfig.side_init_std must be > 0, got {self.side_init_std}")
        if self.side_values < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("SIFMixerConfig: side_values must be >= 0, dropout in [0, 1)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"SIFMixerConfig.pooling must be one of {POOLINGS}, "
                             f"got {self.pooling!r}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"SIFMixerConfig.structure must be one of {STRUCTURES}, "
                             f"got {self.structure!r}")
        if self.structure != "mixer" and not self.history_sees_target:
            raise ValueError("SIFMixerConfig: history_sees_target=False needs structure 'mixer'")
        if self.structure == "pooled" and self.pooling != "mean":
            raise ValueError("SIFMixerConfig: structure 'pooled' has one target token: "
                             "pooling must be 'mean'")


class SIFMixerBlock(nn.Module):
    """One pre-LayerNorm block: token attention within rows, sample attention within columns,
    FFN; each a residual branch.

    Args:
        dim: d0.
        num_heads, ffn_mult, dropout: as in :class:`SIFMixerConfig`.
        device: where the parameters live.
    """

    def __init__(self, dim: int, num_heads: int, ffn_mult: int, dropout: float = 0.0,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(dim, device=device)
        self.token_attention = MultiHeadAttention(dim, num_heads, dropout, device=device)
        self.sample_norm = nn.LayerNorm(dim, device=device)
        self.sample_attention = MultiHeadAttention(dim, num_heads, dropout, device=device)
        self.ffn_norm = nn.LayerNorm(dim, device=device)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim, device=device), nn.GELU(),
            nn.Linear(ffn_mult * dim, dim, device=device))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, row_mask: Optional[torch.Tensor] = None,
                target_only: bool = False) -> torch.Tensor:
        """x [B, R, T, d], row_mask [B, R] bool (True = real row; None = all real) ->
        [B, R, T, d], or [B, 1, T, d] (row 0 only) with ``target_only``. The columns are
        copied into contiguous sequences [B * T, R, d] for the sample attention (strided
        columns measured slower at large batches)."""
        b, r, t, d = x.shape
        y = self.token_norm(x).view(b * r, t, d)
        x = x + self.dropout(self.token_attention(y)).view(b, r, t, d)
        y = self.sample_norm(x).transpose(1, 2).reshape(b * t, r, d)
        mask = None
        if row_mask is not None:
            mask = row_mask.view(b, 1, 1, 1, r).expand(b, t, 1, 1, r).reshape(b * t, 1, 1, r)
        a = self.sample_attention(y, mask, num_queries=1 if target_only else None)
        x = (x[:, :1] if target_only else x) + self.dropout(a.view(b, t, -1, d).transpose(1, 2))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))

    def read_rows(self, target: torch.Tensor, rows: torch.Tensor,
                  row_mask: Optional[torch.Tensor], groups: Optional[QueryGroups] = None,
                  last: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The block with the history rows blind to the target row: target [B, 1, T, d],
        rows [R, L, T, d], row_mask [R, L] bool or None (all real); target b reads rows b or
        ``groups.groups[b]``. The target's column attention sees itself and the rows as they
        enter the sample attention; the rows' sees the rows only. -> (target [B, 1, T, d],
        rows [R, L, T, d], or None when ``last``: nothing reads them after)."""
        b, _, t, d = target.shape
        r, length = rows.shape[:2]
        target = target + self.dropout(
            self.token_attention(self.token_norm(target).view(b, t, d))).view(b, 1, t, d)
        rows = rows + self.dropout(self.token_attention(
            self.token_norm(rows).view(r * length, t, d))).view(r, length, t, d)
        columns = self.sample_norm(rows).transpose(1, 2).reshape(r * t, length, d)
        column_mask = None if row_mask is None else row_mask.repeat_interleave(t, 0)
        a = self.sample_attention.attend(self.sample_norm(target).view(b * t, 1, d), columns,
                                         column_mask, None if groups is None else groups.repeat(t))
        target = target + self.dropout(a.view(b, 1, t, d))
        target = target + self.dropout(self.ffn(self.ffn_norm(target)))
        if last:
            return target, None
        self_mask = (None if column_mask is None else
                     visible_keys(column_mask).view(r * t, 1, 1, length))
        a = self.sample_attention(columns, self_mask)
        rows = rows + self.dropout(a.view(r, t, length, d).transpose(1, 2))
        return target, rows + self.dropout(self.ffn(self.ffn_norm(rows)))


class SIFMixer(nn.Module):
    """The SIF-Mixer over H = [aligned target row; history rows] (form b).

    Args:
        num_tokens: T, sub-tokens per sample.
        config: sizes.
        target_dim: width of the target's per-slot features before the alignment projection
            (default d0).
        device: where the parameters live.

    Example::

        mixer = SIFMixer(num_tokens=27, config=SIFMixerConfig(), target_dim=64)
        out = mixer(target_features,            # [B, 27, 64]
                    history,                    # [B, L, 27, 16]: codebook sums of codes
                    history_mask,               # [B, L] bool, True = real step
                    recency=gap_buckets)        # [B, L] long, optional
        l_align = mixer.alignment_loss(target_features, tokenizer_output.reconstruction)
    """

    def __init__(self, num_tokens: int, config: SIFMixerConfig, target_dim: Optional[int] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.config = config
        self.num_tokens = num_tokens
        d0 = config.d0
        self.target_dim = target_dim or d0
        self.align_weight = nn.Parameter(torch.empty(num_tokens, self.target_dim, d0,
                                                     device=device))
        self.align_bias = nn.Parameter(torch.empty(num_tokens, d0, device=device))
        self.target_embedding = nn.Parameter(torch.empty(num_tokens, d0, device=device))
        self.recency_embedding = nn.Embedding(config.recency_buckets, num_tokens * d0,
                                              device=device)
        self.side_embedding = (nn.Embedding(config.side_values, num_tokens * d0, device=device)
                               if config.side_values else None)
        block = SIFMixerBlock if config.structure == "mixer" else TransformerBlock
        self.blocks = nn.ModuleList(
            block(d0, config.num_heads, config.ffn_mult, config.dropout, device=device)
            for _ in range(config.num_blocks))
        self.norm = nn.LayerNorm(d0, device=device)
        self.output_dim: int = d0 if config.pooling == "mean" else num_tokens * d0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Alignment like ``nn.Linear``; encodings N(0, side_init_std^2); target embedding
        zero."""
        if self.align_weight.device.type == "meta":
            return
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.target_dim)
            nn.init.uniform_(self.align_weight, -bound, bound)
            nn.init.uniform_(self.align_bias, -bound, bound)
            nn.init.zeros_(self.target_embedding)
            std = self.config.side_init_std
            nn.init.normal_(self.recency_embedding.weight, std=std)
            if self.side_embedding is not None:
                nn.init.normal_(self.side_embedding.weight, std=std)

    def align(self, target_features: torch.Tensor) -> torch.Tensor:
        """W_res: per-slot features [B, T, target_dim] -> codebook space [B, T, d0]."""
        return torch.einsum("btk,tkd->btd", target_features, self.align_weight) + self.align_bias

    def alignment_loss(self, target_features: torch.Tensor,
                       reconstruction: torch.Tensor) -> torch.Tensor:
        """L_align = mean ||W_res f - stopgrad(e)||^2, e the tokenizer's reconstruction [B, T, d0]
        of the same sample."""
        return F.mse_loss(self.align(target_features), reconstruction.detach())

    def history_rows(self, history: torch.Tensor, history_mask: torch.Tensor,
                     recency: Optional[torch.Tensor] = None,
                     side: Optional[torch.Tensor] = None) -> torch.Tensor:
        """History [B, L, T, d0] plus recency / side encodings, masked steps zeroed."""
        b, length, t, d0 = history.shape
        if recency is None:
            recency = torch.arange(length - 1, -1, -1, device=history.device).clamp_(
                max=self.config.recency_buckets - 1).expand(b, length)
        recency = torch.where(history_mask, recency, 0)
        rows = history + embed(self.recency_embedding, recency).view(b, length, t, d0)
        if side is not None:
            if self.side_embedding is None:
                raise ValueError("side information given but config.side_values is 0")
            side = torch.where(history_mask, side, 0)
            rows = rows + embed(self.side_embedding, side).view(b, length, t, d0)
        return torch.where(history_mask.view(b, length, 1, 1), rows, rows.new_zeros(()))

    def forward(self, target_features: torch.Tensor, history: Optional[torch.Tensor] = None,
                history_mask: Optional[torch.Tensor] = None,
                recency: Optional[torch.Tensor] = None,
                side: Optional[torch.Tensor] = None,
                groups: Optional[QueryGroups] = None) -> torch.Tensor:
        """
        Args:
            target_features: [B, T, target_dim], the target's per-slot features.
            history: [R, L, T, d0] history rows (L may be 0), or None for no history.
            history_mask: [R, L] bool, True = real step (default: all real).
            recency: [R, L] int ids in [0, recency_buckets), e.g. bucketed time gaps.
            side: [R, L] int ids in [0, side_values), e.g. the matured label.
            groups: target b reads history ``groups.groups[b]`` (None: history b, R = B);
                with ``history_sees_target=False`` each history is mixed once for all the
                targets that read it.

        Returns:
            [B, output_dim]: the mean (or the flattening) of the target row.
        """
        x = (self.align(target_features) + self.target_embedding).unsqueeze(1)  # [B, 1, T, d0]
        mask = None
        if history is not None and history.shape[1] > 0:
            r, length = history.shape[:2]
            if history.shape[2:] != (self.num_tokens, self.config.d0) or r != (
                    x.shape[0] if groups is None else groups.count):
                raise ValueError(f"history must be [R, L, {self.num_tokens}, {self.config.d0}] "
                                 f"with R = the histories the targets read, "
                                 f"got {tuple(history.shape)}")
            if history_mask is None:
                history_mask = torch.ones(r, length, dtype=torch.bool, device=history.device)
            # Steps that are padding in every sample are cut off (the default recency counts
            # steps from the end, so then the span keeps the end).
            history_mask, (history, recency, side), all_real = trim(
                history_mask.bool(), history, recency, side, keep_end=recency is None)
            rows = self.history_rows(history, history_mask, recency, side).to(x.dtype)
            if not self.config.history_sees_target:
                return self._read_rows(x, rows, None if all_real else history_mask, groups)
            if groups is not None:  # every target its own copy of its history
                rows, history_mask = groups.expand(rows), groups.expand(history_mask)
            x = torch.cat([x, rows], dim=1)  # [B, 1 + L, T, d0]
            if not all_real:
                mask = torch.cat([history_mask.new_ones(x.shape[0], 1), history_mask], 1)
        if self.config.structure != "mixer":
            return self._sequence_forward(x, mask)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, mask, target_only=i == last)
        target = self.norm(x[:, 0])  # [B, T, d0]
        return target.mean(1) if self.config.pooling == "mean" else target.flatten(1)

    def _read_rows(self, x: torch.Tensor, rows: torch.Tensor, row_mask: Optional[torch.Tensor],
                   groups: Optional[QueryGroups]) -> torch.Tensor:
        """``history_sees_target=False``: target rows x [B, 1, T, d0] read history rows
        [R, L, T, d0] (:meth:`SIFMixerBlock.read_rows`) -> [B, output_dim]."""
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, rows = block.read_rows(x, rows, row_mask, groups, last=i == last)
        target = self.norm(x[:, 0])
        return target.mean(1) if self.config.pooling == "mean" else target.flatten(1)

    def _sequence_forward(self, x: torch.Tensor, row_mask: Optional[torch.Tensor]
                          ) -> torch.Tensor:
        """The ``flat`` and ``pooled`` structures: H [B, R, T, d0] (masked rows zero), row_mask
        [B, R] bool or None (all real) -> [B, output_dim]."""
        b, r, t, d0 = x.shape
        if self.config.structure == "flat":
            seq, queries = x.reshape(b, r * t, d0), t  # row-major: the target's T tokens first
            mask = None if row_mask is None else row_mask.repeat_interleave(t, dim=1)
        else:
            seq, queries, mask = x.mean(2), 1, row_mask  # [B, R, d0]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            seq = block(seq, mask, queries=queries if i == last else None)
        target = self.norm(seq)  # [B, T, d0] (flat) or [B, 1, d0] (pooled)
        return target.mean(1) if self.config.pooling == "mean" else target.flatten(1)


class IATHistoryProjection(nn.Module):
    """Maps IAT instance tokens [B, L, d] to SIF-Mixer history rows [B, L, T, d0] (one linear
    map, so the mixer can read IAT tokens where it reads HGAQ codebook sums)."""

    def __init__(self, token_dim: int, num_tokens: int, d0: int,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.num_tokens, self.d0 = num_tokens, d0
        self.linear = nn.Linear(token_dim, num_tokens * d0, device=device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, d] -> [B, L, T, d0]."""
        return self.linear(tokens).unflatten(-1, (self.num_tokens, self.d0))


class SIFMixerInteractionArch(nn.Module):
    """The SIF-Mixer as DLRM's interaction arch (form a): the target row is DLRM's dense
    embedding plus one token per sparse feature, T = 1 + F, each mapped to d0 by the alignment
    projection; without history, a token-level mixer over the target row.

    Replaces ``inter_arch`` of ``torchrec.models.dlrm.DLRM`` the way ``DLRM_DCN`` does, with an
    ``OverArch`` of ``output_dim`` inputs.

    Args:
        dense_dim: width of the dense embedding (DLRM's dense arch output).
        sparse_dims: width of each sparse feature's pooled embedding.
        config: mixer sizes.
        feature_names: the sparse features in token order, to pick them from a KeyedTensor
            (default: the KeyedTensor's own order).
        device: where the parameters live.

    Example::

        model = DLRM(ebc, dense_in_features=13, dense_arch_layer_sizes=[64, D],
                     over_arch_layer_sizes=[64, 1])
        model.inter_arch = SIFMixerInteractionArch(D, [D] * F, SIFMixerConfig())
        model.over_arch = OverArch(model.inter_arch.output_dim, [64, 1])
    """

    def __init__(self, dense_dim: int, sparse_dims: Sequence[int], config: SIFMixerConfig,
                 feature_names: Optional[Sequence[str]] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if feature_names is not None and len(feature_names) != len(sparse_dims):
            raise ValueError("feature_names and sparse_dims must have the same length")
        self.dense_dim = dense_dim
        self.sparse_dims = list(sparse_dims)
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.num_sparse_features = len(self.sparse_dims)
        self.width = max([dense_dim, *self.sparse_dims])
        self.mixer = SIFMixer(1 + self.num_sparse_features, config, target_dim=self.width,
                              device=device)
        self.output_dim: int = self.mixer.output_dim

    def target_tokens(self, dense_features: torch.Tensor, sparse_features: SparseFeatures
                      ) -> torch.Tensor:
        """The target row before alignment, [B, 1 + F, width] (narrower tokens zero-padded)."""
        if not isinstance(sparse_features, torch.Tensor):
            # A KeyedTensor: torchrec is installed then; this module itself needs torch only.
            from iat_torchrec.models.hgaq import keyed_columns

            names = self.feature_names or list(sparse_features.keys())
            sparse = keyed_columns(sparse_features, names, self.width)
        else:
            sparse = sparse_features
            if sparse.shape[-1] < self.width:
                sparse = F.pad(sparse, (0, self.width - sparse.shape[-1]))
        if sparse.shape[1] != self.num_sparse_features:
            raise ValueError(f"expected {self.num_sparse_features} sparse features, "
                             f"got {sparse.shape[1]}")
        dense = F.pad(dense_features, (0, self.width - dense_features.shape[-1]))
        return torch.cat([dense.unsqueeze(1), sparse], dim=1)

    def forward(self, dense_features: torch.Tensor,
                sparse_features: SparseFeatures,
                history: Optional[torch.Tensor] = None,
                history_mask: Optional[torch.Tensor] = None,
                recency: Optional[torch.Tensor] = None,
                side: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            dense_features: [B, dense_dim].
            sparse_features: [B, F, D] (DLRM's SparseArch output) or a KeyedTensor of pooled
                embeddings.
            history, history_mask, recency, side: optional history rows, as in
                :meth:`SIFMixer.forward` (T = 1 + F).

        Returns:
            [B, output_dim].
        """
        tokens = self.target_tokens(dense_features, sparse_features)
        return self.mixer(tokens, history, history_mask, recency, side)


__all__: Sequence[str] = (
    "POOLINGS", "STRUCTURES", "SIFMixerConfig", "MultiHeadAttention", "SIFMixerBlock",
    "SIFMixer", "IATHistoryProjection", "SIFMixerInteractionArch",
)
