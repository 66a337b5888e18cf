"""Sharding plans on paper: TorchRec's planner over a described cluster, without its devices.

The tables are those of a feature spec (one per sparse field, as the downstream model builds
them: :func:`iat_torchrec.models.dlrm_sif.embedding_tables`) and / or described groups of
tables, plus an optional instance-token store, planned as one more table the way
:class:`iat_torchrec.tokens.lookup.ShardedInstanceTokenLookup` serves it: keyed by row id,
row-wise (one contiguous row range per rank) or table-wise, rows as stored (an int8 row is d
codes plus its fp16 scale and bias: planned as the fp16 table of the same bytes), in HBM
(``fused``, its location "device") or host memory behind an HBM cache (``fused_uvm_caching``,
"managed_caching"), frozen: no optimizer state (the planner's perf estimate still counts a
backward for it). Everything is built on the ``meta`` device, so a 500M-row table allocates
nothing; the topology (hosts x devices, HBM, host DDR, bandwidths) is TorchRec's own
``Topology`` in dry-run mode, and the plan is ``EmbeddingShardingPlanner.plan`` (no process
group).

A table that cannot be placed is reported, never dropped silently: first each table alone (its
smallest sharding option against one device and against the whole cluster), then, when the
tables fit alone but not together, the largest are left out one by one until the planner
places the rest. Example::

    result = plan_sharding(PlanConfig(model=ModelDescription(tables=[
        "count=200 rows=1K..100K dim=16 name=small", "rows=500M dim=128 name=user_id"])))
    result.tables[0].sharding_type, result.tables[0].compute_kernel, result.unplaced
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.proposers import GreedyProposer, UniformProposer
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (HardwareConfig, KernelConfig, PlannerError,
                                                ShardingOption, Stats, Storage, Topology,
                                                TopologyFactory, TrainerConfig)
from torchrec.distributed.types import CacheParams, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from iat_torchrec.atomic import atomic_output
from iat_torchrec.config import nested, to_dict
from iat_torchrec.data.spec import FeatureSpec
from iat_torchrec.distributed.sharding import CPU_SHARDING_TYPES, SPARSE_OPTIMIZERS
from iat_torchrec.models.dlrm_sif import DLRMSIFConfig, embedding_tables
from iat_torchrec.tokens.lookup import TABLE as TOKEN_TABLE
from iat_torchrec.tokens.store import INT8_SCALE_BIAS_BYTES

GB = 1024 ** 3  # bytes; TorchRec's planner counts GB this way
TABLES_MODULE, TOKENS_MODULE = "tables", "tokens"
# The token store's sharding types: those ShardedInstanceTokenLookup builds.
TOKEN_SHARDING_TYPES = ("row_wise", "table_wise")
KERNELS = ("fused", "fused_uvm_caching")
DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}
_SCALE = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9}


class PlanError(ValueError):
    """A described model or cluster that cannot be planned as given (the message names the
    setting)."""


class TablesDoNotFit(PlanError):
    """Some tables cannot be placed on the described cluster (raised after the report)."""


# --------------------------------------------------------------------------- settings
def _field(default: Any, help: str) -> Any:
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ModelDescription:
    """The embedding tables to plan: a feature spec's and / or described groups."""

    spec: str = _field("", "feature_spec.json (or an instance log beside it): one table per "
                           "sparse field, as the downstream model builds them")
    spec_dim: int = _field(16, "width of the spec's tables (the downstream model's "
                               "embedding_dim)")
    tables: List[str] = _field([], "described table groups, each 'count=N rows=R dim=D' "
                                   "(optional name=P, pooling=F, dtype=fp32|fp16); R may be "
                                   "LO..HI for N log-spaced row counts; numbers take K, M, B "
                                   "(1e3, 1e6, 1e9); a group of N > 1 is named P_0..P_{N-1}")
    pooling_factor: float = _field(1.0, "ids per sample of each table without its own "
                                        "pooling (the planner's pooling factor)")


@dataclasses.dataclass
class TokenStoreDescription:
    """The instance-token store, planned as one more (frozen) table; 0 instances: none."""

    num_instances: int = _field(0, "N: rows of the token store (0: no token store)")
    width: int = _field(64, "d: token width")
    dtype: str = _field("fp16", "fp32 | fp16 | int8 (rows as stored: int8 rows are d codes "
                                "and a 4-byte scale and bias)")
    lookups_per_sample: float = _field(256.0, "token ids looked up per sample: the history "
                                              "length L")


