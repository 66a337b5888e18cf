"""Sharding plan, DistributedModelParallel and optimizers, the TorchRec way.

Tables are built on the meta device; ``EmbeddingShardingPlanner`` plans them under the
configured constraints; ``DistributedModelParallel`` shards them; the sparse optimizer
(row-wise Adagrad by default; Adam or SGD) is fused into backward with
``apply_optimizer_in_backward`` and combined with a dense optimizer, as in TorchRec's DLRM
example. The same code runs on CPU with gloo and on CUDA
with nccl: the device is a parameter.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torch.distributed.tensor import DTensor
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import (CacheParams, EmbeddingModuleShardingPlan,
                                        ParameterSharding, ShardingPlan, ShardingType)
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from iat_torchrec.distributed.collectives import DistEnv

CPU_SHARDING_TYPES = ("table_wise", "column_wise", "data_parallel")
CUDA_SHARDING_TYPES = ("table_wise", "column_wise", "row_wise", "table_row_wise",
                       "data_parallel")
# The default keeps every table row whole on one rank and every table on FBGEMM's fused
# row-wise Adagrad, so results do not depend on the process count: data-parallel tables are
# trained by a different (non-fused) implementation, and column-wise shards keep a separate
# row-wise optimizer state per column slice. Ask for those types explicitly when needed.
DEFAULT_SHARDING_TYPES = {"cpu": ("table_wise",), "cuda": ("table_wise", "row_wise",
                                                            "table_row_wise")}


@dataclasses.dataclass
class ShardingConfig:
    """Where and how embedding tables are sharded and trained."""

    device: str = dataclasses.field(default="cpu", metadata={"help": "cpu or cuda"})
    sharding_types: List[str] = dataclasses.field(default_factory=list, metadata={
        "help": "sharding types the planner may use (table_wise, column_wise, row_wise, "
                "table_row_wise, data_parallel; row-wise ones need CUDA); empty: those that "
                "keep rows whole (table_wise on CPU; table_wise, row_wise, table_row_wise on "
                "CUDA), so results do not depend on the number of processes"})
    uvm_caching: bool = dataclasses.field(default=False, metadata={
        "help": "CUDA: keep tables in host memory with an HBM cache (fused_uvm_caching)"})
    sparse_optimizer: str = dataclasses.field(default="rowwise_adagrad", metadata={
        "help": "optimizer fused into the tables' backward (FBGEMM): rowwise_adagrad | sgd | "
                "adam (on CPU only with sharding_types data_parallel)"})
    sparse_lr: float = dataclasses.field(default=0.05, metadata={
        "help": "learning rate of the fused table optimizer"})
    dense_lr: float = dataclasses.field(default=1e-3, metadata={
        "help": "learning rate of Adam on the dense parameters"})
    plan_file: str = dataclasses.field(default="", metadata={
        "help": "a sharding plan saved by apps/plan.py --out (planned for this run's feature "
                "spec, world size and device): its tables' shardings are used instead of "
                "planning; empty: TorchRec's planner plans on the live process group"})


# The table optimizers: the torch / torchrec class TorchRec maps to an FBGEMM kernel. FBGEMM's
# CPU kernels fuse row-wise Adagrad and SGD only; Adam runs on CPU for data-parallel tables
# (TorchRec then applies it in the backward as a plain optimizer).
SPARSE_OPTIMIZERS = {"rowwise_adagrad": RowWiseAdagrad, "adam": torch.optim.Adam,
                     "sgd": torch.optim.SGD}
CPU_FUSED_OPTIMIZERS = ("rowwise_adagrad", "sgd")


def planner_constraints(tables: List[str], config: ShardingConfig,
                        device: torch.device) -> Dict[str, ParameterConstraints]:
    """The planner's per-table constraints from the config (checked against the device)."""
    supported = CUDA_SHARDING_TYPES if device.type == "cuda" else CPU_SHARDING_TYPES
    types = list(config.sharding_types) or list(DEFAULT_SHARDING_TYPES[device.type])
    bad = [t for t in types if t not in supported]
    if bad:
        raise ValueError(f"sharding types {bad} are not supported on {device.type} "
                         f"(supported: {list(supported)})")
    for t in types:
        ShardingType(t)  # a known TorchRec name
    kernels = None
    if config.uvm_caching:
        if device.type != "cuda":
            raise ValueError("uvm_caching needs CUDA")
        kernels = ["fused_uvm_caching"]
    return {name: ParameterConstraints(sharding_types=types, compute_kernels=kernels)
            for name in tables}


