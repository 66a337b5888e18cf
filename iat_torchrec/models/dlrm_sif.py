"""The downstream model (METHOD.md, "Stage 3"): ``DLRM_SIF``, composed like
``torchrec.models.dlrm.DLRM`` (sparse arch, dense arch, interaction, over arch), with the
SIF-Mixer as the interaction and a history source chosen by config.

History sources (:class:`HistorySource`):

======================  =====================================================================
``none``                no history; with ``interaction="dot"`` exactly TorchRec's DLRM (the
                        reference), with ``"mixer"`` the SIF-Mixer over [dense; F sparse]
``din`` / ``bst``       a hand-crafted item-id history: DIN target attention or a BST
                        Transformer over the last ``item_history_len`` items, label (and gap)
                        as side information; one token enters the interaction
``iat``                 the IAT branch (frozen token lookup, adaptation, side information,
                        feature-queried Transformer; one token into the interaction) **plus**
                        the hand-crafted branch ``iat_item_branch`` (default ``bst``), since the
                        paper keeps it and adds IAT: compare ``iat`` against ``bst``
``sif_codes``           SIF-Mixer (form b) with history rows = codebook sums of HGAQ codes
``sif_iat``             SIF-Mixer with history rows = IAT tokens mapped to T x d0
``sif_both``            SIF-Mixer with history rows = the sum of both encodings of each step
======================  =====================================================================

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
  :meth:`DownstreamBatch.build` (or :func:`add_history_items`) appends them on the data side.
- The item history is the last k real steps of the batch's history (:func:`last_steps`), so one
  HistoryBatch serves a long token history and a short item history at once.
- The IAT query is a linear projection of ``[dense embedding; F sparse embeddings]``.
- Every branch token is D wide and enters the interaction as one more sparse feature (before the
  interaction, as the paper found best), for either interaction.
- SIF target row (form b): the T slots are HGAQ's (:func:`~iat_torchrec.models.hgaq.
  subtoken_layout` with the tokenizer's ``fields_per_subtoken``); slot t's input is DLRM's dense
  embedding followed by the pooled embeddings of the slot's sparse fields (zero-padded to the
  widest slot); the mixer's per-slot W_res maps it to d0. Dense fields reach every slot through
  the dense embedding. The OverArch reads the mixer's output only.
- SIF history rows: gap bucket as the mixer's recency id, matured label as its side id. The codes
  of history steps come from an injected code lookup (:class:`SampleCodeLookup`: row ids ->
  codes, like the token lookup), so ``sif_both`` reads one HistoryBatch for both stores (build
  the code lookup in the token store's row order with ``rows_like``).
- ``L_align`` (weight ``mixer.alignment_weight``) is taken whenever codebooks are given (e from
  ``batch.target_codes``); it is per row, so padding rows (weight 0) leave no trace. L_VQ belongs
  to the frozen tokenizer and is not part of this loss.
- The injected token and code lookups are frozen and held outside the module tree: no
  parameters, no state_dict entries, no DDP buffer broadcasts, no ``.to()`` (they are built on
  their device), and the tracer keeps the tower a leaf even if the lookup is sharded. They run
  under ``torch.no_grad``. The codebooks are a (persistent) buffer of the tower.
- DLRM's dense arch is kept with no dense fields (a learned constant token), like TorchRec's.
- Tables are sum-pooled, multi-valued fields mean-pooled (as the tokenizer's).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, fields
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch, SparseArch, choose
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from iat_torchrec.data.batch import InstanceBatch
from iat_torchrec.data.spec import FeatureSpec
from iat_torchrec.models.hgaq import keyed_columns, subtoken_layout
from iat_torchrec.models.history import (BSTConfig, BSTEncoder, DINAttention, DINConfig,
                                         IATBranch, IATBranchConfig, last_steps,
                                         last_steps_index)
from iat_torchrec.models.mixer import (IATHistoryProjection, SIFMixer, SIFMixerConfig,
                                       SIFMixerInteractionArch)
from iat_torchrec.tokens.assembly import LABEL_VOCAB_SIZE, HistoryBatch, HistoryLayout
from iat_torchrec.tokens.store import TokenStore

HIST_ITEM_PREFIX = "hist_item_"
INTERACTIONS = ("mixer", "dot")
ITEM_BRANCHES = ("none", "din", "bst")


class HistorySource(str, enum.Enum):
    """Where the downstream model's history comes from (see the module docstring)."""

    NONE = "none"
    DIN = "din"
    BST = "bst"
    IAT = "iat"
    SIF_CODES = "sif_codes"
    SIF_IAT = "sif_iat"
    SIF_BOTH = "sif_both"

    @property
    def is_sif(self) -> bool:
        return self in (HistorySource.SIF_CODES, HistorySource.SIF_IAT, HistorySource.SIF_BOTH)

    @property
    def uses_tokens(self) -> bool:
        """Reads IAT tokens (needs a token lookup)."""
        return self in (HistorySource.IAT, HistorySource.SIF_IAT, HistorySource.SIF_BOTH)

    @property
    def uses_codes(self) -> bool:
        """Reads HGAQ codes of history steps (needs codebooks and a code lookup)."""
        return self in (HistorySource.SIF_CODES, HistorySource.SIF_BOTH)