@dataclasses.dataclass
class ClusterDescription:
    """The cluster planned for (GB = 1024^3 bytes, as TorchRec's planner counts)."""

    hosts: int = _field(1, "hosts (nodes)")
    devices_per_host: int = _field(8, "devices (ranks) per host")
    device: str = _field("cuda", "compute device: cuda | cpu (cpu: tables in DDR)")
    hbm_gb: float = _field(80.0, "HBM per device, GB (cuda)")
    ddr_gb_per_host: float = _field(1024.0, "host memory (DDR) per host, GB, shared by its "
                                            "devices")
    hbm_gb_s: float = _field(897.0, "HBM bandwidth per device, GB/s")
    ddr_gb_s: float = _field(51.0, "DDR bandwidth per device, GB/s")
    hbm_to_ddr_gb_s: float = _field(32.0, "host-to-device (UVM) bandwidth per device, GB/s")
    intra_host_gb_s: float = _field(600.0, "bandwidth between devices of one host, GB/s")
    inter_host_gb_s: float = _field(12.5, "bandwidth between hosts per device, GB/s")

    @property
    def world_size(self) -> int:
        return self.hosts * self.devices_per_host


@dataclasses.dataclass
class PlannerSettings:
    """What the planner may choose and how hard it searches."""

    batch_size: int = _field(512, "samples per rank per iteration")
    sharding_types: List[str] = _field(["table_wise", "row_wise", "table_row_wise"],
                                       "sharding types the planner may choose (row-wise ones "
                                       "need cuda; column_wise, data_parallel also known)")
    compute_kernels: List[str] = _field(list(KERNELS), "compute kernels the planner may "
                                                       "choose: fused (HBM on cuda) | "
                                                       "fused_uvm_caching (host memory behind "
                                                       "an HBM cache; cuda)")
    uvm_cache_load_factor: float = _field(0.2, "fused_uvm_caching: fraction of a table's rows "
                                               "cached in HBM")
    row_wise_min_rows: int = _field(1_000_000, "tables with fewer rows are planned table-wise "
                                               "only: row-sharding a small table gains nothing "
                                               "and costs the planner one estimate per device "
                                               "and option")
    sparse_optimizer: str = _field("rowwise_adagrad", "the tables' fused optimizer, for its "
                                                      "state: rowwise_adagrad | adam | sgd")
    reserved_hbm_fraction: float = _field(0.15, "HBM kept free of tables on every device "
                                                "(TorchRec's heuristical reservation, besides "
                                                "its input-batch estimate)")
    patience: int = _field(10, "greedy search: stop after this many placeable proposals "
                               "without a better estimate (0: try every option)")


@dataclasses.dataclass
class PlanConfig:
    """Plan the sharding of embedding tables (and a token store) for a described cluster with
    TorchRec's planner, without its devices."""

    description: str = _field("", "what this plan describes (printed, kept in --out)")
    model: ModelDescription = nested(ModelDescription, "the tables")
    tokens: TokenStoreDescription = nested(TokenStoreDescription, "the token store")
    cluster: ClusterDescription = nested(ClusterDescription, "the cluster")
    planner: PlannerSettings = nested(PlannerSettings, "the planner")
    out: str = _field("", "write the plan as JSON here (atomically; replaces the file)")