def shard_model(model: nn.Module, env: DistEnv, config: ShardingConfig, batch_size: int
                ) -> Tuple[DistributedModelParallel, CombinedOptimizer]:
    """Plan, shard and wrap ``model``; returns the DMP model and its combined optimizer.

    Every ``EmbeddingBagCollection`` of ``model`` gets ``config.sparse_optimizer`` fused into
    its backward; everything else is trained by Adam (data parallel).
    """
    if config.sparse_optimizer not in SPARSE_OPTIMIZERS:
        raise ValueError(f"sparse_optimizer must be one of {list(SPARSE_OPTIMIZERS)}, "
                         f"got {config.sparse_optimizer!r}")
    if (env.device.type == "cpu" and config.sparse_optimizer not in CPU_FUSED_OPTIMIZERS
            and list(config.sharding_types) != ["data_parallel"]):
        raise ValueError(f"sparse_optimizer {config.sparse_optimizer} has no fused CPU kernel in "
                         f"FBGEMM (CPU: {list(CPU_FUSED_OPTIMIZERS)}); on CPU use it with "
                         "sharding_types data_parallel")
    tables: Dict[str, List[str]] = {}  # module path -> its tables
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            apply_optimizer_in_backward(SPARSE_OPTIMIZERS[config.sparse_optimizer],
                                        module.parameters(), {"lr": config.sparse_lr})
            tables[path] = [t.name for t in module.embedding_bag_configs()]
    if config.plan_file:
        plan = saved_plan(config.plan_file, tables, env)
    else:
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=env.world_size, local_world_size=env.world_size
                              if env.device.type == "cpu" else torch.cuda.device_count(),
                              compute_device=env.device.type),
            batch_size=batch_size,
            constraints=planner_constraints([t for ts in tables.values() for t in ts], config,
                                            env.device),
            debug=False,
        )
        plan = planner.collective_plan(model, get_default_sharders(), dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=env.device, plan=plan)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=config.dense_lr))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def parameter_sharding(entry: Dict[str, Any]) -> ParameterSharding:
    """TorchRec's ``ParameterSharding`` of one table of a saved plan (``apps/plan.py --out``:
    sharding type, kernel, ranks, shards with offsets / sizes / placement, cache load
    factor)."""
    spec = None
    if entry["shards"]:
        spec = EnumerableShardingSpec([ShardMetadata(s["offsets"], s["sizes"], s["placement"])
                                       for s in entry["shards"]])
    cache = entry.get("cache_load_factor")
    return ParameterSharding(sharding_type=entry["sharding_type"],
                             compute_kernel=entry["compute_kernel"], ranks=entry["ranks"],
                             sharding_spec=spec,
                             cache_params=None if cache is None else CacheParams(
                                 load_factor=cache))


def saved_plan(path: str, tables: Dict[str, List[str]], env: DistEnv) -> ShardingPlan:
    """The sharding plan of ``tables`` (module path -> table names) from a plan saved by
    ``apps/plan.py --out``; a plan for another world size or device, or one that does not
    place every table, is refused naming the file."""
    try:
        saved = json.loads(Path(path).read_text())
        entries = {t["name"]: t for t in saved["tables"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a sharding plan of apps/plan.py --out ({e})") from None
    if saved.get("world_size") != env.world_size or saved.get("compute_device") != \
            env.device.type:
        raise ValueError(f"{path}: planned for {saved.get('world_size')} "
                         f"{saved.get('compute_device')} processes, this run has "
                         f"{env.world_size} {env.device.type}")
    missing = [t for ts in tables.values() for t in ts if t not in entries]
    if missing:
        raise ValueError(f"{path}: no sharding for table(s) {missing[:5]} (plan this run's "
                         "feature spec: apps/plan.py --model.spec <log>/feature_spec.json)")
    return ShardingPlan({module: EmbeddingModuleShardingPlan(
        {t: parameter_sharding(entries[t]) for t in names}) for module, names in tables.items()})


def copy_full_state(dmp: DistributedModelParallel, full: Dict[str, torch.Tensor]) -> None:
    """Overwrite the sharded model's parameters with those of an unsharded copy, so that the
    initial weights do not depend on the number of processes or the sharding plan."""
    with torch.no_grad():
        for name, dst in dmp.state_dict().items():
            key = name[len("module."):] if name.startswith("module.") else name
            if key not in full:
                continue
            src = full[key]
            if isinstance(dst, ShardedTensor):
                for shard in dst.local_shards():
                    region = tuple(slice(o, o + n) for o, n in
                                   zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                    shard.tensor.copy_(src[region])
            elif isinstance(dst, DTensor):
                local = dst.to_local()
                offsets = _dtensor_offsets(dst)
                local.copy_(src[tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))])
            else:
                dst.copy_(src.to(dst.device))


def _dtensor_offsets(t: DTensor) -> Tuple[int, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(offsets)
