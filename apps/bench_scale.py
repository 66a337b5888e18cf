"""Benchmark: what each rank of a data-parallel job decodes and holds, row_groups vs steps.

    python apps/bench_scale.py [--sizes 1000000 10000000 50000000] [--world_size 2]
        [--orders temporal shuffled] [--work_dir DIR] [--out results/scale.json]

For each size N, one synthetic log (few fields: the reader's own memory is what is measured) is
written once under the work dir (kept there and reused when ``--work_dir`` is given). Then, for
each order and each partition of ``ReaderConfig.partition``, ``world_size`` fresh processes read
their partition once, at the same time, and each reports:

- its peak resident memory (``VmHWM``, its high-water mark reset through
  ``/proc/self/clear_refs`` just before the reader is made, so that the imports' own peak does
  not hide a smaller one; ``ru_maxrss`` is recorded too, but after fork + exec it keeps the
  parent's resident memory at the fork, whatever the child does) and the resident memory at
  that moment (the interpreter with torch, torchrec and pyarrow loaded);
- the rows it read (its share), the rows of the row groups it decoded for batches and for
  planning (keys), and its seconds.

Under row_groups the shuffled order shuffles within windows of ``--shuffle_window`` row group
pieces (0: one permutation of the rank's rows). Each rank process uses pyarrow's
``--arrow_pool`` (system by default: mimalloc, pyarrow's default, keeps the pages it frees).

``bytes / instance`` is the growth over the start divided by the share; ``x steps`` compares
each rank's growth with that of the steps dealing (the default), measured in the same run: every
rank decodes every row group (temporal: the keys of every row group too).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from iat_torchrec.benchmark import benchmark_results, markdown_table
from iat_torchrec.config import parse_config
from iat_torchrec.data.log import read_provenance
from iat_torchrec.data.reader import InstanceLogReader, Partition, ReaderConfig, ReadOrder
from iat_torchrec.data.synthetic import SyntheticConfig, generate, provenance


@dataclasses.dataclass
class BenchScaleConfig:
    """Per-rank memory and decoded rows of the reader over several processes."""

    sizes: List[int] = dataclasses.field(
        default_factory=lambda: [1_000_000, 10_000_000, 50_000_000],
        metadata={"help": "instances of each log"})
    world_size: int = dataclasses.field(default=2, metadata={"help": "processes (ranks)"})
    orders: List[ReadOrder] = dataclasses.field(
        default_factory=lambda: [ReadOrder.TEMPORAL, ReadOrder.SHUFFLED],
        metadata={"help": "orders to read in (temporal | shuffled)"})
    batch_size: int = dataclasses.field(default=8192, metadata={"help": "rows per batch"})
    sparse_fields: int = dataclasses.field(default=2, metadata={
        "help": "sparse fields of the synthetic log (>= 2: user, item_id)"})
    dense_fields: int = dataclasses.field(default=1, metadata={
        "help": "dense fields of the synthetic log"})
    shuffle_window: int = dataclasses.field(default=4, metadata={
        "help": "row_groups, shuffled order: rows shuffled within windows of this many row "
                "group pieces (0: one permutation of the rank's rows)"})
    arrow_pool: str = dataclasses.field(default="system", metadata={
        "help": "pyarrow's memory pool in each rank process (ARROW_DEFAULT_MEMORY_POOL): "
                "system | mimalloc (pyarrow's default on Linux keeps the pages it frees, so "
                "resident memory then also grows with what was read, not only with what is "
                "held)"})
    work_dir: str = dataclasses.field(default="", metadata={
        "help": "where the logs (kept, reused by a later run) and the reader's temporary files "
                "go (default: a temporary directory, removed after)"})
    out: str = dataclasses.field(default="", metadata={
        "help": "JSON file for the table (date, machine, settings, every cell)"})

    def __post_init__(self) -> None:
        if self.arrow_pool not in ("system", "mimalloc", "jemalloc"):
            raise ValueError(f"--arrow_pool must be system, mimalloc or jemalloc, "
                             f"got {self.arrow_pool!r}")


def _peak_rss_mib() -> float:
    """This process's peak resident memory: ``VmHWM`` of ``/proc/self/status`` (Linux), else
    ``ru_maxrss`` (which, after fork + exec, also holds the parent's resident memory at the
    fork, and which resetting does not lower)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reset_peak_rss() -> bool:
    """Set the peak resident memory to the current one (Linux 4.0+); False where that cannot be
    done (the peak then includes the imports' own)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _read_partition(log: str, config: ReaderConfig, rank: int, world_size: int, tmp_dir: str,
                    results: "mp.Queue") -> None:
    """One rank in a fresh process: read its partition once, report what it took."""
    import torch

    torch.set_num_threads(1)
    peak_reset = _reset_peak_rss()
    start_mib = _peak_rss_mib()
    started = time.perf_counter()
    reader = InstanceLogReader(log, config=config, rank=rank, world_size=world_size,
                               tmp_dir=tmp_dir)
    rows = batches = 0
    for batch in reader:
        rows += len(batch)
        batches += 1
    results.put({"rank": rank, "rows": rows, "share": reader.rank_rows, "batches": batches,
                 "rows_decoded": reader.rows_decoded,
                 "key_rows_decoded": reader.key_rows_decoded,
                 "seconds": time.perf_counter() - started,
                 "start_rss_mib": start_mib, "peak_rss_mib": _peak_rss_mib(),
                 "peak_reset": peak_reset,
                 "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _run_ranks(log: Path, config: ReaderConfig, world_size: int, tmp_dir: Path
               ) -> List[Dict[str, Any]]:
    """Every rank at once, each in a fresh process; their reports by rank."""
    ctx = mp.get_context("spawn")  # fresh processes: they read ARROW_DEFAULT_MEMORY_POOL
    results = ctx.Queue()
    procs = [ctx.Process(target=_read_partition,
                         args=(str(log), config, r, world_size, str(tmp_dir), results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    cells = [results.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a rank process exited with code {p.exitcode}")
    return sorted(cells, key=lambda c: c["rank"])


def _log(n: int, cfg: BenchScaleConfig, work: Path) -> Path:
    """The synthetic log of ``n`` instances under ``work``, generated unless already there."""
    synthetic = SyntheticConfig(num_instances=n, num_sparse_fields=cfg.sparse_fields,
                                num_dense_fields=cfg.dense_fields)
    path = work / f"log_{n}_{cfg.sparse_fields}s{cfg.dense_fields}d"
    if path.is_dir() and read_provenance(path) == json.loads(json.dumps(
            provenance(synthetic), default=str)):
        print(f"{n:,} instances: reusing {path}", flush=True)
        return path
    started = time.perf_counter()
    generate(synthetic, path, overwrite=True)
    print(f"{n:,} instances: generated in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def _summary(cells: List[Dict[str, Any]]) -> List[List[Any]]:
    """Per size and order: the largest growth and decoded rows over ranks, steps then
    row_groups, their ratios, and the largest share."""
    rows = []
    for n, order in dict.fromkeys((c["instances"], c["order"]) for c in cells):
        def most(partition: str, key: str) -> Any:
            return max(c[key] for c in cells if (c["instances"], c["order"], c["partition"])
                       == (n, order, partition))
        growth = [most(p.value, "growth_mib") for p in (Partition.STEPS, Partition.ROW_GROUPS)]
        decoded = [most(p.value, "rows_decoded") for p in (Partition.STEPS, Partition.ROW_GROUPS)]
        rows.append([n, order, growth[0], growth[1], growth[1] / max(growth[0], 1e-9),
                     decoded[0], decoded[1], decoded[1] / decoded[0],
                     most(Partition.ROW_GROUPS.value, "share")])
    return rows


def run(cfg: BenchScaleConfig) -> Dict[str, Any]:
    if cfg.world_size < 2:
        raise ValueError(f"--world_size must be >= 2, got {cfg.world_size}")
    if any(o == ReadOrder.USER for o in cfg.orders):
        raise ValueError("--orders: the partition choice applies to temporal and shuffled only")
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = cfg.arrow_pool
    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cells: List[Dict[str, Any]] = []
    try:
        for n in cfg.sizes:
            log = _log(n, cfg, work)
            for order in cfg.orders:
                steps: List[Dict[str, Any]] = []
                for partition in (Partition.STEPS, Partition.ROW_GROUPS):
                    config = ReaderConfig(
                        batch_size=cfg.batch_size, order=order, partition=partition,
                        shuffle_window=cfg.shuffle_window if partition == Partition.ROW_GROUPS
                        else 0)
                    ranks = _run_ranks(log, config, cfg.world_size, work)
                    for c in ranks:
                        growth = c["peak_rss_mib"] - c["start_rss_mib"]
                        c.update(instances=n, order=order.value, partition=partition.value,
                                 growth_mib=growth,
                                 bytes_per_instance=growth * 2 ** 20 / max(c["share"], 1))
                        if partition == Partition.STEPS:
                            c["x_steps"] = 1.0
                        else:
                            c["x_steps"] = growth / max(steps[c["rank"]]["growth_mib"], 1e-9)
                            c["peak_x_steps"] = c["peak_rss_mib"] / steps[c["rank"]][
                                "peak_rss_mib"]
                        if c["rows"] != c["share"]:
                            raise RuntimeError(f"rank {c['rank']} read {c['rows']} rows of its "
                                               f"share of {c['share']}")
                    if partition == Partition.STEPS:
                        steps = ranks
                    cells += ranks
                    print(f"{n:,} {order.value} {partition.value}: done", flush=True)
            if not cfg.work_dir:
                shutil.rmtree(log)
    finally:
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nreader scale benchmark: {cfg.world_size} processes, {cfg.sparse_fields} sparse + "
          f"{cfg.dense_fields} dense fields (+ 3 keys, 1 label), batch {cfg.batch_size}, "
          f"{os.cpu_count()} CPUs")
    print(markdown_table(
        [("instances", ">11,d"), ("order", "<8"), ("partition", "<10"), ("rank", ">4d"),
         ("share", ">11,d"), ("rows decoded", ">12,d"), ("keys decoded", ">12,d"),
         ("peak MiB", ">8,.0f"), ("growth MiB", ">10,.0f"), ("bytes / instance", ">16.1f"),
         ("x steps", ">7.2f"), ("seconds", ">7.1f")],
        [[c["instances"], c["order"], c["partition"], c["rank"], c["share"], c["rows_decoded"],
          c["key_rows_decoded"], c["peak_rss_mib"], c["growth_mib"], c["bytes_per_instance"],
          c["x_steps"], c["seconds"]] for c in cells]))
    print("\nthe rank that took most, row_groups against steps:")
    print(markdown_table(
        [("instances", ">11,d"), ("order", "<8"), ("growth MiB steps", ">16,.0f"),
         ("row_groups", ">10,.0f"), ("x", ">5.2f"), ("rows decoded steps", ">18,d"),
         ("row_groups", ">10,d"), ("x", ">5.2f"), ("share", ">11,d")],
        _summary(cells)))
    return benchmark_results(cfg, cfg.out, fields={"sparse": cfg.sparse_fields,
                                                   "dense": cfg.dense_fields, "keys": 3,
                                                   "labels": 1}, cells=cells)


def main(argv: Sequence[str] = ()) -> int:
    run(parse_config(BenchScaleConfig, list(argv) or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
