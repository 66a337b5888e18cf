"""History branches of the downstream model: DIN, BST and a mean pool over item-id histories,
and the IAT branch over instance tokens (METHOD.md, "Stage 3").

Each branch reads one target sample's history ``[B, L, ...]`` with the per-step side information
of :class:`~iat_torchrec.history.HistoryBatch` (``label`` with the LABEL_* values,
``gap_bucket``, ``mask`` True = real step) and returns one token ``[B, out]`` that enters DLRM's
feature interaction as one more feature:

- :class:`DINAttention`: target attention (Deep Interest Network). A key per step is the item
  embedding plus a label (and time-gap) side-information embedding; an activation unit (MLP over
  ``[q, k, q - k, q * k]``) scores each key against the target item ``q``; the output is the
  score-weighted sum of keys (unnormalised as in DIN, or softmax-normalised).
- :class:`BSTEncoder`: Behaviour Sequence Transformer. Tokens ``[target; history]``, the history
  steps carrying label, time-gap and position-from-the-end embeddings; pre-LayerNorm Transformer
  blocks with a padding mask; the output is the target token (or the masked mean of all tokens).
- :class:`MeanPoolHistory`: the peer library's DNN baseline (METHOD.md, "How the peer's numbers
  were made"): the mean item embedding and the mean label embedding over the real steps, two
  feature tokens as the peer's two pooled sequence fields.
- :class:`IATBranch`: instance tokens e (frozen, from the token lookup) -> adaptation
  ``sigmoid(W e + b)`` (64) concatenated with side-information embeddings (label + gap, 64) ->
  128 per step; a query token, a compressed linear projection of the current sample's features,
  is put in front; Transformer blocks over ``[query; history]``; the query's output, projected,
  is the branch's one token.

Decisions where METHOD.md is silent:

- Masks are honoured everywhere: padded steps are zeroed (NaN included) before any arithmetic and
  their ids replaced by 0 before embedding lookups, and attention never looks at them, so outputs
  do not depend on what padding holds or on how much of it there is, nor on where the real steps
  sit (left- or right-aligned). The target (BST) or query (IAT) token is always real, so no
  softmax is ever empty; DIN and the mean pool over an empty history return zeros. All give
  finite values and gradients for empty histories.
- Speed without a change of result: the steps that are padding in every sample of the batch are
  cut off first (:func:`~iat_torchrec.models.padding.trim`; without padding left, attention runs
  unmasked); attention is laid out as in :mod:`iat_torchrec.models.attention`; DIN's activation
  unit takes the query's part of its first layer once per sample. ``iat_torchrec.models.reference``
  keeps the earlier forward passes, which the tests compare with.
- Position from the end (BST; IAT optionally) counts the real steps after a step, clipped to the
  last bucket, so it is the same for any alignment; the time gap is the BST paper's "position".
- The IAT side information is the sum of a label and a gap embedding, each ``side_dim`` wide; the
  Transformer's width is ``adapt_dim + side_dim``. Tokens are detached (the store is frozen).
- Default heads: BST 2 (head size 8 at D = 16), IAT 4 (head size 32 at width 128); GELU FFN of
  width ``ffn_mult`` times the model width; the last block computes only the output token.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch
from torch import nn

from iat_torchrec.models.attention import MultiHeadAttention, QueryGroups, visible_keys
from iat_torchrec.history.batch import LABEL_VOCAB_SIZE, HistoryLayout, steps_after
from iat_torchrec.models.padding import embed, masked_ids, trim, zero_padding

DEFAULT_GAP_VOCAB = HistoryLayout().gap_vocab_size
BST_OUTPUTS = ("target", "mean")
IAT_ENCODERS = ("transformer", "din")


# --------------------------------------------------------------------------- configs
@dataclasses.dataclass
class DINConfig:
    """The DIN activation unit."""

    attention_layers: List[int] = dataclasses.field(
        default_factory=lambda: [64, 32],
        metadata={"help": "hidden sizes of the activation unit (PReLU)"})
    softmax: bool = dataclasses.field(default=False, metadata={
        "help": "normalise the attention scores with a softmax (DIN itself does not)"})
    use_gap: bool = dataclasses.field(default=True, metadata={
        "help": "add a time-gap embedding to each key (the label is always added)"})

    def __post_init__(self) -> None:
        if any(n <= 0 for n in self.attention_layers):
            raise ValueError(f"DINConfig.attention_layers must be positive, "
                             f"got {self.attention_layers}")


@dataclasses.dataclass
class BSTConfig:
    """The BST Transformer over [target; item history]."""

    num_layers: int = dataclasses.field(default=1, metadata={"help": "Transformer blocks"})
    num_heads: int = dataclasses.field(default=2, metadata={"help": "attention heads"})
    ffn_mult: int = dataclasses.field(default=4, metadata={"help": "FFN width / D"})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout"})
    position_buckets: int = dataclasses.field(default=64, metadata={
        "help": "position-from-the-end embeddings (0: none)"})
    use_gap: bool = dataclasses.field(default=True, metadata={
        "help": "add a time-gap embedding to each history step"})
    output: str = dataclasses.field(default="target", metadata={
        "help": "target | mean: the target token, or the masked mean of all tokens"})

    def __post_init__(self) -> None:
        _check_transformer("BSTConfig", self.num_layers, self.num_heads, self.ffn_mult,
                           self.dropout, self.position_buckets)
        if self.output not in BST_OUTPUTS:
            raise ValueError(f"BSTConfig.output must be one of {BST_OUTPUTS}, got {self.output!r}")


@dataclasses.dataclass
class IATBranchConfig:
    """The IAT branch (paper sizes: 64 + 64 = 128 per step)."""

    adapt_dim: int = dataclasses.field(default=64, metadata={
        "help": "width of the adaptation MLP sigmoid(W e + b)"})
    side_dim: int = dataclasses.field(default=64, metadata={
        "help": "width of the side-information embeddings (label, time gap)"})
    num_layers: int = dataclasses.field(default=2, metadata={"help": "Transformer blocks"})
    num_heads: int = dataclasses.field(default=4, metadata={"help": "attention heads"})
    ffn_mult: int = dataclasses.field(default=4, metadata={"help": "FFN width / model width"})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout"})
    position_buckets: int = dataclasses.field(default=0, metadata={
        "help": "position-from-the-end embeddings (0: none; the time gap orders the steps)"})
    side_labels: bool = dataclasses.field(default=True, metadata={
        "help": "the label embedding is part of each step's side information (false: the time "
                "gap alone)"})
    encoder: str = dataclasses.field(default="transformer", metadata={
        "help": "transformer: blocks over [query; steps], the query's output | din: DIN target "
                "attention over the steps with the query as target (no blocks)"})
    din_layers: List[int] = dataclasses.field(default_factory=lambda: [64, 32], metadata={
        "help": "encoder din: hidden sizes of the activation unit (PReLU)"})
    side_init_std: float = dataclasses.field(default=0.02, metadata={
        "help": "std of the initial label and time-gap embeddings (side information)"})
    history_sees_query: bool = dataclasses.field(default=True, metadata={
        "help": "encoder transformer: the steps attend to the query too (so each candidate "
                "re-encodes the history) | false: the steps attend among themselves and the "
                "query reads them, so a request's candidates share one encoded history"})

    def __post_init__(self) -> None:
        if self.adapt_dim <= 0 or self.side_dim <= 0:
            raise ValueError("IATBranchConfig: adapt_dim and side_dim must be > 0")
        if not self.side_init_std > 0:
            raise ValueError(f"IATBranchConfig.side_init_std must be > 0, "
                             f"got {self.side_init_std}")
        if self.encoder not in IAT_ENCODERS:
            raise ValueError(f"IATBranchConfig.encoder must be one of {IAT_ENCODERS}, "
                             f"got {self.encoder!r}")
        if any(n <= 0 for n in self.din_layers):
            raise ValueError(f"IATBranchConfig.din_layers must be positive, got {self.din_layers}")
        _check_transformer("IATBranchConfig", self.num_layers, self.num_heads, self.ffn_mult,
                           self.dropout, self.position_buckets)
        if (self.adapt_dim + self.side_dim) % self.num_heads:
            raise ValueError(f"IATBranchConfig: adapt_dim + side_dim "
                             f"({self.adapt_dim + self.side_dim}) must be a multiple of "
                             f"num_heads ({self.num_heads})")

    @property
    def model_dim(self) -> int:
        return self.adapt_dim + self.side_dim


def _check_transformer(name: str, layers: int, heads: int, ffn_mult: int, dropout: float,
                       positions: int) -> None:
    if layers <= 0 or heads <= 0 or ffn_mult <= 0:
        raise ValueError(f"{name}: num_layers, num_heads and ffn_mult must be > 0")
    if not 0.0 <= dropout < 1.0 or positions < 0:
        raise ValueError(f"{name}: dropout must lie in [0, 1) and position_buckets be >= 0")


# --------------------------------------------------------------------------- helpers
class TransformerBlock(nn.Module):
    """A pre-LayerNorm encoder block (self-attention through SDPA with a padding mask, GELU FFN)
    that can compute the first position only.

    Args:
        dim: model width.
        num_heads, ffn_mult, dropout: attention heads, FFN width / dim, dropout.
        device: where the parameters live.
    """

    def __init__(self, dim: int, num_heads: int, ffn_mult: int, dropout: float = 0.0,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, device=device)
        self.attention = MultiHeadAttention(dim, num_heads, dropout, device=device)
        self.ffn_norm = nn.LayerNorm(dim, device=device)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim, device=device), nn.GELU(),
                                 nn.Linear(ffn_mult * dim, dim, device=device))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], first_only: bool = False,
                queries: Optional[int] = None) -> torch.Tensor:
        """x [B, S, dim], mask [B, S] bool (True = real; None = all real) -> [B, S, dim], or
        [B, Q, dim] (the first Q positions only) with ``queries=Q`` (``first_only``: Q = 1)."""
        b, s, _ = x.shape
        q = 1 if first_only else queries
        a = self.attention(self.attention_norm(x), None if mask is None else mask.view(b, 1, 1, s),
                           num_queries=q)
        x = (x if q is None else x[:, :q]) + self.dropout(a)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))

    def attend(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: Optional[torch.Tensor],
               groups: Optional[QueryGroups] = None) -> torch.Tensor:
        """The block for queries x [N, Q, dim] that see themselves and ``memory`` [M, S, dim]
        (this block's input there; mask [M, S] bool or None; row n reads memory row n or
        ``groups.groups[n]``) -> [N, Q, dim] (:meth:`MultiHeadAttention.attend`)."""
        a = self.attention.attend(self.attention_norm(x), self.attention_norm(memory),
                                  memory_mask, groups)
        x = x + self.dropout(a)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


def _encode(blocks: nn.ModuleList, x: torch.Tensor, mask: Optional[torch.Tensor],
            first_only: bool) -> torch.Tensor:
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        x = block(x, mask, first_only=first_only and i == last)
    return x


# --------------------------------------------------------------------------- DIN
class ActivationUnit(nn.Sequential):
    """DIN's activation unit: an MLP (PReLU hidden layers, one output) over
    ``[q, k, q - k, q * k]``, scoring each key against the query.

    Args:
        dim: D, the width of the query and of each key (the first layer takes 4 D).
        layers: hidden sizes.
        device: where the parameters live.

    Example::

        unit = ActivationUnit(16, [64, 32])
        scores = unit.score(query, keys)     # [B, 16], [B, L, 16] -> [B * L, 1]
    """

    def __init__(self, dim: int, layers: Sequence[int],
                 device: Optional[torch.device] = None) -> None:
        modules: List[nn.Module] = []
        width = 4 * dim
        for n in layers:
            modules += [nn.Linear(width, n, device=device), nn.PReLU(n, device=device)]
            width = n
        modules.append(nn.Linear(width, 1, device=device))
        super().__init__(*modules)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query [B, D], keys [B, L, D] -> [B * L, 1], with the first layer split by
        linearity: ``W [q, k, q - k, q k] = (W_q + W_d) q + [W_k - W_d, W_p] [k, q k]``, the
        query's part once per sample."""
        d = keys.shape[-1]
        first, *rest = list(self)
        w_q, w_k, w_d, w_p = first.weight.split(d, dim=1)
        per_sample = torch.addmm(first.bias, query, (w_q + w_d).t())  # [B, n]
        per_step = torch.cat([keys, query.unsqueeze(1) * keys], -1) @ torch.cat(
            [w_k - w_d, w_p], 1).t()  # [B, L, n]
        # [B * L, n]: PReLU's per-unit slopes act on dim 1.
        hidden = (per_step + per_sample.unsqueeze(1)).flatten(0, 1)
        for module in rest:
            hidden = module(hidden)
        return hidden