@dataclass
class DLRMSIFConfig:
    """Sizes and history source of the downstream model."""

    history_source: HistorySource = dataclasses.field(default=HistorySource.NONE, metadata={
        "help": "none | din | bst | iat | sif_codes | sif_iat | sif_both"})
    interaction: str = dataclasses.field(default="mixer", metadata={
        "help": "mixer (SIF-Mixer) | dot (TorchRec DLRM's); SIF sources need mixer"})
    embedding_dim: int = dataclasses.field(default=16, metadata={
        "help": "D: width of every embedding table, the dense embedding and branch tokens"})
    dense_arch_layers: List[int] = dataclasses.field(default_factory=lambda: [64], metadata={
        "help": "hidden sizes of the dense arch (a final layer of D is appended)"})
    over_arch_layers: List[int] = dataclasses.field(default_factory=lambda: [64, 32], metadata={
        "help": "hidden sizes of the over arch (a final layer of one logit per label is "
                "appended)"})
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
        "help": "hand-crafted branch kept beside the IAT branch: bst | din | none"})
    gap_vocab_size: int = dataclasses.field(default=HistoryLayout().gap_vocab_size, metadata={
        "help": "gap-bucket ids, padding included (HistoryLayout.gap_vocab_size)"})
    fields_per_subtoken: int = dataclasses.field(default=32, metadata={
        "help": "SIF: B of the tokenizer, to group the target's fields into its T slots"})

    def __post_init__(self) -> None:
        self.history_source = HistorySource(self.history_source)
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, "
                             f"got {self.interaction!r}")
        if self.history_source.is_sif and self.interaction != "mixer":
            raise ValueError(f"history source {self.history_source.value} puts history rows "
                             "into the SIF-Mixer: it needs interaction='mixer'")
        if self.iat_item_branch not in ITEM_BRANCHES:
            raise ValueError(f"iat_item_branch must be one of {ITEM_BRANCHES}, "
                             f"got {self.iat_item_branch!r}")
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4 (FBGEMM), "
                             f"got {self.embedding_dim}")
        if not self.over_arch_layers or any(n <= 0 for n in
                                            [*self.over_arch_layers, *self.dense_arch_layers]):
            raise ValueError("over_arch_layers needs at least one hidden size; sizes must be > 0")
        if self.gap_vocab_size <= 0 or self.fields_per_subtoken <= 0:
            raise ValueError("gap_vocab_size and fields_per_subtoken must be > 0")
        if self.item_branch != "none":
            if not self.item_feature:
                raise ValueError(f"history source {self.history_source.value} with item branch "
                                 f"{self.item_branch} needs item_feature")
            if self.item_history_len <= 0:
                raise ValueError("item_history_len must be > 0")
        if self.history_source.is_sif:
            if self.mixer.recency_buckets < self.gap_vocab_size:
                raise ValueError(f"mixer.recency_buckets ({self.mixer.recency_buckets}) must "
                                 f"cover gap_vocab_size ({self.gap_vocab_size})")
            if self.mixer.side_values < LABEL_VOCAB_SIZE:
                raise ValueError(f"mixer.side_values ({self.mixer.side_values}) must cover "
                                 f"the {LABEL_VOCAB_SIZE} label side-information values")

    @property
    def item_branch(self) -> str:
        """The hand-crafted item-id branch in use: none | din | bst."""
        src = self.history_source
        if src in (HistorySource.DIN, HistorySource.BST):
            return src.value
        return self.iat_item_branch if src == HistorySource.IAT else "none"

    @property
    def gap_pad(self) -> int:
        return self.gap_vocab_size - 1


