"""The IAT source model (stage 1a): a full ranking model whose bottleneck is the instance token.

Shape, after ``torchrec.models.dlrm``: a sparse arch (an ``EmbeddingBagCollection`` over every
sparse field: the huge tables, sharded by TorchRec), a dense arch (MLP), a feature interaction
(TorchRec's low-rank DCN cross network over the concatenated dense output and pooled embeddings)
giving the wide vector ``h``; the bottleneck ``z = sigmoid(W h + b)`` (the token, ``d`` = 64 by
default); a decompress MLP and one logit per label.

Two training schemes (METHOD.md, "Stage 1a"):

- ``temporal``: each instance on its own, loss on ``head(decompress(z))``.
- ``user``: rows arrive grouped by user and time-sorted; a causal Source Instance Transformer
  (SIT) runs over each user's ``z`` sequence, with up to ``sit_context`` of the user's earlier
  tokens (from earlier batches, stop-gradient) in front; the loss is on the SIT outputs. The
  stored token is ``z`` from before the SIT (:meth:`SourceModelTrain.tokens`); the paper's
  ablation stores the SIT's outputs instead (:meth:`SourceModelTrain.sit_tokens`: rows read in
  user order, each user's earlier tokens streamed in as in training). With ``sit_labels``
  the SIT also reads the labels of the user's earlier instances, each only where it had
  matured by the query's time (``ts_j + label_delay <= ts_i``, ``ts_j < ts_i``; never the
  instance's own label): keeping the context that earlier outcomes depend on then pays off in
  the source loss.

``bottleneck=False`` gives the same model without the bottleneck (the base model the paper
compares against): ``h`` goes straight into the decompress MLP.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from iat_torchrec.data.batch import InstanceBatch
from iat_torchrec.data.spec import FeatureSpec
from iat_torchrec.models.sit import SourceInstanceTransformer, UserContextCache


class Scheme(str, enum.Enum):
    TEMPORAL = "temporal"
    USER = "user"


@dataclasses.dataclass
class SourceModelConfig:
    """Sizes of the source model."""

    token_dim: int = dataclasses.field(default=64, metadata={"help": "bottleneck size d"})
    bottleneck: bool = dataclasses.field(default=True, metadata={
        "help": "false: the same model without bottleneck (the base model)"})
    dense_arch_layers: List[int] = dataclasses.field(default_factory=lambda: [128, 64],
                                                     metadata={"help": "dense MLP sizes"})
    cross_layers: int = dataclasses.field(default=2, metadata={"help": "DCN cross layers"})
    cross_rank: int = dataclasses.field(default=64, metadata={"help": "low rank of the cross"})
    decompress_layers: List[int] = dataclasses.field(default_factory=lambda: [256, 128],
                                                     metadata={"help": "decompress MLP sizes"})
    sit_layers: int = dataclasses.field(default=2, metadata={"help": "SIT layers"})
    sit_heads: int = dataclasses.field(default=4, metadata={"help": "SIT attention heads"})
    sit_context: int = dataclasses.field(default=63, metadata={
        "help": "earlier tokens of the user (T-1) kept as stop-gradient SIT context"})
    sit_labels: bool = dataclasses.field(default=False, metadata={
        "help": "the SIT reads earlier instances' labels where matured by the query's time"})


def embedding_tables(spec: FeatureSpec) -> List[EmbeddingBagConfig]:
    """One sum-pooled table per sparse field, named ``t_<field>``."""
    return [EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=f.embedding_dim,
                               num_embeddings=f.num_embeddings, feature_names=[f.name],
                               pooling=PoolingType.SUM)
            for f in spec.sparse]


class InstanceTower(nn.Module):
    """Everything of the source model after the embedding lookup: dense arch, interaction,
    bottleneck, decompress MLP and label heads."""

    def __init__(self, spec: FeatureSpec, config: SourceModelConfig,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.config = config
        num_dense = len(spec.dense)
        self.dense_arch = (MLP(num_dense, config.dense_arch_layers, device=device)
                           if num_dense else None)
        width = sum(f.embedding_dim for f in spec.sparse) + (
            config.dense_arch_layers[-1] if num_dense else 0)
        self.interaction = LowRankCrossNet(width, config.cross_layers,
                                           min(config.cross_rank, width))
        self.bottleneck = (nn.Linear(width, config.token_dim, device=device)
                           if config.bottleneck else None)
        in_decompress = config.token_dim if config.bottleneck else width
        self.decompress = MLP(in_decompress, config.decompress_layers, device=device)
        self.heads = nn.Linear(config.decompress_layers[-1], len(spec.labels), device=device)
        self.wide_dim = width
        self.sparse_names = list(spec.sparse_names)

    def compress(self, pooled: KeyedTensor, dense: torch.Tensor) -> torch.Tensor:
        """The token z [B, d] (with ``bottleneck=False``: the wide vector h)."""
        # By name, in spec order: a sharded collection returns its keys grouped by shard.
        parts = KeyedTensor.regroup([pooled], [self.sparse_names])
        if self.dense_arch is not None:
            parts.insert(0, self.dense_arch(dense))
        h = self.interaction(torch.cat(parts, dim=1))
        return torch.sigmoid(self.bottleneck(h)) if self.bottleneck is not None else h

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Logits [..., num_labels] from tokens (or SIT outputs) [..., d]."""
        return self.heads(self.decompress(z))