# --------------------------------------------------------------------------- tables
@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One table to plan: ``module`` is "tables" (trained, an EmbeddingBagCollection; fp32 or
    fp16) or "tokens" (the frozen token store, an EmbeddingCollection; fp32, fp16 or int8)."""

    name: str
    rows: int
    dim: int
    dtype: str
    pooling_factor: float
    module: str = TABLES_MODULE

    @property
    def row_bytes(self) -> int:
        """One stored row: 4 or 2 bytes per value, an int8 row d codes and its scale and bias."""
        if self.dtype == "int8":
            return self.dim + INT8_SCALE_BIAS_BYTES
        return self.dim * (4 if self.dtype == "fp32" else 2)

    @property
    def weight_bytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def planned_as(self) -> Tuple[DataType, int]:
        """The data type and width of the table the planner sees (int8 rows: the fp16 table
        of the same bytes, e.g. d = 64 -> 34 fp16 columns)."""
        if self.dtype == "int8":
            return DataType.FP16, self.row_bytes // 2
        return DTYPES[self.dtype], self.dim


def _number(text: str, what: str, group: str) -> float:
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)([KMB]?)", text)
    if not m:
        raise PlanError(f"model.tables {group!r}: {what} {text!r} is not a number "
                        "(K, M, B suffixes allowed)")
    return float(m.group(1)) * _SCALE[m.group(2)]


def _integer(text: str, what: str, group: str) -> int:
    value = _number(text, what, group)
    if value != int(value) or value <= 0:
        raise PlanError(f"model.tables {group!r}: {what} must be a positive integer, got {text!r}")
    return int(value)


def parse_table_group(group: str, index: int, pooling_factor: float) -> List[TableSpec]:
    """The tables of one described group.

    Example: ``parse_table_group("count=3 rows=1K..100K dim=16 name=s", 0, 1.0)`` -> tables
    s_0, s_1, s_2 of 1000, 10000, 100000 rows; without ``name`` they are g<index>_0...
    """
    fields: Dict[str, str] = {}
    for item in group.split():
        key, eq, value = item.partition("=")
        if not eq or key not in ("count", "rows", "dim", "name", "pooling", "dtype"):
            raise PlanError(f"model.tables {group!r}: expected key=value with keys count, rows, "
                            f"dim, name, pooling, dtype; got {item!r}")
        fields[key] = value
    for key in ("rows", "dim"):
        if key not in fields:
            raise PlanError(f"model.tables {group!r}: {key}= is required")
    count = _integer(fields.get("count", "1"), "count", group)
    dim = _integer(fields["dim"], "dim", group)
    if dim % 4:
        raise PlanError(f"model.tables {group!r}: dim must be a multiple of 4 (FBGEMM), got {dim}")
    dtype = fields.get("dtype", "fp32")
    if dtype not in DTYPES:
        raise PlanError(f"model.tables {group!r}: dtype must be one of {list(DTYPES)}")
    pooling = _number(fields.get("pooling", str(pooling_factor)), "pooling", group)
    if pooling <= 0:
        raise PlanError(f"model.tables {group!r}: pooling must be > 0, got {pooling}")
    low, dots, high = fields["rows"].partition("..")
    if dots:
        lo, hi = _integer(low, "rows", group), _integer(high, "rows", group)
        if count < 2 or lo >= hi:
            raise PlanError(f"model.tables {group!r}: a row range LO..HI needs LO < HI and "
                            "count >= 2")
        rows = [int(round(r)) for r in np.geomspace(lo, hi, count)]
    else:
        rows = [_integer(low, "rows", group)] * count
    name = fields.get("name", f"g{index}")
    names = [name] if count == 1 else [f"{name}_{i}" for i in range(count)]
    return [TableSpec(n, r, dim, dtype, pooling) for n, r in zip(names, rows)]


def described_tables(config: PlanConfig) -> List[TableSpec]:
    """Every table the config describes: the spec's, the groups', then the token store."""
    model, tokens = config.model, config.tokens
    tables: List[TableSpec] = []
    if model.spec:
        spec = FeatureSpec.load(model.spec)
        try:
            model_config = DLRMSIFConfig(embedding_dim=model.spec_dim)
        except ValueError as e:
            raise PlanError(f"model.spec_dim: {e}") from None
        tables += [TableSpec(t.name, t.num_embeddings, t.embedding_dim, "fp32",
                             model.pooling_factor)
                   for t in embedding_tables(spec, model_config)]
    for i, group in enumerate(model.tables):
        tables += parse_table_group(group, i, model.pooling_factor)
    if tokens.num_instances < 0:
        raise PlanError(f"tokens.num_instances must be >= 0, got {tokens.num_instances}")
    if tokens.num_instances:
        if tokens.dtype not in ("fp32", "fp16", "int8"):
            raise PlanError(f"tokens.dtype must be fp32, fp16 or int8, got {tokens.dtype!r}")
        if tokens.lookups_per_sample <= 0:
            raise PlanError(f"tokens.lookups_per_sample must be > 0, got "
                            f"{tokens.lookups_per_sample}")
        if tokens.width <= 0 or tokens.width % 4:
            raise PlanError(f"tokens.width must be a positive multiple of 4 (FBGEMM), got "
                            f"{tokens.width}")
        tables.append(TableSpec(TOKEN_TABLE, tokens.num_instances, tokens.width, tokens.dtype,
                                tokens.lookups_per_sample, TOKENS_MODULE))
    if not tables:
        raise PlanError("nothing to plan: give model.spec, model.tables or tokens.num_instances")
    dup = [n for n, c in Counter(t.name for t in tables).items() if c > 1]
    if dup:
        raise PlanError(f"table names must be unique; repeated: {sorted(dup)[:5]}")
    return tables


class PlannedModel(nn.Module):
    """The tables on ``meta``: ``tables`` (EmbeddingBagCollection, with the sparse optimizer
    attached for the planner's state estimate) and ``tokens`` (EmbeddingCollection, frozen)."""

    def __init__(self, tables: Sequence[TableSpec], optimizer: str) -> None:
        super().__init__()
        meta = torch.device("meta")
        trained = [t for t in tables if t.module == TABLES_MODULE]
        frozen = [t for t in tables if t.module == TOKENS_MODULE]
        if trained:
            self.tables = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
                name=t.name, embedding_dim=t.planned_as[1], num_embeddings=t.rows,
                feature_names=[t.name], data_type=t.planned_as[0]) for t in trained], device=meta)
            # Only the optimizer's class reaches the planner (its state size), not its lr.
            apply_optimizer_in_backward(SPARSE_OPTIMIZERS[optimizer], self.tables.parameters(),
                                        {"lr": 0.01})
        if frozen:
            self.tokens = EmbeddingCollection(tables=[EmbeddingConfig(
                name=t.name, embedding_dim=t.planned_as[1], num_embeddings=t.rows,
                feature_names=[t.name], data_type=t.planned_as[0]) for t in frozen], device=meta)


