"""Frozen lookups by store row: row ids [B, L] -> instance tokens [B, L, d] (FBGEMM) or HGAQ
codes [B, L, T, M], whole in one process or sharded by row range over a process group.

- :class:`InstanceTokenLookup`: the store (or one row range of it) in FBGEMM's inference table
  (``IntNBitTableBatchedEmbeddingBagsCodegen``, ``PoolingMode.NONE``) with the store's rows copied
  in as they are stored (FP32, FP16, or INT8 rows with their fp16 scale and bias); FBGEMM
  dequantises only the rows looked up. CPU (host memory) or CUDA (device memory, or UVM with
  ``location="managed"`` / ``"managed_caching"`` for stores larger than the GPU).
- :class:`ShardedInstanceTokenLookup`: for stores larger than one process. Rank r of the group
  holds one contiguous row range in its own :class:`InstanceTokenLookup` (rows kept as stored:
  an int8 store stays int8), and a lookup sends each row id to the rank holding it and the
  tokens back, by all-to-all (TorchRec's row-wise sequence sharding: bucketise, all-to-all ids,
  local lookup, all-to-all embeddings). CPU with gloo, CUDA with nccl. Each rank reads only its
  own range from the store. Not TorchRec's sharders: on this TorchRec (1.8) the training
  ``EmbeddingCollectionSharder`` cannot hold INT8 weights (its fused optimizer's ShardedTensor
  expects ``[rows, d]``, FBGEMM's int8 rows are ``[rows, d + 8]``), and the quantised
  ``QuantEmbeddingCollectionSharder`` is single-process inference sharding (every process
  builds every rank's shard and moves embeddings between devices, not between processes).
- :class:`SampleCodeLookup` / :class:`ShardedSampleCodeLookup`: the same for a SIF store's HGAQ
  codes, ``[..., L] -> [..., L, T, M]`` (-1 -> codes 0), uint8 rows in a plain buffer.

Row id -1 is padding and yields a zero token (codes 0). All are frozen: no parameters take
gradients, and no optimizer should be given them. :func:`make_token_lookup` and
:func:`make_code_lookup` pick one from a :class:`LookupConfig`. Every rank of a sharded
lookup's group must construct it and call ``forward`` together (batch sizes may differ).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (BoundsCheckMode,
                                                                  EmbeddingLocation, PoolingMode)
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import \
    IntNBitTableBatchedEmbeddingBagsCodegen
from torch import nn

from iat_torchrec.tokens.store import TokenStore

TABLE = "iat_tokens"
SPARSE_TYPES = {"fp32": SparseType.FP32, "fp16": SparseType.FP16, "int8": SparseType.INT8}
LOCATIONS = {"device": EmbeddingLocation.DEVICE, "managed": EmbeddingLocation.MANAGED,
             "managed_caching": EmbeddingLocation.MANAGED_CACHING}
SHARDINGS = ("auto", "none", "row_wise", "table_wise")


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


def row_bounds(num_rows: int, world_size: int, sharding_type: str) -> List[int]:
    """The first row of each rank's range, then ``num_rows``: rank r holds rows
    ``[bounds[r], bounds[r + 1])``. ``row_wise``: TorchRec's split, ``ceil(num_rows / world)``
    rows per rank (the last ranks may hold fewer or none); ``table_wise``: all on rank 0.

    Example: ``row_bounds(10, 4, "row_wise") == [0, 3, 6, 9, 10]``.
    """
    if sharding_type == "row_wise":
        block = -(-num_rows // world_size)
        return [min(r * block, num_rows) for r in range(world_size + 1)]
    if sharding_type == "table_wise":
        return [0] + [num_rows] * world_size
    raise TokenLookupError(f"sharding_type must be row_wise or table_wise, got "
                           f"{sharding_type!r}")


def _flat_ids(row_ids: torch.Tensor, num_rows: int, device: torch.device) -> torch.Tensor:
    """``row_ids`` checked (int32 / int64, in [-1, num_rows)) and flattened, int64 on device."""
    if row_ids.dtype not in (torch.int32, torch.int64):
        raise TokenLookupError(f"row ids must be int32 or int64, got {row_ids.dtype}")
    if row_ids.dim() == 0:
        raise TokenLookupError("row ids must have at least one dimension")
    bad = _out_of_range(row_ids, num_rows)
    if bad is not None:
        raise TokenLookupError(f"row id {bad} out of range [0, {num_rows}) (-1 is padding)")
    return row_ids.reshape(-1).to(device=device, dtype=torch.int64)


class InstanceTokenLookup(nn.Module):
    """The store's rows (all, or the range ``rows = (lo, hi)``: table row i holds store row
    lo + i) in FBGEMM's inference embedding table; ``forward(row_ids)`` with ``row_ids``
    [..., L] int32/int64 table rows (-1 = padding) returns float tokens [..., L, d].

    Built directly on ``device`` (FBGEMM keeps its weights outside the module's parameters, so
    ``.to()`` does not move them). Copies the store in chunks of ``chunk_rows`` rows.
    ``local_rows`` / ``local_bytes``: the rows and bytes of the table it holds.
    """

    def __init__(self, store: TokenStore, device: Union[str, torch.device] = "cpu", *,
                 location: Optional[str] = None, output_dtype: str = "fp32",
                 rows: Optional[Tuple[int, int]] = None, chunk_rows: int = 1 << 20) -> None:
        super().__init__()
        _check_store(store)
        lo, hi = rows if rows is not None else (0, store.num_rows)
        if not 0 <= lo <= hi <= store.num_rows:
            raise TokenLookupError(f"rows {rows} are not a range of the store's "
                                   f"{store.num_rows} rows")
        self.device = torch.device(device)
        self.num_rows, self.dim, self.dtype = hi - lo, store.token_shape[0], store.dtype
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
        self.local_rows, self.local_bytes = self.num_rows, weights.numel()
        row_bytes = store.row_bytes
        for start, raw in store.raw_row_chunks(chunk_rows):
            a, b = max(start, lo), min(start + raw.shape[0], hi)
            if a < b:
                weights[a - lo:b - lo, :row_bytes].copy_(
                    torch.from_numpy(np.ascontiguousarray(raw[a - start:b - start])))

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


class _RowSharded(nn.Module):
    """Rows ``[bounds[r], bounds[r + 1])`` of a ``num_rows``-row table on rank r of
    ``process_group`` (default: the world); :meth:`_exchange` looks rows up wherever they are.
    ``lo``, ``hi``: this rank's range; ``local_rows = hi - lo``."""

    def __init__(self, num_rows: int, sharding_type: str, device: Union[str, torch.device],
                 process_group: Optional[dist.ProcessGroup]) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise TokenLookupError(f"{type(self).__name__} needs an initialised "
                                   "torch.distributed process group")
        self.group = process_group or dist.group.WORLD
        self.device = torch.device(device)
        self.num_rows = num_rows
        bounds = row_bounds(num_rows, dist.get_world_size(self.group), sharding_type)
        rank = dist.get_rank(self.group)
        self.lo, self.hi = bounds[rank], bounds[rank + 1]
        self.local_rows = self.hi - self.lo
        self._starts = torch.tensor(bounds[:-1], dtype=torch.int64, device=self.device)
        self._ends = torch.tensor(bounds[1:], dtype=torch.int64, device=self.device)

    def _exchange(self, row_ids: torch.Tensor, local: Callable[[torch.Tensor], torch.Tensor]
                  ) -> torch.Tensor:
        """Rows [..., L, *row] of global ``row_ids`` [..., L] (-1: padding -> zeros): each id goes
        to the rank holding it, which answers with ``local(its table rows)`` [n, *row]."""
        flat = _flat_ids(row_ids, self.num_rows, self.device)
        pos = torch.nonzero(flat >= 0).squeeze(1)
        ids = flat[pos]
        owner = torch.searchsorted(self._ends, ids, right=True)
        order = torch.argsort(owner, stable=True)
        owner = owner[order]
        send = ids[order] - self._starts[owner]
        send_counts = torch.bincount(owner, minlength=self._ends.numel())
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        sent, received = send_counts.tolist(), recv_counts.tolist()
        asked = send.new_empty(sum(received))
        dist.all_to_all_single(asked, send, received, sent, group=self.group)
        found = local(asked).contiguous()
        back = found.new_empty((ids.numel(), *found.shape[1:]))
        dist.all_to_all_single(back, found, sent, received, group=self.group)
        out = back.new_zeros((flat.numel(), *found.shape[1:])).index_copy_(0, pos[order], back)
        return out.view(*row_ids.shape, *found.shape[1:])


