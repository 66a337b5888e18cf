"""Frozen lookups by store row: row ids [B, L] -> instance tokens [B, L, d] (FBGEMM or
TorchRec) or HGAQ codes.

- :class:`InstanceTokenLookup`: the whole store in one process, in FBGEMM's inference table
  (``IntNBitTableBatchedEmbeddingBagsCodegen``, ``PoolingMode.NONE``) with the store's rows copied
  in as they are stored (FP32, FP16, or INT8 rows with their fp16 scale and bias). CPU (host
  memory) or CUDA (device memory, or UVM with ``location="managed"`` / ``"managed_caching"`` for
  stores larger than the GPU).
- :class:`ShardedInstanceTokenLookup`: for stores larger than one process, a TorchRec
  ``EmbeddingCollection`` sharded row-wise or table-wise over a process group (FBGEMM's fused
  kernel; works on CPU with gloo and on CUDA with nccl). Each rank loads only its own shard from
  the store. Weights are FP32 or FP16 (an INT8 store is dequantised into them).

Row id -1 is padding and yields a zero token in both. Both are frozen: no parameters take
gradients, and no optimizer should be given them. :func:`make_token_lookup` picks one from a
:class:`LookupConfig`.

:class:`SampleCodeLookup` does the same for a SIF store's HGAQ codes: row ids [..., L] -> codes
[..., L, T, M] (-1 -> codes 0), a plain buffer on one device.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (BoundsCheckMode,
                                                                  EmbeddingLocation, PoolingMode)
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import \
    IntNBitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.sharding_plan import (construct_module_sharding_plan, row_wise,
                                                table_wise)
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_configs import DataType, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iat_torchrec.tokens.store import TokenStore, decode_tokens

TABLE = "iat_tokens"
SPARSE_TYPES = {"fp32": SparseType.FP32, "fp16": SparseType.FP16, "int8": SparseType.INT8}
LOCATIONS = {"device": EmbeddingLocation.DEVICE, "managed": EmbeddingLocation.MANAGED,
             "managed_caching": EmbeddingLocation.MANAGED_CACHING}
SHARDINGS = ("none", "row_wise", "table_wise")


class TokenLookupError(ValueError):
    """Bad row ids or an unsupported lookup configuration."""


def _check_store(store: TokenStore) -> None:
    if store.kind != "iat":
        raise TokenLookupError(f"{store.path}: token lookup serves IAT stores; this one holds "
                               f"{store.kind!r} codes")
    if store.num_rows == 0:
        raise TokenLookupError(f"{store.path}: the store is empty; nothing to look up")


def _out_of_range(row_ids: torch.Tensor, num_rows: int) -> Optional[int]:
    bad = (row_ids < -1) | (row_ids >= num_rows)
    if bool(bad.any()):
        return int(row_ids[bad][0])
    return None


class InstanceTokenLookup(nn.Module):
    """The whole store in FBGEMM's inference embedding table; ``forward(row_ids)`` with
    ``row_ids`` [..., L] int32/int64 (-1 = padding) returns float tokens [..., L, d].

    Built directly on ``device`` (FBGEMM keeps its weights outside the module's parameters, so
    ``.to()`` does not move them). Copies the store in chunks of ``chunk_rows`` rows.
    """

    def __init__(self, store: TokenStore, device: Union[str, torch.device] = "cpu", *,
                 location: Optional[str] = None, output_dtype: str = "fp32",
                 chunk_rows: int = 1 << 20) -> None:
        super().__init__()
        _check_store(store)
        self.device = torch.device(device)
        self.num_rows, self.dim, self.dtype = store.num_rows, store.token_shape[0], store.dtype
        if output_dtype not in ("fp32", "fp16"):
            raise TokenLookupError(f"output_dtype must be fp32 or fp16, got {output_dtype!r}")
        if self.device.type == "cpu":
            if location not in (None, "host"):
                raise TokenLookupError(f"on CPU the table lives in host memory; location "
                                       f"{location!r} needs CUDA")
            loc = EmbeddingLocation.HOST
        else:
            if location is not None and location not in LOCATIONS:
                raise TokenLookupError(f"location must be one of {sorted(LOCATIONS)}, got "
                                       f"{location!r}")
            loc = LOCATIONS[location or "device"]
        self.tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            [(TABLE, self.num_rows, self.dim, SPARSE_TYPES[self.dtype], loc)],
            pooling_mode=PoolingMode.NONE, device=self.device,
            output_dtype=SPARSE_TYPES[output_dtype],
            # On CPU the kernel checks ids itself (-1, padding, passes); on CUDA a failed
            # check would be a device assert, so ids are checked here instead (see forward).
            bounds_check_mode=(BoundsCheckMode.FATAL if self.device.type == "cpu"
                               else BoundsCheckMode.WARNING))
        self.tbe.initialize_weights()
        ((weights, _),) = self.tbe.split_embedding_weights(split_scale_shifts=False)
        row_bytes = store.row_bytes
        for start, raw in store.raw_row_chunks(chunk_rows):
            weights[start:start + raw.shape[0], :row_bytes].copy_(
                torch.from_numpy(np.ascontiguousarray(raw)))

    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        if row_ids.dtype not in (torch.int32, torch.int64):
            raise TokenLookupError(f"row ids must be int32 or int64, got {row_ids.dtype}")
        flat = row_ids.reshape(-1)
        if self.device.type != "cpu":
            bad = _out_of_range(flat, self.num_rows)
            if bad is not None:
                raise TokenLookupError(f"row id {bad} out of range [0, {self.num_rows}) "
                                       "(-1 is padding)")
        offsets = torch.arange(flat.numel() + 1, dtype=flat.dtype, device=flat.device)
        try:
            out = self.tbe(flat, offsets)
        except RuntimeError:
            bad = _out_of_range(flat, self.num_rows)
            if bad is None:
                raise
            raise TokenLookupError(f"row id {bad} out of range [0, {self.num_rows}) "
                                   "(-1 is padding)") from None
        return out.view(*row_ids.shape, self.dim)


class ShardedInstanceTokenLookup(nn.Module):
    """The store as a TorchRec ``EmbeddingCollection`` sharded over ``process_group``
    (default: the world), ``sharding_type`` "row_wise" or "table_wise" (whole table on rank 0).

    Every rank of the group must construct it and call ``forward`` together (it runs
    all-to-alls); batch sizes may differ between ranks. ``forward(row_ids)`` as
    :class:`InstanceTokenLookup`.
    """

    def __init__(self, store: TokenStore, device: Union[str, torch.device] = "cpu", *,
                 sharding_type: str = "row_wise", weights_dtype: Optional[str] = None,
                 output_dtype: str = "fp32", process_group: Optional[dist.ProcessGroup] = None,
                 chunk_rows: int = 1 << 20) -> None:
        super().__init__()
        _check_store(store)
        if not dist.is_initialized():
            raise TokenLookupError("ShardedInstanceTokenLookup needs an initialised "
                                   "torch.distributed process group")
        self.device = torch.device(device)
        self.num_rows, self.dim = store.num_rows, store.token_shape[0]
        weights_dtype = weights_dtype or ("fp16" if store.dtype == "int8" else store.dtype)
        if weights_dtype not in ("fp32", "fp16"):
            raise TokenLookupError(f"sharded weights are fp32 or fp16, got {weights_dtype!r}")
        if output_dtype not in ("fp32", "fp16"):
            raise TokenLookupError(f"output_dtype must be fp32 or fp16, got {output_dtype!r}")
        self.output_dtype = torch.float32 if output_dtype == "fp32" else torch.float16
        pg = process_group or dist.group.WORLD
        world = dist.get_world_size(pg)
        kernel = EmbeddingComputeKernel.FUSED.value
        if sharding_type == "row_wise":
            generator = row_wise(compute_kernel=kernel)
        elif sharding_type == "table_wise":
            generator = table_wise(rank=0, compute_kernel=kernel)
        else:
            raise TokenLookupError(f"sharding_type must be row_wise or table_wise, got "
                                   f"{sharding_type!r}")
        ec = EmbeddingCollection(tables=[EmbeddingConfig(
            name=TABLE, embedding_dim=self.dim, num_embeddings=self.num_rows,
            feature_names=[TABLE],
            data_type=DataType.FP32 if weights_dtype == "fp32" else DataType.FP16)],
            device=torch.device("meta"))
        sharder = EmbeddingCollectionSharder()
        plan = construct_module_sharding_plan(
            ec, per_param_sharding={TABLE: generator}, sharder=sharder,
            local_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)), world_size=world,
            device_type=self.device.type)
        # Frozen: forward runs under no_grad, so the fused kernel's optimizer never steps.
        self.ec = sharder.shard(ec, plan, ShardingEnv.from_process_group(pg), self.device)
        self._load(store, chunk_rows)

    @torch.no_grad()
    def _load(self, store: TokenStore, chunk_rows: int) -> None:
        for tensor in self.ec.state_dict().values():
            for shard in tensor.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                for lo in range(0, nr, chunk_rows):
                    hi = min(nr, lo + chunk_rows)
                    rows = np.arange(r0 + lo, r0 + hi, dtype=np.int64)
                    tokens = decode_tokens(store.tokens(rows), store.dtype)[:, c0:c0 + nc]
                    shard.tensor[lo:hi].copy_(torch.from_numpy(np.ascontiguousarray(tokens)))

    @torch.no_grad()
    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        if row_ids.dtype not in (torch.int32, torch.int64):
            raise TokenLookupError(f"row ids must be int32 or int64, got {row_ids.dtype}")
        bad = _out_of_range(row_ids, self.num_rows)
        if bad is not None:
            raise TokenLookupError(f"row id {bad} out of range [0, {self.num_rows}) "
                                   "(-1 is padding)")
        if row_ids.dim() == 0:
            raise TokenLookupError("row ids must have at least one dimension")
        ids2d = row_ids.reshape(-1, row_ids.shape[-1]).to(self.device)
        mask = ids2d >= 0
        kjt = KeyedJaggedTensor(keys=[TABLE], values=ids2d[mask].to(torch.int64),
                                lengths=mask.sum(dim=1).to(torch.int32))
        out = self.ec(kjt)
        out = out.wait() if hasattr(out, "wait") else out
        values = out[TABLE].values()
        result = torch.zeros(*ids2d.shape, self.dim, dtype=self.output_dtype, device=self.device)
        result[mask] = values.to(self.output_dtype)
        return result.view(*row_ids.shape, self.dim)


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


@dataclasses.dataclass
class LookupConfig:
    """Which token lookup to build."""

    sharding: str = dataclasses.field(default="none", metadata={
        "help": "none (whole store per process, FBGEMM) | row_wise | table_wise (TorchRec)"})
    location: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "unsharded on CUDA: device | managed | managed_caching (UVM for large stores)"})
    weights_dtype: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "sharded: fp32 | fp16 (default: the store's; fp16 for an int8 store)"})
    output_dtype: str = dataclasses.field(default="fp32", metadata={"help": "fp32 | fp16"})


def make_token_lookup(store: TokenStore, config: LookupConfig,
                      device: Union[str, torch.device] = "cpu",
                      process_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Build the lookup ``config`` asks for."""
    if config.sharding == "none":
        return InstanceTokenLookup(store, device, location=config.location,
                                   output_dtype=config.output_dtype)
    if config.sharding in SHARDINGS:
        return ShardedInstanceTokenLookup(store, device, sharding_type=config.sharding,
                                          weights_dtype=config.weights_dtype,
                                          output_dtype=config.output_dtype,
                                          process_group=process_group)
    raise TokenLookupError(f"sharding must be one of {SHARDINGS}, got {config.sharding!r}")