# --------------------------------------------------------------------------- planner parts
def cluster_topology(cluster: ClusterDescription) -> Topology:
    """TorchRec's topology of the described cluster (dry run: nothing is detected)."""
    if cluster.hosts <= 0 or cluster.devices_per_host <= 0:
        raise PlanError(f"cluster.hosts and cluster.devices_per_host must be > 0, got "
                        f"{cluster.hosts} and {cluster.devices_per_host}")
    if cluster.device not in ("cuda", "cpu"):
        raise PlanError(f"cluster.device must be cuda or cpu, got {cluster.device!r}")
    rates = {k: getattr(cluster, k) for k in ("hbm_gb_s", "ddr_gb_s", "hbm_to_ddr_gb_s",
                                              "intra_host_gb_s", "inter_host_gb_s")}
    bad = [k for k, v in rates.items() if v <= 0] + [
        k for k in ("hbm_gb", "ddr_gb_per_host") if getattr(cluster, k) < 0]
    if bad:
        raise PlanError(f"cluster: {['cluster.' + k for k in bad]} must be positive")
    per_ms = {k: v * GB / 1000 for k, v in rates.items()}  # the planner's bytes / ms
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=cluster.world_size, local_world_size=cluster.devices_per_host,
            is_dry_run=True, dry_run_hbm_bytes=int(cluster.hbm_gb * GB),
            dry_run_ddr_bytes=int(cluster.ddr_gb_per_host * GB / cluster.devices_per_host)),
        hardware_config=HardwareConfig(
            hbm_mem_bw=per_ms["hbm_gb_s"], ddr_mem_bw=per_ms["ddr_gb_s"],
            hbm_to_ddr_mem_bw=per_ms["hbm_to_ddr_gb_s"],
            intra_host_bw=per_ms["intra_host_gb_s"], inter_host_bw=per_ms["inter_host_gb_s"]),
        kernel_config=KernelConfig(compute_device=cluster.device,
                                   use_hardware_based_bandwidth=True))


def table_constraints(tables: Sequence[TableSpec], config: PlanConfig
                      ) -> Dict[str, ParameterConstraints]:
    """Per table: the sharding types and kernels it may get, its pooling factor and the UVM
    cache's load factor."""
    settings, device = config.planner, config.cluster.device
    for t in settings.sharding_types:
        try:
            ShardingType(t)
        except ValueError:
            raise PlanError(f"planner.sharding_types: unknown {t!r} (known: "
                            f"{[s.value for s in ShardingType]})") from None
    kernels = [k for k in settings.compute_kernels if device == "cuda" or k == "fused"]
    if not settings.sharding_types or not kernels:
        raise PlanError(f"planner.sharding_types and planner.compute_kernels must name at least "
                        f"one usable choice on {device} (kernels here: {list(KERNELS)}, "
                        "fused only on cpu)")
    unknown = sorted(set(settings.compute_kernels) - set(KERNELS))
    if unknown:
        raise PlanError(f"planner.compute_kernels: unknown {unknown} (known: {list(KERNELS)})")
    if settings.sparse_optimizer not in SPARSE_OPTIMIZERS:
        raise PlanError(f"planner.sparse_optimizer must be one of {list(SPARSE_OPTIMIZERS)}")
    if not 0 < settings.uvm_cache_load_factor <= 1:
        raise PlanError("planner.uvm_cache_load_factor must be in (0, 1]")
    cache = CacheParams(load_factor=settings.uvm_cache_load_factor)
    out = {}
    for table in tables:
        types = [t for t in settings.sharding_types
                 if device == "cuda" or t in CPU_SHARDING_TYPES]
        if table.module == TOKENS_MODULE:
            types = [t for t in types if t in TOKEN_SHARDING_TYPES]
        if table.rows < settings.row_wise_min_rows and "table_wise" in types:
            types = ["table_wise"]
        if not types:
            raise PlanError(f"{table.name}: none of planner.sharding_types "
                            f"{settings.sharding_types} serves it on {device} (cpu: "
                            f"{list(CPU_SHARDING_TYPES)}; the token store: "
                            f"{list(TOKEN_SHARDING_TYPES)})")
        # A data-parallel table is a replica on every device, with TorchRec's dense kernel.
        dense = ["dense"] if "data_parallel" in types else []
        out[table.name] = ParameterConstraints(
            sharding_types=types, compute_kernels=kernels + dense,
            pooling_factors=[table.pooling_factor], cache_params=cache)
    return out


def _sharders() -> List[Any]:
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