# --------------------------------------------------------------------------- tables and inputs
def history_item_features(k: int) -> List[str]:
    """Names of the k per-step item-history features: ``hist_item_0 .. hist_item_{k-1}``."""
    return [f"{HIST_ITEM_PREFIX}{j}" for j in range(k)]


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


def add_history_items(sparse: KeyedJaggedTensor, item_ids: torch.Tensor) -> KeyedJaggedTensor:
    """``sparse`` plus the k item-history features of ``item_ids`` [B, k] (table ids, -1 =
    padding -> an empty bag)."""
    if sparse.weights_or_none() is not None:
        raise ValueError("weighted KJTs are not supported with item histories")
    b, k = item_ids.shape
    if sparse.stride() != b:
        raise ValueError(f"item_ids has {b} rows, the KJT a batch of {sparse.stride()}")
    real = (item_ids >= 0).t()  # [k, B], key-major like the KJT
    values = item_ids.t()[real].to(sparse.values().dtype)
    return KeyedJaggedTensor(
        keys=[*sparse.keys(), *history_item_features(k)],
        values=torch.cat([sparse.values(), values]),
        lengths=torch.cat([sparse.lengths(), real.reshape(-1).to(sparse.lengths().dtype)]))


def codebook_sum(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Codebook sums [..., T, d0] of codes [..., T, M] with codebooks [T, M, V, d0]."""
    t, m, v, d0 = codebooks.shape
    if codes.shape[-2:] != (t, m):
        raise ValueError(f"codes must end in [T={t}, M={m}], got {tuple(codes.shape)}")
    offsets = (torch.arange(t * m, device=codes.device) * v).view(t, m)
    flat = (codes.long() + offsets).reshape(-1, m)
    out = F.embedding_bag(flat, codebooks.reshape(-1, d0), mode="sum")
    return out.view(*codes.shape[:-1], d0)


class SampleCodeLookup(nn.Module):
    """Frozen HGAQ codes of a SIF store on a device: ``forward(row_ids [..., L]) -> codes
    [..., L, T, M]`` int64 (-1 = padding -> codes 0, which the mixer masks).

    Args:
        codes: uint8 [N, T, M], row r the codes of store row r.
        device: where they live.
    """

    def __init__(self, codes: Union[np.ndarray, torch.Tensor],
                 device: Union[str, torch.device] = "cpu") -> None:
        super().__init__()
        codes = torch.as_tensor(codes)
        if codes.dim() != 3:
            raise ValueError(f"codes must be [N, T, M], got {tuple(codes.shape)}")
        self.device = torch.device(device)
        self.num_rows = int(codes.shape[0])
        self.register_buffer("codes", codes.to(self.device), persistent=False)

    @classmethod
    def from_store(cls, store: TokenStore, device: Union[str, torch.device] = "cpu",
                   rows_like: Optional[TokenStore] = None) -> "SampleCodeLookup":
        """The codes of a SIF ``store``; with ``rows_like`` (e.g. the IAT store whose row ids the
        histories hold), row r holds the codes of ``rows_like``'s row r (matched by instance id;
        every instance of ``rows_like`` must be in ``store``)."""
        if store.kind != "sif":
            raise ValueError(f"{store.path}: a code lookup needs a SIF store, got {store.kind!r}")
        if rows_like is None:
            rows = np.arange(store.num_rows, dtype=np.int64)
        else:
            rows = store.rows_of(rows_like.column("instance_id"))
        return cls(store.tokens(rows), device)

    @torch.no_grad()
    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        ids = row_ids.to(self.device)
        out = self.codes.index_select(0, ids.clamp(min=0).reshape(-1)).long()
        out = out.view(*ids.shape, *self.codes.shape[1:])
        return torch.where((ids >= 0).view(*ids.shape, 1, 1), out, 0)


# --------------------------------------------------------------------------- the batch
@dataclass
class DownstreamBatch(InstanceBatch):
    """An :class:`InstanceBatch` plus what the history sources read.

    - ``history``: the target samples' histories (row ids of the token store the lookups serve,
      mask, matured label, gap bucket).
    - ``history_items``: [B, k] item ids of the item-history steps (the last k steps of
      ``history``, -1 = padding). The model reads their embeddings from ``sparse_features``,
      which carries the same ids as the features ``hist_item_0 .. hist_item_{k-1}``
      (:meth:`build` adds both).
    - ``target_codes``: [B, T, M] the target samples' own HGAQ codes (for L_align).
    """

    history: Optional[HistoryBatch] = None
    history_items: Optional[torch.Tensor] = None
    target_codes: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, batch: InstanceBatch, history: Optional[HistoryBatch] = None,
              step_items: Optional[torch.Tensor] = None, item_history_len: int = 0,
              target_codes: Optional[torch.Tensor] = None) -> "DownstreamBatch":
        """A downstream batch from an instance batch. ``step_items`` [B, L]: the item id of every
        step of ``history`` (table ids, anything at padding); with ``item_history_len`` k > 0
        the last k steps' items go into ``history_items`` and ``sparse_features``."""
        sparse, items = batch.sparse_features, None
        if item_history_len > 0:
            if history is None or step_items is None:
                raise ValueError("an item history needs history and step_items")
            if step_items.shape != history.mask.shape:
                raise ValueError(f"step_items {tuple(step_items.shape)} must match the history "
                                 f"{tuple(history.mask.shape)}")
            index, valid = last_steps_index(history.mask, item_history_len)
            items = torch.where(valid, torch.gather(step_items.long(), 1, index), -1)
            sparse = add_history_items(sparse, items)
        base = {f.name: getattr(batch, f.name) for f in fields(InstanceBatch)}
        base["sparse_features"] = sparse
        return cls(**base, history=history, history_items=items, target_codes=target_codes)

    def _map(self, fn: Callable[[Any], Any]) -> "DownstreamBatch":
        return DownstreamBatch(**{f.name: None if getattr(self, f.name) is None
                                  else fn(getattr(self, f.name)) for f in fields(self)})

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value.record_stream(stream)


