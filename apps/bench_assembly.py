"""Benchmark: sequence assembly against a large token store, on one core.

    python apps/bench_assembly.py [--num_instances 10000000] [--num_samples 2000000]

Builds a store of ``num_instances`` rows (Zipf-like user activity, 90 days of timestamps; tokens
of d = 4, since assembly never reads tokens) and a time-ordered target log of ``num_samples``
samples of those users, then times, in the same run and on one core:

- references: the bare ``np.searchsorted`` of every sample into the 10M-entry key array (the
  binary search any assembly needs), and materialising ``[B, L]`` row ids for every sample with
  plain NumPy broadcasting (the alternative to storing offsets);
- ``UserTimeIndex.query``: (begin, length) of every sample's history, in memory;
- ``assemble_history``: the whole stage (read the target log's key columns, query, write the
  Parquet shards and manifest) in a fresh process, with its peak memory;
- per-batch materialisation of ``[B, L]`` row ids, mask and side information from shard offsets
  by :class:`HistoryMaterializer`, through FBGEMM's jagged operators and densely.

Rates are per CPU-second of the pinned process (``time.process_time``), so that other jobs on a
shared machine do not distort them; the stage's wall time is printed too.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mproc
import queue
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from iat_torchrec.benchmark import pin_one_core
from iat_torchrec.config import parse_config
from iat_torchrec.history import HistoryLayout, HistoryMaterializer
from iat_torchrec.stages.assemble import AssembleConfig, assemble_history
from iat_torchrec.tokens.shards import HistoryShards
from iat_torchrec.tokens.store import TokenStore


@dataclasses.dataclass
class BenchAssemblyConfig:
    """Sequence-assembly benchmark."""

    num_instances: int = dataclasses.field(default=10_000_000, metadata={"help": "store rows"})
    num_users: int = dataclasses.field(default=200_000, metadata={"help": "users"})
    num_samples: int = dataclasses.field(default=2_000_000, metadata={"help": "target samples"})
    max_len: int = dataclasses.field(default=256, metadata={"help": "L"})
    batch_size: int = dataclasses.field(default=8192, metadata={
        "help": "samples per materialised batch"})
    broadcast_samples: int = dataclasses.field(default=200_000, metadata={
        "help": "samples for the NumPy-broadcasting reference (it needs 8 L bytes each)"})
    repeats: int = dataclasses.field(default=3, metadata={"help": "timed runs (best kept)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed"})
    work_dir: str = dataclasses.field(default="", metadata={"help": "scratch dir (default tmp)"})


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def _users_and_ts(cfg: BenchAssemblyConfig, n: int, rng: np.random.Generator
                  ) -> Tuple[np.ndarray, np.ndarray]:
    users = (rng.pareto(1.2, n) * cfg.num_users / 20).astype(np.int64) % cfg.num_users
    return users, rng.integers(1_700_000_000, 1_700_000_000 + 90 * 86400, n)


def _build_store(cfg: BenchAssemblyConfig, path: str, out: "mproc.Queue") -> None:
    """Child process: write the store in chunks of 1M rows (streaming), time it."""
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    w = TokenStore.create(path, kind="iat", token_shape=(4,), dtype="fp32",
                          metadata={"label_delay_s": 3600})
    chunk = 1_000_000
    for lo in range(0, cfg.num_instances, chunk):
        n = min(chunk, cfg.num_instances - lo)
        users, ts = _users_and_ts(cfg, n, rng)
        w.append(np.arange(lo, lo + n), users, ts, rng.integers(0, 2, n),
                 np.zeros((n, 4), np.float32))
    w.close()
    out.put((time.perf_counter() - start, _peak_rss_mib()))


def _assemble(config: AssembleConfig, out: "mproc.Queue") -> None:
    """Child process: the whole stage on one core, timed from inside (no interpreter start)."""
    pin_one_core()
    wall, cpu = time.perf_counter(), time.process_time()
    assemble_history(config)
    out.put((time.process_time() - cpu, time.perf_counter() - wall, _peak_rss_mib()))


def _baseline(out: "mproc.Queue") -> None:
    """Child process: peak memory of the interpreter with this module's imports (torch, FBGEMM,
    TorchRec, pyarrow) and nothing else."""
    out.put((_peak_rss_mib(),))


def _in_child(target: Callable, *args) -> Tuple[float, ...]:
    ctx = mproc.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    while True:
        try:
            result = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{target.__name__} failed with exit code {p.exitcode}")
    p.join()
    return result


def _best(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def main(argv: Optional[List[str]] = None) -> None:
    cfg = parse_config(BenchAssemblyConfig, argv)
    L = cfg.max_len
    with tempfile.TemporaryDirectory(dir=cfg.work_dir or None) as tmp:
        tmp = Path(tmp)
        build_s, build_rss = _in_child(_build_store, cfg, str(tmp / "store"))
        # A time-ordered target log: samples of store users at times inside the window.
        rng = np.random.default_rng(cfg.seed + 1)
        t0 = time.perf_counter()
        store = TokenStore.open(tmp / "store")
        open_s = time.perf_counter() - t0
        users = store.column("user_id", rng.integers(0, store.num_rows, cfg.num_samples))
        _, ts = _users_and_ts(cfg, cfg.num_samples, rng)
        order = np.argsort(ts, kind="stable")
        users, ts = users[order], ts[order]
        (tmp / "target").mkdir()
        pq.write_table(pa.table({"instance_id": np.arange(cfg.num_samples) + 10 ** 12,
                                 "user_id": users, "ts": ts}),
                       tmp / "target" / "part-00000.parquet", row_group_size=131_072)
        config = AssembleConfig(target_log=str(tmp / "target"), store=str(tmp / "store"),
                                output=str(tmp / "history"), max_len=L, label_delay_s=3600,
                                verify_store=False)
        stage_s, stage_wall, stage_rss = _in_child(_assemble, config)
        (base_rss,) = _in_child(_baseline)

        pin_one_core()
        index = store.time_index
        n = cfg.num_samples
        keys = np.asarray(index.keys)
        k1 = index.ts_values.size + 1
        needles = np.searchsorted(index.users, users) * k1 + np.searchsorted(index.ts_values, ts)
        begin, length, _ = index.query(users, ts, L)
        nb = min(cfg.broadcast_samples, n)

        def broadcast() -> None:
            ids = np.asarray(index.rows)[np.minimum(begin[:nb, None] + np.arange(L),
                                                    index.num_positions - 1)]
            ids[np.arange(L) >= length[:nb, None]] = -1

        layout = HistoryLayout(max_len=L, label_delay_s=3600)
        mat = HistoryMaterializer(index, layout)
        shards = HistoryShards.open(config.output)
        B = cfg.batch_size
        nbatch = min(n // B, 64)
        # Batches spread over the whole (time-ordered) target, so lengths are representative.
        starts = np.linspace(0, n - B, nbatch).astype(np.int64)
        batches = [shards.lookup(np.arange(i, i + B) + 10 ** 12) for i in starts]
        for a, b in zip(mat(*batches[0], method="dense").tensors(),
                        mat(*batches[0], method="jagged").tensors()):
            assert torch.equal(a, b)
        rates = [
            ("np.searchsorted of every sample into the key array (reference)",
             n / _best(lambda: np.searchsorted(keys, needles), cfg.repeats)),
            (f"NumPy broadcasting: [B, {L}] row ids for every sample (reference)",
             nb / _best(broadcast, cfg.repeats)),
            ("UserTimeIndex.query: (begin, length) of every sample",
             n / _best(lambda: index.query(users, ts, L), cfg.repeats)),
            ("assemble_history: the whole stage, fresh process (Parquet in/out)", n / stage_s),
            (f"HistoryMaterializer, batch {B}: [B, {L}] ids, mask, side info; jagged",
             nbatch * B / _best(lambda: [mat(*b, method="jagged") for b in batches],
                                cfg.repeats)),
            ("  the same, method=dense (no FBGEMM jagged ops, no host sync)",
             nbatch * B / _best(lambda: [mat(*b, method="dense") for b in batches],
                                cfg.repeats)),
        ]
        store_mib, out_mib = _dir_mib(tmp / "store"), _dir_mib(tmp / "history")
        index_mib = _dir_mib(tmp / "store" / store.manifest["index"])
        mean_len = float(length.mean())

    ref = rates[0][1]
    print(f"\nassembly benchmark: store of {cfg.num_instances:,} instances ({cfg.num_users:,} "
          f"users), {n:,} time-ordered target samples, L = {L} (mean history {mean_len:.0f}), "
          f"one core, best of {cfg.repeats}")
    print(f"| {'what':<70} | {'samples/s':>12} | {'x reference':>11} |")
    print(f"|{'-' * 72}|{'-' * 14}|{'-' * 13}|")
    for name, rate in rates:
        print(f"| {name:<70} | {rate:>12,.0f} | {rate / ref:>11.2f} |")
    print(f"\nstore: {store_mib:,.0f} MiB on disk ({index_mib:,.0f} MiB of it the index), built "
          f"in {build_s:.1f} s ({cfg.num_instances / build_s:,.0f} rows/s), peak RSS "
          f"{build_rss:,.0f} MiB; opened with full checksum verification in {open_s:.2f} s")
    print(f"assemble_history: {stage_s:.2f} CPU s ({stage_wall:.2f} s wall), peak RSS "
          f"{stage_rss:,.0f} MiB = {base_rss:,.0f} MiB interpreter and libraries + "
          f"{stage_rss - base_rss:,.0f} MiB (the store index is {index_mib:,.0f} MiB, "
          f"memory-mapped); shards {out_mib:,.1f} MiB ({out_mib * 2 ** 20 / n:.1f} bytes/sample)")


if __name__ == "__main__":
    main()