class _KeepBestPlan(Stats):
    """Keeps the sharding options of the plan the planner chose (their shards carry the
    storage and perf estimates the ShardingPlan leaves out)."""

    def __init__(self) -> None:
        self.best_plan: List[ShardingOption] = []

    def log(self, sharding_plan: ShardingPlan, topology: Topology, batch_size: int,
            storage_reservation: Any, num_proposals: int, num_plans: int, run_time: float,
            best_plan: List[ShardingOption], *args: Any, **kwargs: Any) -> None:
        self.best_plan = best_plan


# --------------------------------------------------------------------------- results
@dataclasses.dataclass
class PlacedTable:
    """A placed table: its sharding, kernel, UVM cache load factor (TorchRec's cache
    parameter, used by ``fused_uvm_caching`` only) and shards (``shards``: one dict per shard
    with rank, offsets, sizes, placement, hbm / ddr bytes and the perf estimate in ms)."""

    table: TableSpec
    sharding_type: str
    compute_kernel: str
    cache_load_factor: Optional[float]
    shards: List[Dict[str, Any]]

    @property
    def ranks(self) -> List[int]:
        return [s["rank"] for s in self.shards]


@dataclasses.dataclass
class UnplacedTable:
    table: TableSpec
    reason: str


@dataclasses.dataclass
class DeviceUse:
    """One rank's planned use against its capacity (bytes) and its perf estimate (ms per
    iteration: forward / backward compute and communication)."""

    rank: int
    host: int
    hbm: int
    ddr: int
    hbm_capacity: int
    ddr_capacity: int
    hbm_for_tables: int
    ddr_for_tables: int
    perf_ms: Dict[str, float]


@dataclasses.dataclass
class PlanResult:
    """The plan: TorchRec's ``plan`` (module path "tables" or "tokens" -> table ->
    ``ParameterSharding``), the same per table with its estimates, what was not placed, the use
    of every device, and the planning time."""

    config: PlanConfig
    plan: ShardingPlan
    tables: List[PlacedTable]
    unplaced: List[UnplacedTable]
    devices: List[DeviceUse]
    seconds: float

    @property
    def max_perf_ms(self) -> float:
        """The planner's rating of the plan: the slowest rank's estimate."""
        return max((d.perf_ms["total"] for d in self.devices), default=0.0)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form: settings, per table its ParameterSharding fields (sharding type,
        kernel, ranks, shards with offsets / sizes / placement, cache load factor) and
        estimates, per device the use, and what does not fit."""
        def table(t: TableSpec) -> Dict[str, Any]:
            return {"name": t.name, "module": t.module, "rows": t.rows, "dim": t.dim,
                    "dtype": t.dtype, "planned_columns": t.planned_as[1],
                    "pooling_factor": t.pooling_factor, "weight_bytes": t.weight_bytes}

        return {
            "description": self.config.description,
            "config": to_dict(self.config),
            "planned_in_s": round(self.seconds, 2),
            "world_size": self.config.cluster.world_size,
            "local_world_size": self.config.cluster.devices_per_host,
            "compute_device": self.config.cluster.device,
            "max_perf_ms": self.max_perf_ms,
            "tables": [{**table(p.table), "sharding_type": p.sharding_type,
                        "compute_kernel": p.compute_kernel, "ranks": p.ranks,
                        "cache_load_factor": p.cache_load_factor, "shards": p.shards}
                       for p in self.tables],
            "unplaced": [{**table(u.table), "reason": u.reason} for u in self.unplaced],
            "devices": [dataclasses.asdict(d) for d in self.devices],
        }


def _placed(options: Sequence[ShardingOption], plan: ShardingPlan,
            specs: Dict[str, TableSpec]) -> List[PlacedTable]:
    out = []
    for option in options:
        sharding = plan.plan[option.path][option.name]
        metas = sharding.sharding_spec.shards if sharding.sharding_spec is not None else []
        placements = [str(m.placement) for m in metas] or [""] * len(option.shards)
        shards = [{"rank": s.rank, "offsets": list(s.offset), "sizes": list(s.size),
                   "placement": where, "hbm_bytes": s.storage.hbm, "ddr_bytes": s.storage.ddr,
                   "perf_ms": s.perf.total}
                  for s, where in zip(option.shards, placements)]
        out.append(PlacedTable(specs[option.name], option.sharding_type, option.compute_kernel,
                               option.cache_load_factor, shards))
    order = {name: i for i, name in enumerate(specs)}
    return sorted(out, key=lambda p: order[p.table.name])


def _devices(options: Sequence[ShardingOption], topology: Topology, reserved: Topology,
             local: int) -> List[DeviceUse]:
    hbm = [0] * topology.world_size
    ddr = [0] * topology.world_size
    perf = [Counter() for _ in range(topology.world_size)]
    for option in options:
        for s in option.shards:
            hbm[s.rank] += s.storage.hbm
            ddr[s.rank] += s.storage.ddr
            perf[s.rank].update({"fwd_compute": s.perf.fwd_compute, "fwd_comms": s.perf.fwd_comms,
                                 "bwd_compute": s.perf.bwd_compute, "bwd_comms": s.perf.bwd_comms,
                                 "total": s.perf.total})
    keys = ("fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms", "total")
    return [DeviceUse(rank=r, host=r // local, hbm=hbm[r], ddr=ddr[r],
                      hbm_capacity=d.storage.hbm, ddr_capacity=d.storage.ddr,
                      hbm_for_tables=reserved.devices[r].storage.hbm,
                      ddr_for_tables=reserved.devices[r].storage.ddr,
                      perf_ms={k: float(perf[r][k]) for k in keys})
            for r, d in enumerate(topology.devices)]


# --------------------------------------------------------------------------- planning
def _storage_totals(option: ShardingOption) -> Tuple[int, int]:
    return (sum(s.storage.hbm for s in option.shards), sum(s.storage.ddr for s in option.shards))


def _gb(n: float) -> str:
    """Bytes as GB (MB below 1 GB)."""
    return f"{n / GB:,.1f} GB" if n >= GB else f"{n / 2 ** 20:,.0f} MB"


def _alone_misfit(options: Sequence[ShardingOption], device: Storage, cluster: Storage
                  ) -> Optional[str]:
    """Why none of a table's options fits the cluster even alone (None: one does)."""
    def in_cluster(o: ShardingOption) -> bool:
        hbm, ddr = _storage_totals(o)
        return hbm <= cluster.hbm and ddr <= cluster.ddr

    def on_devices(o: ShardingOption) -> bool:
        return all(s.storage.hbm <= device.hbm and s.storage.ddr <= device.ddr for s in o.shards)

    if any(in_cluster(o) and on_devices(o) for o in options):
        return None
    smallest: Dict[str, ShardingOption] = {}
    for o in sorted(options, key=lambda o: sum(_storage_totals(o)), reverse=True):
        smallest[o.compute_kernel] = o
    if not any(in_cluster(o) for o in options):
        needs = "; ".join(f"{k}: {_gb(_storage_totals(o)[0])} HBM + {_gb(_storage_totals(o)[1])}"
                          f" DDR" for k, o in sorted(smallest.items()))
        return (f"larger than the whole cluster: it needs at least {needs}; the cluster has "
                f"{_gb(cluster.hbm)} HBM + {_gb(cluster.ddr)} DDR for tables")
    needs = "; ".join(f"{k} ({o.sharding_type}): {_gb(max(s.storage.hbm for s in o.shards))} HBM"
                      f" + {_gb(max(s.storage.ddr for s in o.shards))} DDR"
                      for k, o in sorted(smallest.items()))
    return (f"no shard of it fits one device: its smallest options put on one device {needs}; a "
            f"device has {_gb(device.hbm)} HBM + {_gb(device.ddr)} DDR for tables (sharding "
            f"types allowed: {sorted({o.sharding_type for o in options})})")