class ShardedInstanceTokenLookup(_RowSharded):
    """The store sharded by row range over ``process_group`` (see the module docstring):
    ``sharding_type`` "row_wise" (a contiguous ``ceil(N / world)`` rows per rank) or
    "table_wise" (the whole store on rank 0). Each rank's rows sit in an
    :class:`InstanceTokenLookup` (``table``) as stored, on ``device`` at ``location``.

    ``forward(row_ids)`` as :class:`InstanceTokenLookup` (global store rows), collective.
    ``local_rows`` / ``local_bytes``: what this rank holds.

    Example::

        lookup = ShardedInstanceTokenLookup(TokenStore.open(path))   # in a 2-process group
        tokens = lookup(torch.tensor([[0, 7, -1]]))                   # [1, 3, d]
    """

    def __init__(self, store: TokenStore, device: Union[str, torch.device] = "cpu", *,
                 sharding_type: str = "row_wise", location: Optional[str] = None,
                 output_dtype: str = "fp32", process_group: Optional[dist.ProcessGroup] = None,
                 chunk_rows: int = 1 << 20) -> None:
        _check_store(store)
        super().__init__(store.num_rows, sharding_type, device, process_group)
        self.dim = store.token_shape[0]
        self.table = InstanceTokenLookup(store, self.device, location=location,
                                         output_dtype=output_dtype, rows=(self.lo, self.hi),
                                         chunk_rows=chunk_rows)
        self.local_bytes = self.table.local_bytes

    @torch.no_grad()
    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        return self._exchange(row_ids, self.table)