def _segments(user_id: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Start and length of each run of equal consecutive user ids."""
    change = torch.ones_like(user_id, dtype=torch.bool)
    change[1:] = user_id[1:] != user_id[:-1]
    starts = torch.nonzero(change).flatten()
    lengths = torch.diff(torch.cat([starts, starts.new_tensor([user_id.numel()])]))
    return starts, lengths


class SourceObjective(nn.Module):
    """The loss of one batch under a scheme, given the pooled embeddings. Holds every dense
    module of the source model (so it stays a leaf for TorchRec's pipeline tracer)."""

    def __init__(self, tower: InstanceTower, scheme: Scheme,
                 sit: Optional[SourceInstanceTransformer] = None, label_delay: int = 0) -> None:
        super().__init__()
        self.tower = tower
        self.scheme = scheme
        self.sit = sit
        self.label_delay = label_delay
        # A window of w tokens over n layers reaches n * w tokens back: keep that many.
        self.cache = UserContextCache(sit.context * sit.num_layers if sit is not None else 0)
        if scheme == Scheme.USER and sit is None:
            raise ValueError("the user-order scheme needs a Source Instance Transformer")

    def forward(self, pooled: KeyedTensor, dense: torch.Tensor, labels: torch.Tensor,
                user_id: torch.Tensor, weight: torch.Tensor, ts: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        z = self.tower.compress(pooled, dense)
        if self.scheme == Scheme.TEMPORAL:
            logits = self.tower.predict(z)
        else:
            logits = self.tower.predict(self._sit_outputs(z, user_id, weight, labels, ts))
        per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
        loss = (per_row * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, (loss.detach(), logits.detach(), labels.detach())

    def _sit_outputs(self, z: torch.Tensor, user_id: torch.Tensor, weight: torch.Tensor,
                     labels: Optional[torch.Tensor] = None,
                     ts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SIT outputs [B, d] for rows grouped by user (time-sorted within each user); a SIT
        that reads labels needs the rows' ``labels`` [B, L] and ``ts`` [B]."""
        starts, lengths = _segments(user_id)
        n_users = starts.numel()
        users = user_id[starts].tolist()
        reads_labels = self.sit.label_embedding is not None
        if reads_labels and (labels is None or ts is None):
            raise ValueError("this SIT reads labels: give the rows' labels and ts")
        ctx, ctx_len = self.cache.context(users, z.shape[1], z.device)
        # Each user's row: its context tokens, then this batch's tokens, then padding. Padding
        # only ever follows real tokens, so every causal query sees at least one real key.
        width = int((ctx_len + lengths).max())
        c = min(ctx.shape[1], width)
        in_ctx = torch.arange(c, device=z.device) < ctx_len.unsqueeze(1)
        seg = torch.repeat_interleave(torch.arange(n_users, device=z.device), lengths)
        col = ctx_len[seg] + torch.arange(z.shape[0], device=z.device) - starts[seg]

        def rows(new: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            out = new.new_zeros(n_users, width, *new.shape[1:])
            out[:, :c][in_ctx] = context[:, :c][in_ctx].to(new.dtype)
            out[seg, col] = new
            return out

        side = {}
        if reads_labels:
            ctx_labels, ctx_ts = self.cache.side(users, labels.shape[1], z.device)
            side = dict(labels=rows(labels, ctx_labels), ts=rows(ts, ctx_ts),
                        label_delay=self.label_delay)
        out = self.sit(rows(z, ctx), **side)
        if bool(weight.gt(0).all()):  # a padding batch leaves no trace
            split = lengths.tolist()
            self.cache.update(users, list(torch.split(z.detach(), split)),
                              *((list(torch.split(labels, split)), list(torch.split(ts, split)))
                                if reads_labels else ()))
        return out[seg, col]


class SourceModelTrain(nn.Module):
    """``forward(batch) -> (loss, (loss, logits, labels))``, the shape TorchRec's
    ``TrainPipelineSparseDist`` drives. The sparse arch is called on ``batch.sparse_features``
    directly, so the pipeline can overlap its input distribution with compute."""

    def __init__(self, spec: FeatureSpec, config: SourceModelConfig, scheme: Scheme,
                 device: Optional[torch.device] = None,
                 table_device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.spec, self.config, self.scheme = spec, config, Scheme(scheme)
        self.sparse_arch = EmbeddingBagCollection(embedding_tables(spec),
                                                  device=table_device or device)
        tower = InstanceTower(spec, config, device=device)
        sit = None
        if self.scheme == Scheme.USER:
            dim = config.token_dim if config.bottleneck else tower.wide_dim
            sit = SourceInstanceTransformer(
                dim, config.sit_layers, config.sit_heads, config.sit_context,
                num_labels=len(spec.labels) if config.sit_labels else 0, device=device)
        self.objective = SourceObjective(tower, self.scheme, sit, spec.label_delay_s)

    def forward(self, batch: InstanceBatch
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        pooled = self.sparse_arch(batch.sparse_features)
        return self.objective(pooled, batch.dense_features, batch.labels, batch.user_id,
                              batch.weight, batch.ts)

    def tokens(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """The instance tokens z [B, d] (before any SIT)."""
        return self.objective.tower.compress(self.sparse_arch(sparse), dense)

    def sit_tokens(self, batch: InstanceBatch) -> torch.Tensor:
        """The SIT's outputs [B, d] for the rows of a user-order batch (rows grouped by user,
        time-sorted): each row's output over the user's earlier tokens (this batch's and,
        stop-gradient, earlier batches' from the context cache, which the batch then extends;
        a weight-0 batch leaves no trace), with matured earlier labels when the SIT reads
        labels. The same computation as the user-order loss's, so it sees nothing of a row's
        future and never the row's own label."""
        if self.objective.sit is None:
            raise ValueError("SIT outputs need the user-order scheme")
        z = self.tokens(batch.sparse_features, batch.dense_features)
        return self.objective._sit_outputs(z, batch.user_id, batch.weight, batch.labels,
                                           batch.ts)