class _Planning:
    """One planning job: the topology, and per table set its model, constraints, reservation
    and enumerator (kept, so that planning the set enumerated first reuses its estimates)."""

    def __init__(self, config: PlanConfig) -> None:
        self.config = config
        self.topology = cluster_topology(config.cluster)
        if config.planner.batch_size <= 0:
            raise PlanError(f"planner.batch_size must be > 0, got {config.planner.batch_size}")
        if not 0 <= config.planner.reserved_hbm_fraction < 1:
            raise PlanError("planner.reserved_hbm_fraction must be in [0, 1)")
        if config.planner.patience < 0:
            raise PlanError(f"planner.patience must be >= 0, got {config.planner.patience}")
        self._parts: Dict[Tuple[str, ...], Tuple[Any, ...]] = {}

    def _for(self, tables: Sequence[TableSpec]) -> Tuple[Any, ...]:
        key = tuple(t.name for t in tables)
        if key not in self._parts:
            constraints = table_constraints(tables, self.config)
            model = PlannedModel(tables, self.config.planner.sparse_optimizer)
            with warnings.catch_warnings():  # a FutureWarning about dense estimates: none here
                warnings.simplefilter("ignore", FutureWarning)
                reservation = HeuristicalStorageReservation(
                    percentage=self.config.planner.reserved_hbm_fraction)
            enumerator = EmbeddingEnumerator(self.topology, self.config.planner.batch_size,
                                             constraints)
            self._parts[key] = (constraints, model, reservation, enumerator, _sharders())
        return self._parts[key]

    def reserved(self, tables: Sequence[TableSpec]) -> Topology:
        """The topology less TorchRec's reservation: what is left for ``tables``."""
        constraints, model, reservation, _, sharders = self._for(tables)
        return reservation.reserve(self.topology, self.config.planner.batch_size, model,
                                   sharders, constraints)

    def search_space(self, tables: Sequence[TableSpec]) -> Dict[str, List[ShardingOption]]:
        """Every table's sharding options, with their storage and perf estimates."""
        _, model, _, enumerator, sharders = self._for(tables)
        by_table: Dict[str, List[ShardingOption]] = {}
        for option in enumerator.enumerate(model, sharders):
            by_table.setdefault(option.name, []).append(option)
        return by_table

    def plan(self, tables: Sequence[TableSpec]) -> Tuple[ShardingPlan, List[ShardingOption]]:
        """TorchRec's plan of ``tables`` and its sharding options; raises ``PlannerError``
        when they do not fit."""
        constraints, model, reservation, enumerator, sharders = self._for(tables)
        keep = _KeepBestPlan()
        patience = self.config.planner.patience
        planner = EmbeddingShardingPlanner(
            topology=self.topology, batch_size=self.config.planner.batch_size,
            enumerator=enumerator, storage_reservation=reservation,
            proposer=[GreedyProposer(threshold=patience),
                      GreedyProposer(use_depth=False, threshold=patience), UniformProposer()],
            constraints=constraints, stats=[keep], debug=False)
        plan = planner.plan(model, sharders)
        return plan, keep.best_plan