def target_attention(unit: ActivationUnit, query: torch.Tensor, keys: torch.Tensor,
                     mask: torch.Tensor, softmax: bool) -> torch.Tensor:
    """DIN's pooling: the score-weighted sum of ``keys`` [B, L, D] (padded steps zero) against
    ``query`` [B, D], mask [B, L] bool -> [B, D]; scores unnormalised as in DIN, or
    softmax-normalised over the real steps; zeros for an empty history."""
    scores = unit.score(query, keys).view(mask.shape)
    if softmax:
        # A finite fill keeps all-masked rows (uniform, then zeroed) free of NaN gradients.
        scores = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), -1)
    weights = torch.where(mask, scores, scores.new_zeros(()))
    return (weights.unsqueeze(-1) * keys).sum(1)


class DINAttention(nn.Module):
    """DIN target attention over an item-id history with label (and gap) side information.

    Args:
        embed_dim: D, the item embedding width (the query's too).
        config: activation unit and options.
        label_vocab: label side-information ids (LABEL_* values).
        gap_vocab: gap-bucket ids (``HistoryLayout.gap_vocab_size``).
        device: where the parameters live.

    Example::

        din = DINAttention(16, DINConfig())
        out = din(target_item,            # [B, 16]
                  history_items,          # [B, L, 16] item embeddings
                  history.label, history.gap_bucket, history.mask)   # -> [B, 16]
    """

    num_tokens = 1

    def __init__(self, embed_dim: int, config: DINConfig, label_vocab: int = LABEL_VOCAB_SIZE,
                 gap_vocab: int = DEFAULT_GAP_VOCAB, device: Optional[torch.device] = None
                 ) -> None:
        super().__init__()
        self.config, self.embed_dim = config, embed_dim
        self.label_embedding = nn.Embedding(label_vocab, embed_dim, device=device)
        self.gap_embedding = (nn.Embedding(gap_vocab, embed_dim, device=device)
                              if config.use_gap else None)
        self.activation_unit = ActivationUnit(embed_dim, config.attention_layers, device=device)
        self.output_dim: int = embed_dim
        for emb in (self.label_embedding, self.gap_embedding):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)

    def keys(self, items: torch.Tensor, label: torch.Tensor, gap_bucket: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        """Per-step keys [B, L, D]: item + side information, padded steps zero."""
        k = zero_padding(items, mask) + embed(self.label_embedding, masked_ids(label, mask))
        if self.gap_embedding is not None:
            k = k + embed(self.gap_embedding, masked_ids(gap_bucket, mask))
        return zero_padding(k, mask)

    def forward(self, query: torch.Tensor, items: torch.Tensor, label: torch.Tensor,
                gap_bucket: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query [B, D], items [B, L, D], label / gap_bucket [B, L] int, mask [B, L] bool ->
        [B, D] (zeros for an empty history)."""
        mask, (items, label, gap_bucket), _ = trim(mask.bool(), items, label, gap_bucket)
        k = self.keys(items, label, gap_bucket, mask)
        return target_attention(self.activation_unit, query, k, mask, self.config.softmax)

    def scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The activation unit's scores (:meth:`ActivationUnit.score`), query [B, D], keys
        [B, L, D] -> [B * L, 1]."""
        return self.activation_unit.score(query, keys)


# --------------------------------------------------------------------------- BST
class BSTEncoder(nn.Module):
    """BST: a Transformer over ``[target item; item history]``.

    Args:
        embed_dim: D, the item embedding width (the model width).
        config: blocks, heads, positions, output.
        label_vocab, gap_vocab: side-information vocabularies.
        device: where the parameters live.

    Example::

        bst = BSTEncoder(16, BSTConfig())
        out = bst(target_item, history_items, history.label, history.gap_bucket,
                  history.mask)    # -> [B, 16]
    """

    num_tokens = 1

    def __init__(self, embed_dim: int, config: BSTConfig, label_vocab: int = LABEL_VOCAB_SIZE,
                 gap_vocab: int = DEFAULT_GAP_VOCAB, device: Optional[torch.device] = None
                 ) -> None:
        super().__init__()
        if embed_dim % config.num_heads:
            raise ValueError(f"BST: embedding dim {embed_dim} must be a multiple of num_heads "
                             f"({config.num_heads})")
        self.config, self.embed_dim = config, embed_dim
        self.label_embedding = nn.Embedding(label_vocab, embed_dim, device=device)
        self.gap_embedding = (nn.Embedding(gap_vocab, embed_dim, device=device)
                              if config.use_gap else None)
        self.position_embedding = (nn.Embedding(config.position_buckets, embed_dim, device=device)
                                   if config.position_buckets else None)
        self.target_embedding = nn.Parameter(torch.zeros(embed_dim, device=device))
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, config.num_heads, config.ffn_mult, config.dropout,
                             device=device) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(embed_dim, device=device)
        self.output_dim: int = embed_dim
        for emb in (self.label_embedding, self.gap_embedding, self.position_embedding):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)

    def history_tokens(self, items: torch.Tensor, label: torch.Tensor, gap_bucket: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """History tokens [B, L, D]: item + label (+ gap, + position), padded steps zero."""
        h = zero_padding(items, mask) + embed(self.label_embedding, masked_ids(label, mask))
        if self.gap_embedding is not None:
            h = h + embed(self.gap_embedding, masked_ids(gap_bucket, mask))
        if self.position_embedding is not None:
            pos = steps_after(mask).clamp(max=self.config.position_buckets - 1)
            h = h + embed(self.position_embedding, masked_ids(pos, mask))
        return zero_padding(h, mask)

    def forward(self, target: torch.Tensor, items: torch.Tensor, label: torch.Tensor,
                gap_bucket: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """target [B, D], items [B, L, D], label / gap_bucket [B, L] int, mask [B, L] bool ->
        [B, D]."""
        mask, (items, label, gap_bucket), all_real = trim(mask.bool(), items, label, gap_bucket)
        x = torch.cat([(target + self.target_embedding).unsqueeze(1),
                       self.history_tokens(items, label, gap_bucket, mask).to(target.dtype)], 1)
        full = None if all_real else torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        target_only = self.config.output == "target"
        x = self.norm(_encode(self.blocks, x, full, target_only))
        if target_only:
            return x[:, 0]
        if full is None:
            return x.mean(1)
        x = zero_padding(x, full)
        return x.sum(1) / full.sum(1, keepdim=True).to(x.dtype)


# --------------------------------------------------------------------------- mean pool
class MeanPoolHistory(nn.Module):
    """Mean pooling of an item-id history with its labels, as two feature tokens: the mean of
    the item embeddings and the mean of learned label embeddings over the real steps (the peer
    library's DNN, whose item and label sequences are two pooled fields; its label ids already
    tell unknown / not matured labels apart). Target and time gaps are not read.

    Args:
        embed_dim: D, the item embedding width.
        label_vocab: label side-information ids (LABEL_* values).
        device: where the parameters live.

    Example::

        pool = MeanPoolHistory(16)
        out = pool(target_item,           # [B, 16] (unused)
                   history_items,         # [B, L, 16] item embeddings
                   history.label, history.gap_bucket, history.mask)   # -> [B, 2, 16]
    """

    num_tokens = 2

    def __init__(self, embed_dim: int, label_vocab: int = LABEL_VOCAB_SIZE,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.label_embedding = nn.Embedding(label_vocab, embed_dim, device=device)
        self.output_dim: int = embed_dim
        nn.init.normal_(self.label_embedding.weight, std=0.02)

    def forward(self, target: torch.Tensor, items: torch.Tensor, label: torch.Tensor,
                gap_bucket: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """target [B, D] (unused), items [B, L, D], label / gap_bucket (unused) [B, L] int,
        mask [B, L] bool -> [B, 2, D]: the item mean and the label mean (zeros for an empty
        history)."""
        mask = mask.bool()
        steps = torch.stack([zero_padding(items, mask),
                             embed(self.label_embedding, masked_ids(label, mask))], dim=1)
        count = mask.sum(1).clamp_min(1).to(steps.dtype).view(-1, 1, 1)
        return (steps * mask[:, None, :, None]).sum(2) / count


# --------------------------------------------------------------------------- IAT
class IATBranch(nn.Module):
    """The IAT branch: frozen instance tokens -> adaptation + side information -> a Transformer
    over ``[query; history]`` -> one token.

    ``config.encoder="din"`` replaces the Transformer by DIN target attention
    (:class:`ActivationUnit`, :func:`target_attention`): the projected query q [B, W] scores
    each step x_j [B, L, W] (W = adapt_dim + side_dim), the output is
    ``output(norm(sum_j a(q, x_j) x_j))`` [B, output_dim], zero weights on padded steps.
    ``config.side_labels=False`` drops the label embedding: a step's side information is its
    time-gap embedding alone (same widths).

    Args:
        token_dim: d, the instance token width.
        query_dim: width of the current sample's features the query is projected from.
        output_dim: width of the output token (D, to enter the interaction as a feature).
        config: sizes.
        label_vocab, gap_vocab: side-information vocabularies.
        device: where the parameters live.

    Example::

        branch = IATBranch(token_dim=64, query_dim=(1 + F) * D, output_dim=D,
                           config=IATBranchConfig())
        tokens = lookup(history.row_ids)                  # [B, L, 64], frozen
        out = branch(tokens, history.label, history.gap_bucket, history.mask,
                     torch.cat([dense_embedding, sparse_embeddings.flatten(1)], 1))  # [B, D]
    """

    def __init__(self, token_dim: int, query_dim: int, output_dim: int, config: IATBranchConfig,
                 label_vocab: int = LABEL_VOCAB_SIZE, gap_vocab: int = DEFAULT_GAP_VOCAB,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.config, self.token_dim = config, token_dim
        width = config.model_dim
        self.adapt = nn.Linear(token_dim, config.adapt_dim, device=device)
        self.label_embedding = (nn.Embedding(label_vocab, config.side_dim, device=device)
                                if config.side_labels else None)
        self.gap_embedding = nn.Embedding(gap_vocab, config.side_dim, device=device)
        self.position_embedding = (nn.Embedding(config.position_buckets, width, device=device)
                                   if config.position_buckets else None)
        self.query = nn.Linear(query_dim, width, device=device)
        transformer = config.encoder == "transformer"
        self.blocks = nn.ModuleList(
            TransformerBlock(width, config.num_heads, config.ffn_mult, config.dropout,
                             device=device)
            for _ in range(config.num_layers if transformer else 0))
        self.activation_unit = (None if transformer else
                                ActivationUnit(width, config.din_layers, device=device))
        self.norm = nn.LayerNorm(width, device=device)
        self.output = nn.Linear(width, output_dim, device=device)
        self.output_dim: int = output_dim
        for emb in (self.label_embedding, self.gap_embedding):
            if emb is not None:
                nn.init.normal_(emb.weight, std=config.side_init_std)
        if self.position_embedding is not None:
            nn.init.normal_(self.position_embedding.weight, std=0.02)

    def steps(self, tokens: torch.Tensor, label: torch.Tensor, gap_bucket: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
        """Per-step inputs [B, L, adapt_dim + side_dim], padded steps zero; tokens detached."""
        e = zero_padding(tokens.detach().to(self.adapt.weight.dtype), mask)
        side = embed(self.gap_embedding, masked_ids(gap_bucket, mask))
        if self.label_embedding is not None:
            side = embed(self.label_embedding, masked_ids(label, mask)) + side
        x = torch.cat([torch.sigmoid(self.adapt(e)), side], dim=-1)
        if self.position_embedding is not None:
            pos = steps_after(mask).clamp(max=self.config.position_buckets - 1)
            x = x + embed(self.position_embedding, masked_ids(pos, mask))
        return zero_padding(x, mask)

    def forward(self, tokens: torch.Tensor, label: torch.Tensor, gap_bucket: torch.Tensor,
                mask: torch.Tensor, query: torch.Tensor,
                groups: Optional[QueryGroups] = None) -> torch.Tensor:
        """tokens [R, L, d] (no gradient reaches them), label / gap_bucket [R, L] int,
        mask [R, L] bool, query [B, query_dim] -> [B, output_dim]. Sample b reads history b
        (R = B), or history ``groups.groups[b]``: with ``history_sees_query=False`` each
        history is then encoded once for all the samples that read it."""
        mask, (tokens, label, gap_bucket), all_real = trim(mask.bool(), tokens, label,
                                                           gap_bucket)
        steps = self.steps(tokens, label, gap_bucket, mask)  # [R, L, W]
        q = self.query(query)  # [B, W]
        if self.activation_unit is None and not self.config.history_sees_query:
            return self.output(self.norm(self._read_history(q, steps, mask, all_real, groups)))
        if groups is not None:  # every sample its own copy of its history
            steps, mask = groups.expand(steps), groups.expand(mask)
        if self.activation_unit is not None:
            pooled = target_attention(self.activation_unit, q, steps, mask, softmax=False)
            return self.output(self.norm(pooled))
        x = torch.cat([q.unsqueeze(1), steps], dim=1)
        full = None if all_real else torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        x = _encode(self.blocks, x, full, first_only=True)
        return self.output(self.norm(x[:, 0]))

    def _read_history(self, q: torch.Tensor, steps: torch.Tensor, mask: torch.Tensor,
                      all_real: bool, groups: Optional[QueryGroups]) -> torch.Tensor:
        """``history_sees_query=False``: the steps [R, L, W] run the blocks among themselves,
        the queries q [B, W] read each block's input steps -> [B, W]."""
        memory_mask = None if all_real else mask
        self_mask = None if all_real else visible_keys(mask)
        x = q.unsqueeze(1)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block.attend(x, steps, memory_mask, groups)
            if i < last:
                steps = block(steps, self_mask)
        return x[:, 0]


__all__: Sequence[str] = (
    "LABEL_VOCAB_SIZE", "DEFAULT_GAP_VOCAB", "IAT_ENCODERS", "DINConfig", "BSTConfig",
    "IATBranchConfig", "masked_ids", "zero_padding", "TransformerBlock", "ActivationUnit",
    "target_attention",
    "DINAttention", "BSTEncoder", "MeanPoolHistory", "IATBranch",
)
