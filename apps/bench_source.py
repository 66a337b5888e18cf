"""Benchmark: IAT source-model training and export instances/s against TorchRec's own DLRM.

    python apps/bench_source.py                              # one process
    torchrun --nproc_per_node 2 apps/bench_source.py         # two processes (gloo on CPU)

Generates a synthetic log (26 sparse fields of dim 16 + 13 dense), then trains, in the same run,
with the same tables, batch size, process count, sharding planner, fused row-wise Adagrad and
``TrainPipelineSparseDist``: the reference ``torchrec.models.dlrm.DLRM`` (``DLRMTrain``), the
source model with the temporal-order scheme and with the user-order scheme (Source Instance
Transformer); then times token export (inference over the same rows). Steady-state rates: the
first ``warmup`` steps of each are not timed.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import torch
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from iat_torchrec.config import parse_config
from iat_torchrec.data.reader import InstanceLogReader, ReaderConfig, ReadOrder
from iat_torchrec.data.spec import FeatureSpec
from iat_torchrec.distributed.collectives import barrier, broadcast_object, init_process_group
from iat_torchrec.distributed.sharding import ShardingConfig, shard_model
from iat_torchrec.models.source import Scheme, embedding_tables
from iat_torchrec.stages.compress import CompressConfig, build_source_model, compress_log
from iat_torchrec.train.loop import TrainConfig

from iat_torchrec.benchmark import criteo_shaped_log, rate_table


@dataclasses.dataclass
class BenchSourceConfig:
    """Source-model benchmark."""

    num_instances: int = dataclasses.field(default=300_000, metadata={"help": "rows"})
    batch_size: int = dataclasses.field(default=1024, metadata={"help": "rows per process step"})
    warmup: int = dataclasses.field(default=10, metadata={"help": "untimed first steps"})
    device: str = dataclasses.field(default="cpu", metadata={"help": "cpu or cuda"})
    work_dir: str = dataclasses.field(default="", metadata={"help": "scratch dir (default tmp)"})


def _timed_steps(step: Callable[[], None], warmup: int) -> tuple:
    """Run ``step`` until StopIteration; (timed steps, seconds) after ``warmup`` steps."""
    n, start = 0, None
    while True:
        if n == warmup:
            start = time.perf_counter()
        try:
            step()
        except StopIteration:
            break
        n += 1
    return n - warmup, time.perf_counter() - start


def _as_dlrm_batches(reader: InstanceLogReader, device: torch.device) -> Iterator[Batch]:
    for b in reader:
        yield Batch(b.dense_features, b.sparse_features, b.labels[:, 0]).to(device)


def main(argv: Optional[List[str]] = None) -> None:
    logging.getLogger().setLevel(logging.ERROR)
    cfg = parse_config(BenchSourceConfig, argv)
    env = init_process_group(cfg.device)
    work = broadcast_object(tempfile.mkdtemp(dir=cfg.work_dir or None) if env.is_main else None,
                            env)
    log = Path(work) / "log"
    if env.is_main:
        criteo_shaped_log(cfg.num_instances, log)
    barrier(env)
    spec = FeatureSpec.load(log)
    sharding = ShardingConfig(device=cfg.device)

    def reader(order: ReadOrder) -> InstanceLogReader:
        return InstanceLogReader(log, spec, ReaderConfig(batch_size=cfg.batch_size, order=order,
                                                         drop_last=True),
                                 rank=env.rank, world_size=env.world_size)

    rates = []
    # The reference: TorchRec's DLRM on the same tables.
    torch.manual_seed(0)
    dlrm = DLRMTrain(DLRM(
        embedding_bag_collection=EmbeddingBagCollection(embedding_tables(spec),
                                                        device=torch.device("meta")),
        dense_in_features=len(spec.dense), dense_arch_layer_sizes=[128, 16],
        over_arch_layer_sizes=[256, 128, 1], dense_device=env.device))
    model, opt = shard_model(dlrm, env, sharding, cfg.batch_size)
    pipe = TrainPipelineSparseDist(model, opt, env.device)
    it = _as_dlrm_batches(reader(ReadOrder.TEMPORAL), env.device)
    steps, secs = _timed_steps(lambda: pipe.progress(it), cfg.warmup)
    rates.append(("torchrec DLRM (DLRMTrain), temporal order (reference)", steps, secs))

    for scheme, order in ((Scheme.TEMPORAL, ReadOrder.TEMPORAL), (Scheme.USER, ReadOrder.USER)):
        config = CompressConfig(train_log=str(log), store="unused", scheme=scheme,
                                train=TrainConfig(batch_size=cfg.batch_size),
                                sharding=ShardingConfig(device=cfg.device))
        model, opt = build_source_model(spec, config, env)
        pipe = TrainPipelineSparseDist(model, opt, env.device)
        it = iter(reader(order))
        steps, secs = _timed_steps(lambda: pipe.progress(it), cfg.warmup)
        rates.append((f"IAT source model, {scheme.value}-order training", steps, secs))
        if scheme == Scheme.TEMPORAL:
            pipe.detach()
            start = time.perf_counter()
            rows = len(compress_log(model, str(log), spec, config, env)["instance_id"])
            secs = time.perf_counter() - start
            rates.append(("IAT token export (inference, z only)", rows / cfg.batch_size, secs))

    if env.is_main:
        ref = rates[0][1] * cfg.batch_size / rates[0][2]
        print(f"\nsource-model benchmark: {cfg.num_instances:,} instances, 26 sparse (dim 16) + "
              f"13 dense, batch {cfg.batch_size} per process, {env.world_size} process(es), "
              f"{env.device.type}; instances/s over all processes")
        print(rate_table([(name, steps * cfg.batch_size * env.world_size / secs)
                          for name, steps, secs in rates], ref * env.world_size, what_width=58))


if __name__ == "__main__":
    main()