def plan_sharding(config: PlanConfig) -> PlanResult:
    """Plan every described table; those that cannot be placed are listed with the reason."""
    start = time.perf_counter()
    tables = described_tables(config)
    planning = _Planning(config)
    options = planning.search_space(tables)
    reserved = planning.reserved(tables)
    device = reserved.devices[0].storage
    cluster = Storage(hbm=sum(d.storage.hbm for d in reserved.devices),
                      ddr=sum(d.storage.ddr for d in reserved.devices))
    unplaced: List[UnplacedTable] = []
    candidates: List[TableSpec] = []
    for table in tables:
        why = _alone_misfit(options[table.name], device, cluster)
        if why is None:
            candidates.append(table)
        else:
            unplaced.append(UnplacedTable(table, why))
    # Together: leave out the largest (by its smallest option) until the planner places the
    # rest; first while even their smallest options exceed the cluster.
    need = {t.name: min(sum(_storage_totals(o)) for o in options[t.name]) for t in candidates}
    by_size = sorted(candidates, key=lambda t: need[t.name])
    while by_size and sum(need[t.name] for t in by_size) > cluster.hbm + cluster.ddr:
        dropped = by_size.pop()
        unplaced.append(UnplacedTable(dropped, _together_reason(need, dropped, by_size, cluster)))
    plan, best = ShardingPlan({}), []
    while by_size:
        kept_names = {t.name for t in by_size}
        kept = [t for t in candidates if t.name in kept_names]
        try:
            plan, best = planning.plan(kept)
            reserved = planning.reserved(kept)
            break
        except PlannerError as e:
            dropped = by_size.pop()
            unplaced.append(UnplacedTable(dropped, (
                f"does not fit beside the others: the planner found no plan for it and the "
                f"{len(by_size)} tables kept ({e.error_type.value}); it needs at least "
                f"{_gb(need[dropped.name])}, the largest left (the largest tables are left out "
                "first)")))
    specs = {t.name: t for t in tables}
    order = {name: i for i, name in enumerate(specs)}
    return PlanResult(config, plan, _placed(best, plan, specs),
                      sorted(unplaced, key=lambda u: order[u.table.name]),
                      _devices(best, planning.topology, reserved, config.cluster.devices_per_host),
                      time.perf_counter() - start)


def _together_reason(need: Dict[str, int], dropped: TableSpec, kept: Sequence[TableSpec],
                     cluster: Storage) -> str:
    return (f"does not fit beside the others: it needs at least {_gb(need[dropped.name])}, the "
            f"{len(kept)} tables kept {_gb(sum(need[t.name] for t in kept))}, the cluster has "
            f"{_gb(cluster.hbm + cluster.ddr)} HBM + DDR for tables (the largest tables are "
            "left out first)")


