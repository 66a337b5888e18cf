"""The downstream model (METHOD.md, "Stage 3"): ``DLRM_SIF``, composed like
``torchrec.models.dlrm.DLRM`` of a sparse arch, a dense arch, history parts, an interaction and
an over arch. The history sources and the parts each one uses are the table of
:mod:`iat_torchrec.models.variants`; :func:`build_tower` is the one place that turns a variant
into parts:

- history feature parts, each one more feature token [B, D] for the interaction:
  :class:`ItemHistoryArch` (DIN, BST or a mean pool over the last k item ids) and
  :class:`IATHistoryArch` (the IAT branch over instance tokens);
- SIF-Mixer history rows [R, L, T, d0]: :class:`TokenRows` (IAT tokens mapped to T x d0) and
  :class:`CodeRows` (codebook sums of HGAQ codes), summed when both;
- the interaction: :class:`FeatureInteraction` around TorchRec's ``InteractionArch`` (``dot``:
  with source ``none`` exactly TorchRec's DLRM, the reference), TorchRec's
  ``InteractionDCNArch`` with a ``LowRankCrossNet`` (``dcn``: DCNv2 as in TorchRec's
  ``DLRM_DCN``) or ``SIFMixerInteractionArch`` (``mixer``: the SIF-Mixer over [dense;
  features]); for the SIF sources
  :class:`SIFMixerHistoryArch`, the full SIF-Mixer over [target row; history rows].

Structure (what DistributedModelParallel and ``TrainPipelineSparseDist`` see):

- ``sparse_arch.embedding_bag_collection``: one EBC over every sparse field, all tables D wide
  (as DLRM), built on ``table_device`` (``meta`` for DMP). It is the only sharded module, called
  once, on ``batch.sparse_features``, so the pipeline overlaps its input distribution.
- ``tower`` (:class:`DLRMSIFTower`): everything else, one module without sharded submodules, so
  the pipeline's tracer takes it as a leaf; ``tower(dense, pooled KeyedTensor, history,
  target_codes) -> (logits, per-row alignment loss)``. Embeddings are read from the KeyedTensor
  by name (a sharded EBC groups its keys by shard).

Decisions where METHOD.md is silent:

- **Item-id history embeddings share the target's item table through the EBC.** The item table's
  ``EmbeddingBagConfig`` gets ``item_history_len`` extra features ``hist_item_0 ..
  hist_item_{k-1}``, one per history step, each a bag of one id (empty at padding, which pools to
  zero); their pooled outputs are the per-step embeddings. One table, sharded once, trained by
  the same fused optimizer, looked up in the same (pipelined) EBC call. TorchRec cannot share a
  table between an EBC and an ``EmbeddingCollection``, and moving the item table into an EC
  would change the reference DLRM and need another fused optimizer. The cost: k more KJT keys.
  :meth:`~iat_torchrec.history.DownstreamBatch.build` (or
  :func:`~iat_torchrec.history.add_history_items`) appends them on the data side.
- The item history is the last k real steps of the batch's history
  (:func:`~iat_torchrec.history.last_steps`), so one HistoryBatch serves a long token history
  and a short item history at once.
- The IAT query is a linear projection of ``[dense embedding; F sparse embeddings]``.
- Every branch token is D wide and enters the interaction as one more sparse feature (before the
  interaction, as the paper found best), for either interaction.
- SIF target row (form b): the T slots are HGAQ's (:func:`~iat_torchrec.models.hgaq.
  subtoken_layout` with the SIF store's tokenizer's ``fields_per_subtoken``); slot t's input is
  DLRM's dense embedding followed by the pooled embeddings of the slot's sparse fields
  (zero-padded to the widest slot); the mixer's per-slot W_res maps it to d0. Dense fields reach
  every slot through the dense embedding. The OverArch reads the mixer's output only.
- SIF history rows: gap bucket as the mixer's recency id, matured label as its side id. The codes
  of history steps come from an injected code lookup
  (:class:`~iat_torchrec.tokens.lookup.SampleCodeLookup`: row ids -> codes, like the token
  lookup), so ``sif_both`` reads one HistoryBatch for both stores (build the code lookup in the
  token store's row order with ``rows_like``).
- ``gap_vocab_size`` (the history shards' ``HistoryLayout``) and ``fields_per_subtoken`` (the
  SIF store's tokenizer) describe the data, not the model: they are constructor inputs of
  :class:`DLRM_SIF`, not config fields.
- ``L_align`` (weight ``mixer.alignment_weight``) is taken whenever codebooks are given (e from
  ``batch.target_codes``); it is per row, so padding rows (weight 0) leave no trace. L_VQ belongs
  to the frozen tokenizer and is not part of this loss.
- The injected token and code lookups are frozen: the parts that read them hold them through a
  :class:`FrozenLookup`, a plain object (not an ``nn.Module``), which ``nn.Module`` keeps as an
  ordinary attribute, outside the module tree: no parameters, no state_dict entries, no DDP
  buffer broadcasts, no ``.to()`` (they are built on their device), no sharding by DMP, and the
  tracer keeps the tower a leaf even if the lookup is sharded. They run under
  ``torch.no_grad``. The codebooks are a (persistent) buffer of the tower, which hands them to
  its parts in :class:`TowerInputs`.
- DLRM's dense arch is kept with no dense fields (a learned constant token), like TorchRec's.
- Tables are sum-pooled, multi-valued fields mean-pooled (as the tokenizer's).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.models.dlrm import (DenseArch, InteractionArch, InteractionDCNArch, OverArch,
                                  SparseArch, choose)
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from iat_torchrec.data.spec import FeatureSpec
from iat_torchrec.history import (LABEL_VOCAB_SIZE, DownstreamBatch, HistoryBatch,
                                  history_item_features, last_steps)
from iat_torchrec.models.attention import QueryGroups
from iat_torchrec.models.hgaq import HGAQConfig, keyed_columns, subtoken_layout
from iat_torchrec.models.history import (DEFAULT_GAP_VOCAB, BSTConfig, BSTEncoder, DINAttention,
                                         DINConfig, IATBranch, IATBranchConfig,
                                         MeanPoolHistory)
from iat_torchrec.models.mixer import (IATHistoryProjection, SIFMixer, SIFMixerConfig,
                                       SIFMixerInteractionArch)
from iat_torchrec.models.variants import INTERACTIONS, ITEM_BRANCHES, HistorySource, Variant

DEFAULT_FIELDS_PER_SUBTOKEN = HGAQConfig().fields_per_subtoken


@dataclass
class DLRMSIFConfig:
    """Sizes and history source of the downstream model (the data-given sizes are
    :class:`DLRM_SIF`'s inputs)."""

    history_source: HistorySource = dataclasses.field(default=HistorySource.NONE, metadata={
        "help": " | ".join(s.value for s in HistorySource)})
    interaction: str = dataclasses.field(default="mixer", metadata={
        "help": "mixer (SIF-Mixer) | dot (TorchRec DLRM's) | dcn (DCNv2: TorchRec DLRM_DCN's "
                "low-rank cross net) | concat (none: a DNN over all embeddings); SIF sources "
                "need mixer"})
    embedding_dim: int = dataclasses.field(default=16, metadata={
        "help": "D: width of every embedding table, the dense embedding and branch tokens"})
    dense_arch_layers: List[int] = dataclasses.field(default_factory=lambda: [64], metadata={
        "help": "hidden sizes of the dense arch (a final layer of D is appended)"})
    over_arch_layers: List[int] = dataclasses.field(default_factory=lambda: [64, 32], metadata={
        "help": "hidden sizes of the over arch (a final layer of one logit per label is "
                "appended)"})
    over_arch_dropout: float = dataclasses.field(default=0.0, metadata={
        "help": "dropout after each hidden layer of the over arch (the peer's MLP: 0.1)"})
    dcn_layers: int = dataclasses.field(default=2, metadata={
        "help": "cross layers of the dcn interaction (2: TorchRec DLRM_DCN's example)"})
    dcn_low_rank: int = dataclasses.field(default=8, metadata={
        "help": "rank of each dcn cross layer's W V (8: TorchRec DLRM_DCN's example)"})
    mixer: SIFMixerConfig = dataclasses.field(default_factory=SIFMixerConfig, metadata={
        "help": "SIF-Mixer sizes (alignment_weight: weight of L_align)"})
    din: DINConfig = dataclasses.field(default_factory=DINConfig, metadata={"help": "DIN"})
    bst: BSTConfig = dataclasses.field(default_factory=BSTConfig, metadata={"help": "BST"})
    iat: IATBranchConfig = dataclasses.field(default_factory=IATBranchConfig, metadata={
        "help": "IAT branch"})
    item_feature: str = dataclasses.field(default="", metadata={
        "help": "the target's item-id field, whose table the item history shares"})
    item_history_len: int = dataclasses.field(default=50, metadata={
        "help": "k: the item-id history is the last k steps of the history"})
    iat_item_branch: str = dataclasses.field(default="bst", metadata={
        "help": "hand-crafted branch kept beside the IAT branch: bst | din | mean | none"})
    item_store_iat: bool = dataclasses.field(default=False, metadata={
        "help": "a second IAT branch over the instance tokens of the item branch's own store "
                "(the target domain's own tokens beside another domain's; needs an IAT history "
                "source, an item branch and an 'iat' item store)"})

    def __post_init__(self) -> None:
        self.history_source = HistorySource(self.history_source)
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, "
                             f"got {self.interaction!r}")
        if self.variant.is_sif and self.interaction != "mixer":
            raise ValueError(f"history source {self.history_source.value} puts history rows "
                             "into the SIF-Mixer: it needs interaction='mixer'")
        if self.iat_item_branch not in ITEM_BRANCHES:
            raise ValueError(f"iat_item_branch must be one of {ITEM_BRANCHES}, "
                             f"got {self.iat_item_branch!r}")
        if self.dcn_layers <= 0 or self.dcn_low_rank <= 0:
            raise ValueError(f"dcn_layers and dcn_low_rank must be > 0, got {self.dcn_layers} "
                             f"and {self.dcn_low_rank}")
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4 (FBGEMM), "
                             f"got {self.embedding_dim}")
        if not self.over_arch_layers or any(n <= 0 for n in
                                            [*self.over_arch_layers, *self.dense_arch_layers]):
            raise ValueError("over_arch_layers needs at least one hidden size; sizes must be > 0")
        if not 0.0 <= self.over_arch_dropout < 1.0:
            raise ValueError(f"over_arch_dropout must be in [0, 1), got {self.over_arch_dropout}")
        if self.item_branch != "none":
            if not self.item_feature:
                raise ValueError(f"history source {self.history_source.value} with item branch "
                                 f"{self.item_branch} needs item_feature")
            if self.item_history_len <= 0:
                raise ValueError("item_history_len must be > 0")
        if self.item_store_iat and (not self.variant.iat_branch or self.item_branch == "none"):
            raise ValueError(f"item_store_iat adds a second IAT branch over the item branch's "
                             f"store; history source {self.history_source.value} with item "
                             f"branch {self.item_branch} has no IAT branch or no item branch")
        if self.variant.is_sif and self.mixer.side_values < LABEL_VOCAB_SIZE:
            raise ValueError(f"mixer.side_values ({self.mixer.side_values}) must cover "
                             f"the {LABEL_VOCAB_SIZE} label side-information values")

    @property
    def variant(self) -> Variant:
        """The history source's entry of :data:`~iat_torchrec.models.variants.VARIANTS`."""
        return self.history_source.variant

    @property
    def item_branch(self) -> str:
        """The hand-crafted item-id branch in use: none | mean | din | bst."""
        return self.variant.item_branch_for(self.iat_item_branch)