# --------------------------------------------------------------------------- the model
def _hide(module: nn.Module, name: str, value: Optional[nn.Module]) -> None:
    """Keep ``value`` as an attribute outside the module tree (see the module docstring)."""
    object.__setattr__(module, name, value)


class DLRMSIFTower(nn.Module):
    """Everything of :class:`DLRM_SIF` after the embedding lookup: dense arch, history branches,
    interaction, over arch. Holds no sharded module (a leaf for the pipeline's tracer).

    Args:
        spec: the feature spec.
        config: the model config.
        token_dim: IAT token width (sources reading tokens).
        codebooks: frozen HGAQ codebooks [T, M, V, d0] (sif_codes / sif_both; optional for
            sif_iat, where they add L_align).
        device: where the parameters live.
    """

    def __init__(self, spec: FeatureSpec, config: DLRMSIFConfig, token_dim: Optional[int] = None,
                 codebooks: Optional[torch.Tensor] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.spec, self.config = spec, config
        src = config.history_source
        d = config.embedding_dim
        self.sparse_names: List[str] = list(spec.sparse_names)
        num_sparse = len(self.sparse_names)
        self.dense_arch = DenseArch(len(spec.dense), [*config.dense_arch_layers, d],
                                    device=device)
        gaps = config.gap_vocab_size
        # Hand-crafted item-id branch.
        self.item_history_names = history_item_features(config.item_history_len)
        self.item_index = (self.sparse_names.index(config.item_feature)
                           if config.item_branch != "none" else -1)
        self.item_branch: Optional[nn.Module] = None
        if config.item_branch == "din":
            self.item_branch = DINAttention(d, config.din, LABEL_VOCAB_SIZE, gaps, device=device)
        elif config.item_branch == "bst":
            self.item_branch = BSTEncoder(d, config.bst, LABEL_VOCAB_SIZE, gaps, device=device)
        if src.uses_tokens and not token_dim:
            raise ValueError(f"history source {src.value} reads IAT tokens: give a token "
                             "lookup (or token_dim)")
        self.token_dim = token_dim
        # IAT branch: one token into the interaction.
        self.iat_branch = (IATBranch(token_dim, (1 + num_sparse) * d, d, config.iat,
                                     LABEL_VOCAB_SIZE, gaps, device=device)
                           if src == HistorySource.IAT else None)
        num_features = num_sparse + (self.item_branch is not None) + (self.iat_branch is not None)
        # Codebooks (frozen) for SIF history rows and L_align.
        if src.uses_codes and codebooks is None:
            raise ValueError(f"history source {src.value} needs the HGAQ codebooks")
        if codebooks is not None and not src.is_sif:
            raise ValueError(f"codebooks are only used by the SIF sources, not {src.value}")
        self.register_buffer("codebooks", None if codebooks is None else
                             codebooks.detach().clone().to(device=device, dtype=torch.float32))
        self.inter_arch: Optional[nn.Module] = None
        self.sif_mixer: Optional[SIFMixer] = None
        self.iat_rows: Optional[IATHistoryProjection] = None
        if src.is_sif:
            self._init_sif(spec, config, codebooks, device)
            over_in = self.sif_mixer.output_dim
        elif config.interaction == "dot":
            self.inter_arch = InteractionArch(num_features)
            over_in = d + choose(num_features, 2) + num_features
        else:
            self.inter_arch = SIFMixerInteractionArch(d, [d] * num_features, config.mixer,
                                                      device=device)
            over_in = self.inter_arch.output_dim
        self.over_arch = OverArch(over_in, [*config.over_arch_layers, len(spec.labels)],
                                  device=device)
        _hide(self, "token_lookup", None)
        _hide(self, "code_lookup", None)

    def _init_sif(self, spec: FeatureSpec, config: DLRMSIFConfig,
                  codebooks: Optional[torch.Tensor], device: Optional[torch.device]) -> None:
        layout = subtoken_layout(spec, config.fields_per_subtoken)
        t, d, d0 = len(layout), config.embedding_dim, config.mixer.d0
        if codebooks is not None and (codebooks.dim() != 4 or codebooks.shape[0] != t
                                      or codebooks.shape[3] != d0):
            raise ValueError(f"codebooks must be [T={t}, M, V, d0={d0}] (T from the spec with "
                             f"fields_per_subtoken={config.fields_per_subtoken}), "
                             f"got {tuple(codebooks.shape)}")
        position = {name: i for i, name in enumerate(self.sparse_names)}
        slots = [[position[f] for f in s.fields if f in position] for s in layout]
        width = max(len(s) for s in slots)
        pad = len(self.sparse_names)  # index of a zero column
        self.register_buffer("_slot_index", torch.tensor(
            [s + [pad] * (width - len(s)) for s in slots], dtype=torch.long, device=device)
            .view(t, width), persistent=False)
        self.num_tokens = t
        self.sif_mixer = SIFMixer(t, config.mixer, target_dim=(1 + width) * d, device=device)
        if config.history_source.uses_tokens:
            self.iat_rows = IATHistoryProjection(self.token_dim, t, d0, device=device)

    # ------------------------------------------------------------------ injected lookups
    def set_lookups(self, token_lookup: Optional[nn.Module],
                    code_lookup: Optional[nn.Module]) -> None:
        """Inject the frozen token lookup (row ids -> [.., L, d]) and code lookup (row ids ->
        [.., L, T, M])."""
        src = self.config.history_source
        if src.uses_tokens and token_lookup is None:
            raise ValueError(f"history source {src.value} needs a token lookup")
        if src.uses_codes and code_lookup is None:
            raise ValueError(f"history source {src.value} needs a code lookup")
        _hide(self, "token_lookup", token_lookup)
        _hide(self, "code_lookup", code_lookup)

    @staticmethod
    def _lookup(lookup: nn.Module, row_ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        device = getattr(lookup, "device", None)
        with torch.no_grad():
            out = lookup(row_ids if device is None else row_ids.to(device))
        return out.detach().to(like.device)

    # ------------------------------------------------------------------ forward
    def target_slots(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """SIF target row before W_res: [B, T, (1 + width) * D], slot t = [dense embedding;
        embeddings of slot t's sparse fields (zero-padded)]."""
        b, _, d = sparse.shape
        padded = torch.cat([sparse, sparse.new_zeros(b, 1, d)], dim=1)
        grouped = padded[:, self._slot_index].reshape(b, self.num_tokens, -1)
        return torch.cat([dense.unsqueeze(1).expand(b, self.num_tokens, d), grouped], dim=-1)

    def _history(self, history: Optional[HistoryBatch]) -> HistoryBatch:
        if history is None:
            raise ValueError(f"history source {self.config.history_source.value} needs the "
                             "batch's history")
        return history

    def forward(self, dense_features: torch.Tensor, pooled: KeyedTensor,
                history: Optional[HistoryBatch] = None,
                target_codes: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            dense_features: [B, num_dense] float.
            pooled: the EBC's pooled embeddings (any key order).
            history: histories (sources other than none).
            target_codes: [B, T, M] the targets' HGAQ codes (L_align; needed in training when
                the tower holds codebooks).

        Returns:
            logits [B, num_labels] and the per-row alignment loss [B] (zeros without codebooks).
        """
        cfg, d = self.config, self.config.embedding_dim
        dense = self.dense_arch(dense_features)
        sparse = keyed_columns(pooled, self.sparse_names, d)
        b = dense.shape[0]
        extra: List[torch.Tensor] = []
        if self.item_branch is not None:
            recent = last_steps(self._history(history), cfg.item_history_len, cfg.gap_pad)
            items = keyed_columns(pooled, self.item_history_names, d)
            extra.append(self.item_branch(sparse[:, self.item_index], items, recent.label,
                                          recent.gap_bucket, recent.mask))
        if self.iat_branch is not None:
            hist = self._history(history)
            tokens = self._lookup(self.token_lookup, hist.row_ids, dense)
            query = torch.cat([dense, sparse.flatten(1)], dim=1)
            extra.append(self.iat_branch(tokens, hist.label, hist.gap_bucket, hist.mask, query))
        align = dense.new_zeros(b)
        if self.sif_mixer is None:
            features = torch.cat([sparse, *(e.unsqueeze(1) for e in extra)], dim=1)
            inter = self.inter_arch(dense, features)
        else:
            hist = self._history(history)
            target = self.target_slots(dense, sparse)
            rows: Optional[torch.Tensor] = None
            if self.iat_rows is not None:
                rows = self.iat_rows(self._lookup(self.token_lookup, hist.row_ids, dense)
                                     .to(dense.dtype))
            if cfg.history_source.uses_codes:
                codes = self._lookup(self.code_lookup, hist.row_ids, dense)
                decoded = codebook_sum(codes, self.codebooks).to(dense.dtype)
                rows = decoded if rows is None else rows + decoded
            inter = self.sif_mixer(target, rows, hist.mask, recency=hist.gap_bucket,
                                   side=hist.label)
            if self.codebooks is not None:
                if target_codes is not None:
                    e = codebook_sum(target_codes.to(dense.device), self.codebooks)
                    align = (self.sif_mixer.align(target) - e.detach()).pow(2).mean((1, 2))
                elif self.training:
                    raise ValueError("the model holds codebooks, so training takes L_align: "
                                     "the batch needs target_codes")
        return self.over_arch(inter), align


class DLRM_SIF(nn.Module):
    """DLRM with the SIF-Mixer as interaction and a configurable history source.

    Args:
        spec: the feature spec (sparse fields get D-wide tables; labels give the logits).
        config: sizes and history source.
        token_lookup: frozen IAT token lookup, row ids [B, L] -> [B, L, d]
            (:class:`~iat_torchrec.tokens.lookup.InstanceTokenLookup` or the sharded one).
        code_lookup: frozen code lookup, row ids [B, L] -> [B, L, T, M]
            (:class:`SampleCodeLookup`).
        codebooks: the tokenizer's frozen codebooks [T, M, V, d0]
            (``tokenizer.quantizer.codebooks``).
        token_dim: token width when the lookup has no ``dim`` attribute.
        device: where the dense parameters live.
        table_device: where the EBC is built (default ``device``; ``meta`` for DMP).

    Example::

        model = DLRM_SIF(spec, DLRMSIFConfig(history_source="iat", item_feature="movie"),
                         token_lookup=InstanceTokenLookup(store), table_device="meta")
        logits = model(batch.dense_features, batch.sparse_features, batch.history)
        train = DLRM_SIFTrain(model)          # for TrainPipelineSparseDist
    """

    def __init__(self, spec: FeatureSpec, config: DLRMSIFConfig, *,
                 token_lookup: Optional[nn.Module] = None,
                 code_lookup: Optional[nn.Module] = None,
                 codebooks: Optional[torch.Tensor] = None, token_dim: Optional[int] = None,
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
        if token_dim is None and token_lookup is not None:
            token_dim = int(getattr(token_lookup, "dim"))
        self.tower = DLRMSIFTower(spec, config, token_dim, codebooks, device=device)
        self.tower.set_lookups(token_lookup, code_lookup)

    def forward_with_alignment(self, dense_features: torch.Tensor,
                               sparse_features: KeyedJaggedTensor,
                               history: Optional[HistoryBatch] = None,
                               target_codes: Optional[torch.Tensor] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, num_labels] and the per-row alignment loss [B]."""
        pooled = self.sparse_arch.embedding_bag_collection(sparse_features)
        out = self.tower(dense_features, pooled, history, target_codes)
        return out[0], out[1]

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor,
                history: Optional[HistoryBatch] = None,
                target_codes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, num_labels] (TorchRec DLRM's contract, plus the history inputs)."""
        return self.forward_with_alignment(dense_features, sparse_features, history,
                                           target_codes)[0]


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
            batch.dense_features, batch.sparse_features, batch.history, batch.target_codes)
        labels = batch.labels
        per_row = F.binary_cross_entropy_with_logits(
            logits, labels.to(logits.dtype), reduction="none").mean(1)
        per_row = per_row + self.alignment_weight * align
        loss = (per_row * batch.weight).sum() / batch.weight.sum().clamp_min(1.0)
        return loss, (loss.detach(), logits.detach(), labels.detach())


__all__: Sequence[str] = (
    "HIST_ITEM_PREFIX", "HistorySource", "DLRMSIFConfig", "history_item_features",
    "embedding_tables", "add_history_items", "codebook_sum", "SampleCodeLookup",
    "DownstreamBatch", "DLRMSIFTower", "DLRM_SIF", "DLRM_SIFTrain",
)