def _code_rows(store: TokenStore, rows_like: Optional[TokenStore], lo: int, hi: int
               ) -> np.ndarray:
    """The codes [hi - lo, T, M] of rows lo..hi of ``rows_like`` (matched by instance id), or of
    ``store`` itself without it."""
    if store.kind != "sif":
        raise ValueError(f"{store.path}: a code lookup needs a SIF store, got {store.kind!r}")
    rows = np.arange(lo, hi, dtype=np.int64)
    if rows_like is not None:
        rows = store.rows_of(rows_like.column("instance_id", rows))
    return store.tokens(rows)


class SampleCodeLookup(nn.Module):
    """Frozen HGAQ codes of a SIF store on a device: ``forward(row_ids [..., L]) -> codes
    [..., L, T, M]`` int64 (-1 = padding -> codes 0, which the mixer masks).

    Args:
        codes: uint8 [N, T, M], row r the codes of store row r.
        device: where they live.

    ``local_rows`` / ``local_bytes``: the rows and bytes it holds.
    """

    def __init__(self, codes: Union[np.ndarray, torch.Tensor],
                 device: Union[str, torch.device] = "cpu") -> None:
        super().__init__()
        codes = torch.as_tensor(codes)
        if codes.dim() != 3:
            raise ValueError(f"codes must be [N, T, M], got {tuple(codes.shape)}")
        self.device = torch.device(device)
        self.num_rows = self.local_rows = int(codes.shape[0])
        self.register_buffer("codes", codes.to(self.device), persistent=False)
        self.local_bytes = self.codes.numel() * self.codes.element_size()

    @classmethod
    def from_store(cls, store: TokenStore, device: Union[str, torch.device] = "cpu",
                   rows_like: Optional[TokenStore] = None) -> "SampleCodeLookup":
        """The codes of a SIF ``store``; with ``rows_like`` (e.g. the IAT store whose row ids the
        histories hold), row r holds the codes of ``rows_like``'s row r (matched by instance id;
        every instance of ``rows_like`` must be in ``store``)."""
        rows = (rows_like if rows_like is not None else store).num_rows
        return cls(_code_rows(store, rows_like, 0, rows), device)

    @torch.no_grad()
    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        ids = row_ids.to(self.device)
        out = self.codes.index_select(0, ids.clamp(min=0).reshape(-1)).long()
        out = out.view(*ids.shape, *self.codes.shape[1:])
        return torch.where((ids >= 0).view(*ids.shape, 1, 1), out, 0)


