"""HGAQ, the SIF sample tokenizer (stage 1b): each instance becomes a T x M grid of small codes.

Shape (METHOD.md, "Stage 1b"):

- **Fields**: every sparse field is pooled by an ``EmbeddingBagCollection`` (one table per field,
  ``field_dim`` = 8 wide, injected so that DistributedModelParallel can shard it); every dense
  field is embedded by its own linear map ``x -> x w_f + b_f`` to ``field_dim``.
- **Group-adaptive sub-tokens** (:func:`subtoken_layout`): the fields of each feature group of the
  spec (user, item, context, cross) are cut into K_g = ceil(|F_g| / B) consecutive slices,
  T = sum K_g. Each sub-token is a linear projection of its slice's field embeddings to d0.
- **Hierarchical quantisation** (:class:`ResidualVectorQuantizer`): M levels of residual vector
  quantisation with V codes each and one codebook per (sub-token slot, level), stored as one
  tensor [T, M, V, d0]; straight-through gradients, commitment loss, EMA codebook updates, restart
  of dead codes, optional entropy term. The reconstruction is the sum of the M chosen codewords.
- **Training signal**: an auxiliary CTR head on the quantised sample (BCE) plus the VQ loss.

Decisions where METHOD.md is silent:

- Slices within a group are balanced (sizes differ by at most one field, each <= B), so the
  padded per-slot projection wastes as little as possible; groups come in the enum's order
  (user, item, context, cross) and fields in spec order, sparse before dense.
- Multi-valued sparse fields are mean-pooled (their size does not depend on the list length),
  single-valued ones sum-pooled (the same thing).
- Codebooks are initialised from the first training batch's residuals (per slot and level).
- A code is *dead* when its EMA assignment count falls below ``dead_code_threshold`` times the
  uniform share (EMA batch size / V). It is restarted at a random residual of the current batch
  for its (slot, level) and given the uniform share as its count, a grace period before it can
  be declared dead again.
- The commitment loss is the mean over levels of ``||r_m - sg(q_m)||^2`` (r_m the residual that
  level m quantises); the entropy term (off by default) is, per level, the mean per-sample
  entropy of the soft assignment minus the entropy of the batch-mean assignment.
- Under ``torch.distributed`` the EMA statistics are summed over ranks and codebook
  initialisation and restarts are taken from rank 0, so every rank holds the same codebooks
  (DistributedModelParallel does not broadcast buffers).
- The aux head predicts every label of the spec (one logit each), BCE averaged over labels.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from iat_torchrec.data.spec import FeatureGroup, FeatureSpec
from iat_torchrec.models.quantizer import ResidualVectorQuantizer, RVQOutput, weighted_mean


@dataclasses.dataclass
class HGAQConfig:
    """Sizes and training knobs of the sample tokenizer (paper defaults)."""

    fields_per_subtoken: int = dataclasses.field(
        default=32, metadata={"help": "B: at most this many fields per sub-token"})
    field_dim: int = dataclasses.field(default=8, metadata={"help": "field embedding size"})
    d0: int = dataclasses.field(default=16, metadata={"help": "sub-token / codeword size"})
    levels: int = dataclasses.field(default=3, metadata={"help": "M: residual VQ levels"})
    codebook_size: int = dataclasses.field(
        default=256, metadata={"help": "V: codes per level (<= 256 keeps codes uint8)"})
    commitment: float = dataclasses.field(default=0.25, metadata={"help": "commitment weight"})
    ema_decay: float = dataclasses.field(default=0.99, metadata={"help": "codebook EMA decay"})
    ema_epsilon: float = dataclasses.field(
        default=1e-5, metadata={"help": "Laplace smoothing of the EMA counts"})
    dead_code_threshold: float = dataclasses.field(default=0.03, metadata={
        "help": "restart a code whose EMA count falls below this fraction of the uniform share "
                "(0 disables restarts)"})
    entropy_weight: float = dataclasses.field(
        default=0.0, metadata={"help": "weight of the code-usage entropy term (0: off)"})
    entropy_temperature: float = dataclasses.field(
        default=1.0, metadata={"help": "temperature of the soft assignment of the entropy term"})
    aux_layers: List[int] = dataclasses.field(
        default_factory=lambda: [64, 32], metadata={"help": "hidden sizes of the aux CTR head"})

    def __post_init__(self) -> None:
        for name in ("fields_per_subtoken", "field_dim", "d0", "levels", "codebook_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HGAQConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.field_dim % 4:
            raise ValueError(f"HGAQConfig.field_dim must be a multiple of 4 (FBGEMM), "
                             f"got {self.field_dim}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"HGAQConfig.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.dead_code_threshold < 0 or self.entropy_weight < 0 or self.commitment < 0:
            raise ValueError("HGAQConfig: weights and thresholds must be >= 0")
        if self.entropy_temperature <= 0:
            raise ValueError("HGAQConfig.entropy_temperature must be > 0")


def code_dtype(codebook_size: int) -> torch.dtype:
    """The smallest integer dtype that holds codes in ``[0, codebook_size)``."""
    if codebook_size <= 256:
        return torch.uint8
    if codebook_size <= 2 ** 15:
        return torch.int16
    return torch.int32


# --------------------------------------------------------------------------- field grouping
@dataclasses.dataclass(frozen=True)
class SubToken:
    """One sub-token slot: the ``index``-th slice of the fields of ``group``."""

    group: FeatureGroup
    index: int
    fields: Tuple[str, ...]


def subtoken_layout(spec: FeatureSpec, fields_per_subtoken: int) -> List[SubToken]:
    """The sub-token slots of a spec: group g (in the enum's order) gets
    K_g = ceil(|F_g| / B) consecutive, balanced slices of its fields (spec order, sparse first)."""
    if fields_per_subtoken <= 0:
        raise ValueError(f"fields_per_subtoken must be > 0, got {fields_per_subtoken}")
    by_group = spec.fields_by_group()
    layout: List[SubToken] = []
    for group in FeatureGroup:
        names = by_group.get(group, [])
        if not names:
            continue
        k = -(-len(names) // fields_per_subtoken)
        base, extra = divmod(len(names), k)
        start = 0
        for i in range(k):
            size = base + (1 if i < extra else 0)
            layout.append(SubToken(group, i, tuple(names[start:start + size])))
            start += size
    return layout


def tokenizer_tables(spec: FeatureSpec, field_dim: int) -> List[EmbeddingBagConfig]:
    """One table per sparse field, ``field_dim`` wide, named ``t_<field>``; multi-valued fields
    mean-pooled, single-valued ones sum-pooled."""
    return [EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=field_dim,
                               num_embeddings=f.num_embeddings, feature_names=[f.name],
                               pooling=PoolingType.MEAN if f.multi_valued else PoolingType.SUM)
            for f in spec.sparse]


def tokenizer_embedding_bag_collection(spec: FeatureSpec, field_dim: int,
                                       device: Optional[torch.device] = None
                                       ) -> EmbeddingBagCollection:
    """The tokenizer's :func:`tokenizer_tables` as an EBC on ``device`` (``meta`` for DMP)."""
    return EmbeddingBagCollection(tables=tokenizer_tables(spec, field_dim), device=device)


def keyed_columns(pooled: KeyedTensor, names: Sequence[str], width: int) -> torch.Tensor:
    """The embeddings of ``names`` (in that order) from a KeyedTensor as [B, len(names), width],
    each zero-padded to ``width`` (the keys may come in any order, e.g. from a sharded EBC)."""
    values = pooled.values()
    keys, lengths = tuple(pooled.keys()), tuple(pooled.length_per_key())
    names = tuple(names)
    if keys == names and all(n == width for n in lengths):
        return values.reshape(values.shape[0], len(names), width)
    index = _column_index(keys, lengths, names, width).to(values.device, non_blocking=True)
    padded = torch.cat([values, values.new_zeros(values.shape[0], 1)], dim=1)
    return padded[:, index].view(values.shape[0], len(names), width)


@functools.lru_cache(maxsize=64)
def _column_index(keys: Tuple[str, ...], lengths: Tuple[int, ...], names: Tuple[str, ...],
                  width: int) -> torch.Tensor:
    """Columns of each name's embedding in a KeyedTensor's values, padded with the index of an
    extra zero column."""
    offsets = dict(zip(keys, itertools.accumulate((0,) + lengths)))
    size = dict(zip(keys, lengths))
    pad = sum(lengths)
    index = []
    for name in names:
        if name not in size:
            raise KeyError(f"no embedding for feature {name!r} (have {list(keys)})")
        if size[name] > width:
            raise ValueError(f"feature {name!r} is {size[name]} wide, more than {width}")
        index += [offsets[name] + j for j in range(size[name])] + [pad] * (width - size[name])
    return torch.tensor(index, dtype=torch.int64)


# --------------------------------------------------------------------------- the tokenizer
@dataclasses.dataclass
class HGAQOutput:
    """What :class:`SampleTokenizer` returns for a batch."""

    z: torch.Tensor  # [B, T, d0]: continuous sub-tokens
    quantized: torch.Tensor  # [B, T, d0]: straight-through quantised sub-tokens
    codes: torch.Tensor  # [B, T, M] int64
    logits: torch.Tensor  # [B, num_labels]: aux CTR head
    vq: RVQOutput

    @property
    def reconstruction(self) -> torch.Tensor:
        """e [B, T, d0]: the sum of the chosen codewords (no gradient)."""
        return self.vq.reconstruction


class SampleTokenizer(nn.Module):
    """The HGAQ sample tokenizer: field embeddings -> T sub-tokens -> residual VQ codes.

    Args:
        spec: the feature spec (its groups define the sub-tokens).
        config: sizes and training knobs.
        embedding_bag_collection: pools the sparse fields, one ``field_dim`` wide table per field
            (see :func:`tokenizer_embedding_bag_collection`); DistributedModelParallel may shard it.
        device: where the dense parameters and codebooks live.

    Example::

        spec = FeatureSpec.load("outputs/data/syn")
        config = HGAQConfig()
        tokenizer = SampleTokenizer(spec, config,
                                    tokenizer_embedding_bag_collection(spec, config.field_dim))
        out = tokenizer(batch.dense_features, batch.sparse_features)
        loss, parts = tokenizer.loss(out, batch.labels)
        codes = tokenizer.tokenize(batch.dense_features, batch.sparse_features)  # [B, T, M] uint8
    """

    def __init__(self, spec: FeatureSpec, config: HGAQConfig,
                 embedding_bag_collection: EmbeddingBagCollection,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.spec, self.config = spec, config
        self.embedding_bag_collection = embedding_bag_collection
        self._check_tables(embedding_bag_collection)
        self.layout: List[SubToken] = subtoken_layout(spec, config.fields_per_subtoken)
        self.num_tokens: int = len(self.layout)
        self.field_names: List[str] = [*spec.sparse_names, *spec.dense_names]
        position = {name: i for i, name in enumerate(self.field_names)}
        width = max(len(s.fields) for s in self.layout)
        pad = len(self.field_names)  # index of an all-zero field
        index = [[position[f] for f in s.fields] + [pad] * (width - len(s.fields))
                 for s in self.layout]
        self.register_buffer("_field_index", torch.tensor(index, device=device),
                             persistent=False)
        self.slot_width: int = width  # fields per slot after padding
        fd, d0, t = config.field_dim, config.d0, self.num_tokens
        num_dense = len(spec.dense)
        self.dense_weight = nn.Parameter(torch.empty(num_dense, fd, device=device))
        self.dense_bias = nn.Parameter(torch.empty(num_dense, fd, device=device))
        self.projection_weight = nn.Parameter(torch.empty(t, width * fd, d0, device=device))
        self.projection_bias = nn.Parameter(torch.empty(t, d0, device=device))
        self.quantizer = ResidualVectorQuantizer(
            t, config.levels, config.codebook_size, d0, commitment=config.commitment,
            decay=config.ema_decay, epsilon=config.ema_epsilon,
            dead_code_threshold=config.dead_code_threshold,
            entropy_weight=config.entropy_weight,
            entropy_temperature=config.entropy_temperature, device=device)
        num_labels = len(spec.labels)
        if config.aux_layers:
            self.aux_head: nn.Module = nn.Sequential(
                MLP(t * d0, list(config.aux_layers), device=device),
                nn.Linear(config.aux_layers[-1], num_labels, device=device))
        else:
            self.aux_head = nn.Linear(t * d0, num_labels, device=device)
        self.reset_parameters()

    def _check_tables(self, ebc: EmbeddingBagCollection) -> None:
        dims = {name: c.embedding_dim for c in ebc.embedding_bag_configs()
                for name in c.feature_names}
        for name in self.spec.sparse_names:
            if name not in dims:
                raise ValueError(f"the embedding bag collection has no table for field {name!r}")
            if dims[name] != self.config.field_dim:
                raise ValueError(f"field {name!r}: table width {dims[name]} != field_dim "
                                 f"{self.config.field_dim}")

    def reset_parameters(self) -> None:
        """Dense maps like ``nn.Linear(1, field_dim)``; projections like ``nn.Linear`` over the
        padded slot."""
        if self.dense_weight.device.type == "meta":
            return
        with torch.no_grad():
            nn.init.uniform_(self.dense_weight, -1.0, 1.0)
            nn.init.uniform_(self.dense_bias, -1.0, 1.0)
            bound = 1.0 / math.sqrt(self.projection_weight.shape[1])
            nn.init.uniform_(self.projection_weight, -bound, bound)
            nn.init.uniform_(self.projection_bias, -bound, bound)

    # ------------------------------------------------------------------ the pieces
    def field_embeddings(self, dense_features: torch.Tensor,
                         pooled: Optional[KeyedTensor]) -> torch.Tensor:
        """Every field's embedding [B, F, field_dim], sparse fields (spec order) then dense."""
        parts = []
        if self.spec.sparse:
            parts.append(keyed_columns(pooled, self.spec.sparse_names, self.config.field_dim))
        if self.spec.dense:
            parts.append(dense_features.unsqueeze(-1) * self.dense_weight + self.dense_bias)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def group_fields(self, fields: torch.Tensor) -> torch.Tensor:
        """Field embeddings [B, F, fd] -> per-slot inputs [B, T, slot_width * fd] (zero-padded)."""
        b, _, fd = fields.shape
        padded = torch.cat([fields, fields.new_zeros(b, 1, fd)], dim=1)
        return padded[:, self._field_index].reshape(b, self.num_tokens, -1)

    def project(self, grouped: torch.Tensor) -> torch.Tensor:
        """Per-slot inputs [B, T, K] -> sub-tokens z [B, T, d0]."""
        return torch.einsum("btk,tkd->btd", grouped, self.projection_weight) + self.projection_bias

    def subtokens(self, dense_features: torch.Tensor,
                  sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """The continuous sub-tokens z [B, T, d0] of a batch."""
        pooled = self.embedding_bag_collection(sparse_features) if self.spec.sparse else None
        return self.subtokens_from_pooled(dense_features, pooled)

    def subtokens_from_pooled(self, dense_features: torch.Tensor,
                              pooled: Optional[KeyedTensor]) -> torch.Tensor:
        """Sub-tokens z [B, T, d0] from already pooled sparse embeddings."""
        return self.project(self.group_fields(self.field_embeddings(dense_features, pooled)))

    # ------------------------------------------------------------------ forward / loss / export
    def forward(self, dense_features: torch.Tensor,
                sparse_features: KeyedJaggedTensor) -> HGAQOutput:
        """Sub-tokens, their codes and the aux head's logits; in training mode the codebooks
        learn (EMA, restarts)."""
        pooled = self.embedding_bag_collection(sparse_features) if self.spec.sparse else None
        return self.forward_pooled(dense_features, pooled)

    def forward_pooled(self, dense_features: torch.Tensor, pooled: Optional[KeyedTensor],
                       weight: Optional[torch.Tensor] = None) -> HGAQOutput:
        """:meth:`forward` from pooled embeddings; ``weight`` [B] as in the quantizer."""
        z = self.subtokens_from_pooled(dense_features, pooled)
        vq = self.quantizer(z, weight)
        logits = self.aux_head(vq.quantized.flatten(1))
        return HGAQOutput(z=z, quantized=vq.quantized, codes=vq.codes, logits=logits, vq=vq)

    def loss(self, output: HGAQOutput, labels: torch.Tensor,
             weight: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """BCE of the aux head (all labels) + VQ loss, and the parts (detached)."""
        labels = labels.view_as(output.logits).to(output.logits.dtype)
        bce = weighted_mean(F.binary_cross_entropy_with_logits(
            output.logits, labels, reduction="none").mean(1), weight)
        total = bce + output.vq.loss
        return total, {"bce": bce.detach(), "commitment": output.vq.commitment_loss.detach(),
                       "entropy": output.vq.entropy_loss.detach()}

    @torch.no_grad()
    def tokenize(self, dense_features: torch.Tensor,
                 sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Codes [B, T, M] in :func:`code_dtype` (uint8 for V <= 256); changes no state."""
        z = self.subtokens(dense_features, sparse_features)
        return self.quantizer.encode(z).to(code_dtype(self.config.codebook_size))

    def codes_to_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook sums [..., T, d0] of codes [..., T, M] (e.g. [B, L, T, M] histories)."""
        return self.quantizer.decode(codes)


class _TokenizerObjective(nn.Module):
    """Everything after the embedding lookup, as one module without the sharded tables, so
    TorchRec's pipeline tracer treats it as a leaf. It reaches the tokenizer's parameters
    through a plain (unregistered) reference: they are owned by :class:`SampleTokenizerTrain`."""

    def __init__(self, tokenizer: SampleTokenizer) -> None:
        super().__init__()
        object.__setattr__(self, "tokenizer", tokenizer)

    def forward(self, dense: torch.Tensor, pooled: Optional[KeyedTensor], labels: torch.Tensor,
                weight: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        out = self.tokenizer.forward_pooled(dense, pooled, weight)
        loss, _ = self.tokenizer.loss(out, labels, weight)
        return loss, (loss.detach(), out.logits.detach(), labels.detach())


class SampleTokenizerTrain(nn.Module):
    """Wraps :class:`SampleTokenizer` for TorchRec's train pipelines, like ``DLRMTrain``:
    ``forward(batch) -> (loss, (loss, logits, labels))`` (detached outputs). The tables are
    called on ``batch.sparse_features`` directly so ``TrainPipelineSparseDist`` can pipeline
    them; a ``batch.weight`` (if the batch has one) weighs rows, 0 for padding rows."""

    def __init__(self, tokenizer: SampleTokenizer) -> None:
        super().__init__()
        self.model = tokenizer
        self.objective = _TokenizerObjective(tokenizer)

    def forward(self, batch: Batch
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        pooled = (self.model.embedding_bag_collection(batch.sparse_features)
                  if self.model.spec.sparse else None)
        return self.objective(batch.dense_features, pooled, batch.labels,
                              getattr(batch, "weight", None))


__all__: Sequence[str] = (
    "HGAQConfig", "SubToken", "subtoken_layout", "tokenizer_tables", "keyed_columns",
    "tokenizer_embedding_bag_collection", "code_dtype", "HGAQOutput", "SampleTokenizer",
    "SampleTokenizerTrain",
)