# --------------------------------------------------------------------------- report
def _ranks(ranks: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts, run = [], []
    for r in sorted(ranks):
        if run and r == run[-1] + 1:
            run.append(r)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [r]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def summary_lines(result: PlanResult) -> List[str]:
    """The short summary: what was planned, where, memory and perf at their maxima."""
    c = result.config.cluster
    n = len(result.tables) + len(result.unplaced)
    lines = [f"description: {result.config.description}"] if result.config.description else []
    memory = (f"{c.hbm_gb:g} GB HBM, " if c.device == "cuda" else "no HBM, ") + (
        f"{c.ddr_gb_per_host / c.devices_per_host:g} GB DDR")
    lines.append(f"cluster: {c.hosts} x {c.devices_per_host} {c.device} devices (hosts x "
                 f"devices per host) = {c.world_size} ranks; per device {memory}; batch "
                 f"{result.config.planner.batch_size} per rank")
    lines.append(f"placed {len(result.tables)} of {n} tables in {result.seconds:.1f} s; "
                 f"sharding: {_counts(p.sharding_type for p in result.tables)}; kernels: "
                 f"{_counts(p.compute_kernel for p in result.tables)}")
    uvm = [p.table.name for p in result.tables if p.compute_kernel == "fused_uvm_caching"]
    if uvm:
        lines.append(f"on UVM caching (host memory behind an HBM cache): {', '.join(uvm)}")
    if result.devices and result.tables:
        used = [d for d in result.devices if d.hbm or d.ddr]
        top_hbm = max(result.devices, key=lambda d: d.hbm)
        top_ddr = max(result.devices, key=lambda d: d.ddr)
        top_perf = max(result.devices, key=lambda d: d.perf_ms["total"])
        lines.append(f"devices holding tables: {len(used)} of {len(result.devices)}")
        if c.device == "cuda":
            lines.append(f"HBM per device: max {_gb(top_hbm.hbm)} (rank {top_hbm.rank}) of "
                         f"{_gb(top_hbm.hbm_capacity)} ({_gb(top_hbm.hbm_for_tables)} for "
                         f"tables), mean "
                         f"{_gb(sum(d.hbm for d in result.devices) / len(result.devices))}")
        lines.append(f"DDR per device: max {_gb(top_ddr.ddr)} (rank {top_ddr.rank}) of "
                     f"{_gb(top_ddr.ddr_capacity)}, mean "
                     f"{_gb(sum(d.ddr for d in result.devices) / len(result.devices))}")
        mean = sum(d.perf_ms["total"] for d in result.devices) / len(result.devices)
        parts = ", ".join(f"{k} {v:.3g}" for k, v in top_perf.perf_ms.items() if k != "total")
        lines.append(f"perf estimate per iteration: max {result.max_perf_ms:.3g} ms (rank "
                     f"{top_perf.rank}: {parts}), mean {mean:.3g} ms")
    if result.unplaced:
        lines.append(f"do not fit: {len(result.unplaced)} tables "
                     f"({', '.join(u.table.name for u in result.unplaced[:10])}"
                     f"{', ...' if len(result.unplaced) > 10 else ''}), reasons below")
    return lines


def _counts(values) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(Counter(values).items()))


def report_lines(result: PlanResult) -> List[str]:
    """The full report: summary, one line per table, one per device, one per unplaced table."""
    lines = summary_lines(result)
    lines += ["", f"{'table':<24} {'rows':>13} {'dim':>4} {'dtype':>5}  {'sharding':<14} "
                  f"{'kernel':<17} {'ranks':<12} {'HBM':>10} {'DDR':>10}"]
    for p in result.tables:
        t = p.table
        lines.append(f"{t.name:<24} {t.rows:>13,} {t.dim:>4} {t.dtype:>5}  "
                     f"{p.sharding_type:<14} {p.compute_kernel:<17} {_ranks(p.ranks):<12} "
                     f"{_gb(sum(s['hbm_bytes'] for s in p.shards)):>10} "
                     f"{_gb(sum(s['ddr_bytes'] for s in p.shards)):>10}")
    if result.tables:
        lines += ["", f"{'rank':>4} {'host':>4} {'HBM used / for tables / capacity':>36} "
                      f"{'DDR used / capacity':>24} {'perf ms':>8}"]
        for d in result.devices:
            lines.append(f"{d.rank:>4} {d.host:>4} {_gb(d.hbm):>10} / {_gb(d.hbm_for_tables):>10}"
                         f" / {_gb(d.hbm_capacity):>10} {_gb(d.ddr):>11} / "
                         f"{_gb(d.ddr_capacity):>10} {d.perf_ms['total']:>8.3f}")
    for u in result.unplaced:
        lines.append(f"DOES NOT FIT {u.table.name} ({u.table.rows:,} x {u.table.dim} "
                     f"{u.table.dtype}): {u.reason}")
    return lines


def write_plan(result: PlanResult, path: str) -> None:
    """The plan as JSON at ``path``, atomically."""
    with atomic_output(Path(path), overwrite=True) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=1) + "\n")


def run_plan(config: PlanConfig) -> PlanResult:
    """Plan, print the report, write ``config.out``; raises :class:`TablesDoNotFit` (exit
    code 2 from the app) after the report when some table cannot be placed."""
    result = plan_sharding(config)
    print("\n".join(report_lines(result)), flush=True)
    if config.out:
        write_plan(result, config.out)
    if result.unplaced:
        names = [u.table.name for u in result.unplaced]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise TablesDoNotFit(f"{len(names)} of {len(result.tables) + len(names)} tables do not "
                             f"fit the cluster: {shown} (see the report above)")
    return result