class ShardedSampleCodeLookup(_RowSharded):
    """A SIF store's codes sharded by row range over ``process_group`` as
    :class:`ShardedInstanceTokenLookup` shards tokens (rows of ``rows_like`` when given, as
    :meth:`SampleCodeLookup.from_store`); ``forward`` as :class:`SampleCodeLookup`, collective.
    The codes travel as uint8."""

    def __init__(self, store: TokenStore, device: Union[str, torch.device] = "cpu",
                 rows_like: Optional[TokenStore] = None, *, sharding_type: str = "row_wise",
                 process_group: Optional[dist.ProcessGroup] = None) -> None:
        rows = (rows_like if rows_like is not None else store).num_rows
        super().__init__(rows, sharding_type, device, process_group)
        self.table = SampleCodeLookup(_code_rows(store, rows_like, self.lo, self.hi),
                                      self.device)
        self.local_bytes = self.table.local_bytes

    @torch.no_grad()
    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        return self._exchange(row_ids, lambda ids: self.table.codes.index_select(0, ids)).long()


@dataclasses.dataclass
class LookupConfig:
    """How each process holds the frozen token and code stores."""

    sharding: str = dataclasses.field(default="auto", metadata={
        "help": "auto (row_wise with more than one process for a store of at least "
                "shard_min_bytes, else none) | none (the whole store in every process) | "
                "row_wise (a contiguous row range per process, rows kept as stored, int8 "
                "included) | table_wise (the whole store on rank 0)"})
    shard_min_bytes: int = dataclasses.field(default=256 << 20, metadata={
        "help": "auto: the store size from which it is sharded (below, a whole copy per "
                "process costs less than the two all-to-alls of every sharded lookup)"})
    location: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "CUDA: device | managed | managed_caching (UVM for large stores), where each "
                "process's token table lives"})
    output_dtype: str = dataclasses.field(default="fp32", metadata={
        "help": "fp32 | fp16: the looked-up tokens' type"})


def _sharding(config: LookupConfig, store: TokenStore,
              process_group: Optional[dist.ProcessGroup]) -> str:
    if config.sharding not in SHARDINGS:
        raise TokenLookupError(f"sharding must be one of {SHARDINGS}, got {config.sharding!r}")
    if config.sharding != "auto":
        return config.sharding
    several = dist.is_initialized() and dist.get_world_size(process_group) > 1
    large = store.num_rows * store.row_bytes >= config.shard_min_bytes
    return "row_wise" if several and large else "none"


def make_token_lookup(store: TokenStore, config: LookupConfig,
                      device: Union[str, torch.device] = "cpu",
                      process_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """The token lookup ``config`` asks for."""
    sharding = _sharding(config, store, process_group)
    if sharding == "none":
        return InstanceTokenLookup(store, device, location=config.location,
                                   output_dtype=config.output_dtype)
    return ShardedInstanceTokenLookup(store, device, sharding_type=sharding,
                                      location=config.location,
                                      output_dtype=config.output_dtype,
                                      process_group=process_group)


def make_code_lookup(store: TokenStore, config: LookupConfig,
                     device: Union[str, torch.device] = "cpu",
                     rows_like: Optional[TokenStore] = None,
                     process_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """The code lookup ``config`` asks for (its ``sharding``; ``location`` and ``output_dtype``
    concern tokens only)."""
    sharding = _sharding(config, store, process_group)
    if sharding == "none":
        return SampleCodeLookup.from_store(store, device, rows_like)
    return ShardedSampleCodeLookup(store, device, rows_like, sharding_type=sharding,
                                   process_group=process_group)