# --------------------------------------------------------------------------- tables and inputs
def embedding_tables(spec: FeatureSpec, config: DLRMSIFConfig) -> List[EmbeddingBagConfig]:
    """One D-wide table per sparse field, named ``t_<field>``; the item table also serves the
    item-history features when an item branch is in use."""
    history = (history_item_features(config.item_history_len)
               if config.item_branch != "none" else [])
    if history and config.item_feature not in spec.sparse_names:
        raise ValueError(f"item_feature {config.item_feature!r} is not a sparse field of the "
                         f"spec ({spec.sparse_names})")
    return [EmbeddingBagConfig(
        name=f"t_{f.name}", embedding_dim=config.embedding_dim, num_embeddings=f.num_embeddings,
        feature_names=[f.name, *(history if f.name == config.item_feature else [])],
        pooling=PoolingType.MEAN if f.multi_valued else PoolingType.SUM) for f in spec.sparse]


def codebook_sum(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Codebook sums [..., T, d0] of codes [..., T, M] with codebooks [T, M, V, d0]."""
    t, m, v, d0 = codebooks.shape
    if codes.shape[-2:] != (t, m):
        raise ValueError(f"codes must end in [T={t}, M={m}], got {tuple(codes.shape)}")
    offsets = (torch.arange(t * m, device=codes.device) * v).view(t, m)
    flat = (codes.long() + offsets).reshape(-1, m)
    out = F.embedding_bag(flat, codebooks.reshape(-1, d0), mode="sum")
    return out.view(*codes.shape[:-1], d0)


# --------------------------------------------------------------------------- parts
class FrozenLookup:
    """A frozen lookup (row ids -> tokens or codes) as a part holds it: a plain object, not an
    ``nn.Module``, so ``nn.Module`` keeps it as an ordinary attribute outside the module tree (no
    parameters, state_dict entries, ``.to()``, DDP broadcasts or DMP sharding), and the tower
    stays a leaf for the pipeline's tracer even when the lookup is sharded.

    Args:
        lookup: row ids [..., L] -> [..., L, ...] on its own device (row ids are sent to its
            ``device`` attribute, if it has one).

    Example::

        tokens = FrozenLookup(InstanceTokenLookup(store))(history.row_ids, like=dense)
    """

    def __init__(self, lookup: nn.Module) -> None:
        self.lookup = lookup

    def __call__(self, row_ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The lookup of ``row_ids``, without gradient, on ``like``'s device."""
        device = getattr(self.lookup, "device", None)
        with torch.no_grad():
            out = self.lookup(row_ids if device is None else row_ids.to(device))
        return out.detach().to(like.device)


@dataclass
class TowerInputs:
    """What the tower's parts read, for B target samples: ``dense`` [B, D] (the dense arch's
    output), ``sparse`` [B, F, D] (the target's sparse embeddings, spec order), ``pooled`` (the
    EBC's KeyedTensor, item-history features included), ``history`` (R histories: one per
    sample, or with ``groups`` the one each sample reads), ``target_codes`` [B, T, M], the
    tower's frozen ``codebooks`` [T, M, V, d0] and ``item_history``: the item branch's own
    histories when they come from another store than ``history`` (None: ``history``)."""

    dense: torch.Tensor
    sparse: torch.Tensor
    pooled: KeyedTensor
    history: Optional[HistoryBatch] = None
    target_codes: Optional[torch.Tensor] = None
    codebooks: Optional[torch.Tensor] = None
    groups: Optional[QueryGroups] = None
    item_history: Optional[HistoryBatch] = None

    def shared_history(self) -> HistoryBatch:
        """The R histories, which a part reading them cannot do without."""
        if self.history is None:
            raise ValueError("the model's history parts read histories: the batch needs its "
                             "history")
        return self.history

    def per_sample(self, hist: HistoryBatch) -> HistoryBatch:
        """``hist`` of the R histories (or any part of them, e.g. their last k steps) as each
        sample's [B, ...] (a copy per sample when histories are shared)."""
        if self.groups is None:
            return hist
        return HistoryBatch(*(self.groups.expand(t) for t in hist.tensors()))


class ItemHistoryArch(nn.Module):
    """The hand-crafted item-id history as feature tokens: DIN, BST (one token) or a mean pool
    (two: items and labels) over the item embeddings of the last k history steps (the
    ``hist_item_*`` features of the item table), the target's item embedding as query, label and
    gap as side information.

    Args:
        encoder: :class:`DINAttention`, :class:`BSTEncoder` or :class:`MeanPoolHistory`,
            ``(target item [B, D], items [B, k, D], label, gap_bucket, mask [B, k]) ->
            [B, D]`` or ``[B, encoder.num_tokens, D]``.
        item_index: the item field's position among the sparse features.
        history_len: k.
        gap_pad: the gap bucket of padding steps.

    Example::

        arch = ItemHistoryArch(BSTEncoder(16, BSTConfig()), item_index=0, history_len=50,
                               gap_pad=9)
        tokens = arch(inputs)                   # [B, 1, 16]
    """

    def __init__(self, encoder: nn.Module, item_index: int, history_len: int,
                 gap_pad: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_tokens: int = encoder.num_tokens
        self.item_index, self.history_len, self.gap_pad = item_index, history_len, gap_pad
        self.feature_names = history_item_features(history_len)

    def forward(self, x: TowerInputs) -> torch.Tensor:
        hist = x.item_history if x.item_history is not None else x.shared_history()
        recent = x.per_sample(last_steps(hist, self.history_len, self.gap_pad))
        items = keyed_columns(x.pooled, self.feature_names, self.encoder.embed_dim)
        out = self.encoder(x.sparse[:, self.item_index], items, recent.label,
                           recent.gap_bucket, recent.mask)
        return out.view(out.shape[0], self.num_tokens, out.shape[-1])


class IATHistoryArch(nn.Module):
    """The IAT branch as one feature token: the frozen instance tokens of the history steps,
    queried by ``[dense embedding; F sparse embeddings]`` of the target.

    Args:
        branch: :class:`IATBranch` with ``query_dim = (1 + F) * D``.
        lookup: the token lookup, row ids [B, L] -> [B, L, d].
        item_history: read the item branch's own histories (``TowerInputs.item_history``, rows
            of the lookup's store) instead of the shared ``history``.

    Example::

        arch = IATHistoryArch(IATBranch(64, (1 + F) * 16, 16, IATBranchConfig()),
                              FrozenLookup(token_lookup))
        tokens = arch(inputs)                   # [B, 1, 16]
    """

    num_tokens = 1

    def __init__(self, branch: IATBranch, lookup: FrozenLookup,
                 item_history: bool = False) -> None:
        super().__init__()
        self.branch, self.lookup, self.item_history = branch, lookup, item_history

    def forward(self, x: TowerInputs) -> torch.Tensor:
        if self.item_history and x.item_history is None:
            raise ValueError("this IAT branch reads the item store's histories: give "
                             "item_history")
        hist = x.item_history if self.item_history else x.shared_history()
        tokens = self.lookup(hist.row_ids, x.dense)
        query = torch.cat([x.dense, x.sparse.flatten(1)], dim=1)
        return self.branch(tokens, hist.label, hist.gap_bucket, hist.mask, query,
                           x.groups).unsqueeze(1)


class TokenRows(nn.Module):
    """SIF-Mixer history rows from IAT tokens: ``inputs -> [R, L, T, d0]`` (R histories).

    Args:
        projection: :class:`IATHistoryProjection`, tokens [B, L, d] -> [B, L, T, d0].
        lookup: the token lookup, row ids [B, L] -> [B, L, d].
    """

    def __init__(self, projection: IATHistoryProjection, lookup: FrozenLookup) -> None:
        super().__init__()
        self.projection, self.lookup = projection, lookup

    def forward(self, x: TowerInputs) -> torch.Tensor:
        tokens = self.lookup(x.shared_history().row_ids, x.dense)
        return self.projection(tokens.to(x.dense.dtype))


class CodeRows(nn.Module):
    """SIF-Mixer history rows from HGAQ codes: the codebook sums ``[B, L, T, d0]`` of the steps'
    codes with the tower's codebooks (no parameters).

    Args:
        lookup: the code lookup, row ids [B, L] -> codes [B, L, T, M].
    """

    def __init__(self, lookup: FrozenLookup) -> None:
        super().__init__()
        self.lookup = lookup

    def forward(self, x: TowerInputs) -> torch.Tensor:
        codes = self.lookup(x.shared_history().row_ids, x.dense)
        return codebook_sum(codes, x.codebooks).to(x.dense.dtype)


class ConcatInteraction(nn.Module):
    """No interaction: the dense embedding and every feature token side by side, for the over
    arch to model (the peer library's DNN, an MLP over all embeddings). ``forward(dense [B, D],
    sparse [B, F, D]) -> [B, (F + 1) D]``, with the call of TorchRec's ``InteractionArch``.

    Example::

        inter = FeatureInteraction(ConcatInteraction(), output_dim=(F + 1) * D)
    """

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor
                ) -> torch.Tensor:
        return torch.cat([dense_features, sparse_features.flatten(1)], dim=1)


class FeatureInteraction(nn.Module):
    """A DLRM interaction arch as the tower's interaction: ``(inputs, features [B, F', D]) ->
    (arch(dense, features) [B, output_dim], zero alignment loss [B])``.

    Args:
        arch: TorchRec's ``InteractionArch`` or ``InteractionDCNArch``, or
            :class:`SIFMixerInteractionArch`.
        output_dim: the width of its output (default ``arch.output_dim``).

    Example::

        inter = FeatureInteraction(InteractionArch(F), output_dim=D + choose(F, 2) + F)
    """

    def __init__(self, arch: nn.Module, output_dim: Optional[int] = None) -> None:
        super().__init__()
        self.arch = arch
        self.output_dim: int = arch.output_dim if output_dim is None else output_dim

    def forward(self, x: TowerInputs, features: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.arch(x.dense, features), x.dense.new_zeros(x.dense.shape[0])


class SIFMixerHistoryArch(nn.Module):
    """The full SIF-Mixer (form b) as the tower's interaction: the target row (T slots of
    ``[dense embedding; the slot's feature embeddings]``, mapped by W_res) and the history rows
    (the sum of the row parts), plus the per-row L_align against the codebook sums of
    ``target_codes`` when the tower has codebooks.

    Args:
        mixer: :class:`SIFMixer` with ``target_dim = (1 + width) * D``.
        slot_index: [T, width] long, the feature positions of each slot (F: a zero column).
        rows: parts ``inputs -> [R, L, T, d0]`` (:class:`TokenRows`, :class:`CodeRows`).

    Example::

        inter = SIFMixerHistoryArch(SIFMixer(T, SIFMixerConfig(), target_dim=(1 + w) * D),
                                    slot_index, [CodeRows(FrozenLookup(code_lookup))])
        out, align = inter(inputs, sparse)     # [B, d0], [B]
    """

    def __init__(self, mixer: SIFMixer, slot_index: torch.Tensor,
                 rows: Sequence[nn.Module]) -> None:
        super().__init__()
        self.register_buffer("slot_index", slot_index, persistent=False)
        self.mixer = mixer
        self.rows = nn.ModuleList(rows)
        self.output_dim = mixer.output_dim

    def target_slots(self, dense: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The target row before W_res: [B, T, (1 + width) * D], slot t = [dense embedding;
        embeddings of slot t's features (zero-padded)]."""
        b, _, d = features.shape
        t = self.slot_index.shape[0]
        padded = torch.cat([features, features.new_zeros(b, 1, d)], dim=1)
        grouped = padded[:, self.slot_index].reshape(b, t, -1)
        return torch.cat([dense.unsqueeze(1).expand(b, t, d), grouped], dim=-1)

    def forward(self, x: TowerInputs, features: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        hist = x.shared_history()
        target = self.target_slots(x.dense, features)
        rows = functools.reduce(operator.add, [part(x) for part in self.rows])
        out = self.mixer(target, rows, hist.mask, recency=hist.gap_bucket, side=hist.label,
                         groups=x.groups)
        align = x.dense.new_zeros(x.dense.shape[0])
        if x.codebooks is not None:
            if x.target_codes is not None:
                e = codebook_sum(x.target_codes.to(x.dense.device), x.codebooks)
                align = (self.mixer.align(target) - e.detach()).pow(2).mean((1, 2))
            elif self.training:
                raise ValueError("the model holds codebooks, so training takes L_align: "
                                 "the batch needs target_codes")
        return out, align


# --------------------------------------------------------------------------- the model
class DLRMSIFTower(nn.Module):
    """Everything of :class:`DLRM_SIF` after the embedding lookup, composed of injected parts
    (:func:`build_tower` builds them for a config): dense arch, history feature parts,
    interaction, over arch. Holds no sharded module (a leaf for the pipeline's tracer).

    Args:
        sparse_names: the sparse features the parts read, in spec order (F).
        embedding_dim: D.
        dense_arch: dense features [B, num_dense] -> [B, D].
        history_archs: parts :class:`TowerInputs` -> ``num_tokens`` more feature tokens
            [B, num_tokens, D] each.
        inter_arch: ``(inputs, features [B, F + H, D]) -> (out [B, n], per-row alignment
            loss [B])``, H the history archs' tokens in all.
        over_arch: [B, n] -> logits [B, num_labels].
        codebooks: frozen HGAQ codebooks [T, M, V, d0] (a buffer, handed to the parts).

    Example::

        tower = build_tower(spec, DLRMSIFConfig(history_source="bst", item_feature="movie"))
        logits, align = tower(dense_features, pooled, history)
    """

    def __init__(self, sparse_names: Sequence[str], embedding_dim: int, dense_arch: nn.Module,
                 history_archs: Sequence[nn.Module], inter_arch: nn.Module,
                 over_arch: nn.Module, codebooks: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.sparse_names: List[str] = list(sparse_names)
        self.embedding_dim = embedding_dim
        self.register_buffer("codebooks", codebooks)
        self.dense_arch = dense_arch
        self.history_archs = nn.ModuleList(history_archs)
        self.inter_arch = inter_arch
        self.over_arch = over_arch

    def forward(self, dense_features: torch.Tensor, pooled: KeyedTensor,
                history: Optional[HistoryBatch] = None,
                target_codes: Optional[torch.Tensor] = None,
                history_groups: Optional[torch.Tensor] = None,
                item_history: Optional[HistoryBatch] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            dense_features: [B, num_dense] float.
            pooled: the EBC's pooled embeddings (any key order).
            history: histories (sources other than none): one per sample, or R shared ones.
            target_codes: [B, T, M] the targets' HGAQ codes (L_align; needed in training when
                the tower holds codebooks).
            history_groups: [B] int64 nondecreasing, the history each sample reads (None:
                sample b reads history b). A request's candidates share its history: its
                lookups run once, and the history of an IAT branch or SIF-Mixer blind to the
                target is encoded once.
            item_history: the item branch's histories when they come from another store than
                ``history`` (the target domain's own, beside another domain's IAT tokens), laid
                out like ``history``; None: the item branch reads ``history``.

        Returns:
            logits [B, num_labels] and the per-row alignment loss [B] (zeros without codebooks).
        """
        dense = self.dense_arch(dense_features)
        groups = None
        if history_groups is not None and history is not None:
            groups = QueryGroups.of(history_groups.to(dense.device), history.row_ids.shape[0])
        x = TowerInputs(dense, keyed_columns(pooled, self.sparse_names, self.embedding_dim),
                        pooled, history, target_codes, self.codebooks, groups, item_history)
        features = torch.cat([x.sparse, *(arch(x) for arch in self.history_archs)], dim=1)
        out, align = self.inter_arch(x, features)
        return self.over_arch(out), align


def build_tower(spec: FeatureSpec, config: DLRMSIFConfig, *,
                token_lookup: Optional[nn.Module] = None,
                item_token_lookup: Optional[nn.Module] = None,
                code_lookup: Optional[nn.Module] = None,
                codebooks: Optional[torch.Tensor] = None, token_dim: Optional[int] = None,
                gap_vocab_size: int = DEFAULT_GAP_VOCAB,
                fields_per_subtoken: int = DEFAULT_FIELDS_PER_SUBTOKEN,
                device: Optional[torch.device] = None) -> DLRMSIFTower:
    """The tower of ``config``'s variant (:data:`~iat_torchrec.models.variants.VARIANTS`): the
    one place that turns a variant into parts. Arguments as :class:`DLRM_SIF`'s."""
    v, src, d = config.variant, config.history_source.value, config.embedding_dim
    sparse_names = list(spec.sparse_names)
    num_sparse = len(sparse_names)
    if gap_vocab_size <= 0 or fields_per_subtoken <= 0:
        raise ValueError("gap_vocab_size and fields_per_subtoken must be > 0")
    if v.uses_tokens and token_lookup is None:
        raise ValueError(f"history source {src} reads IAT tokens: give a token lookup")
    if v.uses_codes and (codebooks is None or code_lookup is None):
        raise ValueError(f"history source {src} reads HGAQ codes: give the HGAQ codebooks and "
                         "a code lookup")
    if codebooks is not None and not v.is_sif:
        raise ValueError(f"codebooks are only used by the SIF sources, not {src}")
    if v.is_sif and config.mixer.recency_buckets < gap_vocab_size:
        raise ValueError(f"mixer.recency_buckets ({config.mixer.recency_buckets}) must cover "
                         f"gap_vocab_size ({gap_vocab_size})")
    if config.item_store_iat and item_token_lookup is None:
        raise ValueError("item_store_iat reads the item store's IAT tokens: give an item token "
                         "lookup")
    if v.uses_tokens and token_dim is None:
        token_dim = int(getattr(token_lookup, "dim"))
    item_encoders: Dict[str, Callable[[], nn.Module]] = {
        "mean": lambda: MeanPoolHistory(d, LABEL_VOCAB_SIZE, device=device),
        "din": lambda: DINAttention(d, config.din, LABEL_VOCAB_SIZE, gap_vocab_size,
                                    device=device),
        "bst": lambda: BSTEncoder(d, config.bst, LABEL_VOCAB_SIZE, gap_vocab_size,
                                  device=device),
    }

    dense_arch = DenseArch(len(spec.dense), [*config.dense_arch_layers, d], device=device)
    history_archs: List[nn.Module] = []
    if config.item_branch != "none":
        history_archs.append(ItemHistoryArch(
            item_encoders[config.item_branch](), sparse_names.index(config.item_feature),
            config.item_history_len, gap_vocab_size - 1))

    def iat_arch(lookup: nn.Module, dim: int, item_history: bool = False) -> IATHistoryArch:
        return IATHistoryArch(IATBranch(dim, (1 + num_sparse) * d, d, config.iat,
                                        LABEL_VOCAB_SIZE, gap_vocab_size, device=device),
                              FrozenLookup(lookup), item_history)

    if v.iat_branch:
        history_archs.append(iat_arch(token_lookup, token_dim))
    if config.item_store_iat:
        history_archs.append(iat_arch(item_token_lookup, int(getattr(item_token_lookup, "dim")),
                                      item_history=True))
    if codebooks is not None:
        codebooks = codebooks.detach().clone().to(device=device, dtype=torch.float32)
    inter_arch: nn.Module
    if v.is_sif:
        layout = subtoken_layout(spec, fields_per_subtoken)
        t, d0 = len(layout), config.mixer.d0
        if codebooks is not None and (codebooks.dim() != 4 or codebooks.shape[0] != t
                                      or codebooks.shape[3] != d0):
            raise ValueError(f"codebooks must be [T={t}, M, V, d0={d0}] (T from the spec with "
                             f"fields_per_subtoken={fields_per_subtoken}), "
                             f"got {tuple(codebooks.shape)}")
        position = {name: i for i, name in enumerate(sparse_names)}
        slots = [[position[f] for f in s.fields if f in position] for s in layout]
        width = max(len(s) for s in slots)
        slot_index = torch.tensor([s + [num_sparse] * (width - len(s)) for s in slots],
                                  dtype=torch.long, device=device).view(t, width)
        mixer = SIFMixer(t, config.mixer, target_dim=(1 + width) * d, device=device)
        row_parts: Dict[str, Callable[[], nn.Module]] = {
            "tokens": lambda: TokenRows(IATHistoryProjection(token_dim, t, d0, device=device),
                                        FrozenLookup(token_lookup)),
            "codes": lambda: CodeRows(FrozenLookup(code_lookup)),
        }
        inter_arch = SIFMixerHistoryArch(mixer, slot_index,
                                         [row_parts[kind]() for kind in v.sif_rows])
    else:
        n = num_sparse + sum(arch.num_tokens for arch in history_archs)
        interactions: Dict[str, Callable[[], FeatureInteraction]] = {
            "dot": lambda: FeatureInteraction(InteractionArch(n), d + choose(n, 2) + n),
            # As DLRM_DCN builds it; LowRankCrossNet takes no device argument.
            "dcn": lambda: FeatureInteraction(InteractionDCNArch(n, LowRankCrossNet(
                (n + 1) * d, config.dcn_layers, config.dcn_low_rank).to(device)), (n + 1) * d),
            "concat": lambda: FeatureInteraction(ConcatInteraction(), (n + 1) * d),
            "mixer": lambda: FeatureInteraction(
                SIFMixerInteractionArch(d, [d] * n, config.mixer, device=device)),
        }
        inter_arch = interactions[config.interaction]()
    over_arch = with_dropout(OverArch(inter_arch.output_dim,
                                      [*config.over_arch_layers, len(spec.labels)],
                                      device=device), config.over_arch_dropout)
    return DLRMSIFTower(sparse_names, d, dense_arch, history_archs, inter_arch, over_arch,
                        codebooks)


def with_dropout(over_arch: OverArch, p: float) -> OverArch:
    """TorchRec's ``OverArch`` with dropout ``p`` after each hidden layer (an MLP of Perceptrons,
    then the logit layer); ``p`` 0 returns it unchanged. The parameters and their names stay
    TorchRec's for ``p`` 0; for ``p`` > 0 each hidden layer becomes ``[Perceptron, Dropout]``.

    Example::

        arch = with_dropout(OverArch(32, [64, 1]), 0.1)   # [B, 32] -> [B, 1]
    """
    if p > 0:
        mlp = over_arch.model[0]._mlp
        for i, perceptron in enumerate(mlp):
            mlp[i] = nn.Sequential(perceptron, nn.Dropout(p))
    return over_arch


class DLRM_SIF(nn.Module):
    """DLRM with a history source and the SIF-Mixer (or TorchRec's dot or DCNv2) as
    interaction: the sparse arch (one EBC) and the tower of :func:`build_tower`.

    Args:
        spec: the feature spec (sparse fields get D-wide tables; labels give the logits).
        config: sizes and history source.
        token_lookup: frozen IAT token lookup, row ids [B, L] -> [B, L, d]
            (:class:`~iat_torchrec.tokens.lookup.InstanceTokenLookup` or the sharded one).
        item_token_lookup: frozen IAT token lookup of the item history's own store (with
            ``config.item_store_iat``: a second IAT branch over ``item_history``).
        code_lookup: frozen code lookup, row ids [B, L] -> [B, L, T, M]
            (:class:`~iat_torchrec.tokens.lookup.SampleCodeLookup`).
        codebooks: the tokenizer's frozen codebooks [T, M, V, d0]
            (``tokenizer.quantizer.codebooks``; needed with codes, optional for ``sif_iat``).
        token_dim: token width when the lookup has no ``dim`` attribute.
        gap_vocab_size: gap-bucket ids, padding included (the history shards'
            ``HistoryLayout.gap_vocab_size``).
        fields_per_subtoken: B of the SIF store's tokenizer, which groups the target's fields
            into its T slots (SIF sources).
        device: where the dense parameters live.
        table_device: where the EBC is built (default ``device``; ``meta`` for DMP).

    Example::

        model = DLRM_SIF(spec, DLRMSIFConfig(history_source="iat", item_feature="movie"),
                         token_lookup=InstanceTokenLookup(store), table_device="meta",
                         gap_vocab_size=shards.layout.gap_vocab_size)
        logits = model(batch.dense_features, batch.sparse_features, batch.history)  # [B, labels]
        train = DLRM_SIFTrain(model)          # for TrainPipelineSparseDist
    """

    def __init__(self, spec: FeatureSpec, config: DLRMSIFConfig, *,
                 token_lookup: Optional[nn.Module] = None,
                 item_token_lookup: Optional[nn.Module] = None,
                 code_lookup: Optional[nn.Module] = None,
                 codebooks: Optional[torch.Tensor] = None, token_dim: Optional[int] = None,
                 gap_vocab_size: int = DEFAULT_GAP_VOCAB,
                 fields_per_subtoken: int = DEFAULT_FIELDS_PER_SUBTOKEN,
                 device: Optional[Union[str, torch.device]] = None,
                 table_device: Optional[Union[str, torch.device]] = None) -> None:
        super().__init__()
        if not spec.sparse:
            raise ValueError("DLRM_SIF needs at least one sparse field")
        self.spec, self.config = spec, config
        device = torch.device(device) if device is not None else None
        table_device = torch.device(table_device) if table_device is not None else device
        self.sparse_arch = SparseArch(EmbeddingBagCollection(
            tables=embedding_tables(spec, config), device=table_device))
        self.tower = build_tower(spec, config, token_lookup=token_lookup,
                                 item_token_lookup=item_token_lookup, code_lookup=code_lookup,
                                 codebooks=codebooks, token_dim=token_dim,
                                 gap_vocab_size=gap_vocab_size,
                                 fields_per_subtoken=fields_per_subtoken, device=device)

    def forward_with_alignment(self, dense_features: torch.Tensor,
                               sparse_features: KeyedJaggedTensor,
                               history: Optional[HistoryBatch] = None,
                               target_codes: Optional[torch.Tensor] = None,
                               history_groups: Optional[torch.Tensor] = None,
                               item_history: Optional[HistoryBatch] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, num_labels] and the per-row alignment loss [B]
        (:meth:`DLRMSIFTower.forward`)."""
        pooled = self.sparse_arch.embedding_bag_collection(sparse_features)
        out = self.tower(dense_features, pooled, history, target_codes, history_groups,
                         item_history)
        return out[0], out[1]

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor,
                history: Optional[HistoryBatch] = None,
                target_codes: Optional[torch.Tensor] = None,
                history_groups: Optional[torch.Tensor] = None,
                item_history: Optional[HistoryBatch] = None) -> torch.Tensor:
        """Logits [B, num_labels] (TorchRec DLRM's contract, plus the history inputs; with
        ``history_groups`` [B], sample b reads history ``history_groups[b]``)."""
        return self.forward_with_alignment(dense_features, sparse_features, history,
                                           target_codes, history_groups, item_history)[0]


class DLRM_SIFTrain(nn.Module):
    """Wraps :class:`DLRM_SIF` for TorchRec's train pipelines, like ``DLRMTrain``:
    ``forward(batch) -> (loss, (loss, logits, labels))`` (detached outputs). The loss is the
    row-weighted mean of (BCE over labels + ``alignment_weight`` * L_align); weight-0 rows
    (padding) count for nothing."""

    def __init__(self, model: DLRM_SIF) -> None:
        super().__init__()
        self.model = model
        self.alignment_weight = float(model.config.mixer.alignment_weight)

    def forward(self, batch: DownstreamBatch
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits, align = self.model.forward_with_alignment(
            batch.dense_features, batch.sparse_features, batch.history, batch.target_codes,
            item_history=batch.item_history)
        labels = batch.labels
        per_row = F.binary_cross_entropy_with_logits(
            logits, labels.to(logits.dtype), reduction="none").mean(1)
        per_row = per_row + self.alignment_weight * align
        loss = (per_row * batch.weight).sum() / batch.weight.sum().clamp_min(1.0)
        return loss, (loss.detach(), logits.detach(), labels.detach())


__all__: Sequence[str] = (
    "DEFAULT_FIELDS_PER_SUBTOKEN", "DLRMSIFConfig", "embedding_tables", "codebook_sum",
    "FrozenLookup", "TowerInputs", "ItemHistoryArch", "IATHistoryArch", "TokenRows", "CodeRows",
    "FeatureInteraction", "SIFMixerHistoryArch", "DLRMSIFTower", "build_tower", "with_dropout",
    "DLRM_SIF", "DLRM_SIFTrain",
)
