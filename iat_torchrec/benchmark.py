"""What the benchmark apps (``apps/bench_*.py``) share: pinning to one core, best-of-N timing,
the device's limits measured in the same run (matmul rate, copy bandwidth) and the roofline,
Markdown rate tables, the results file, the Criteo-shaped log. Importing it needs PyTorch only (the pure-PyTorch
benchmarks run where nothing else is installed): pyarrow and the data package load on use."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch


def pin_one_core() -> None:
    """Run this process, torch and pyarrow (where installed) on one core (per-core rates)."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    try:
        import pyarrow as pa
    except ImportError:
        return
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


Clock = Callable[[], float]


def best_in_turns(runs: Sequence[Callable[[], object]], repeats: int,
                  clock: Clock = time.perf_counter, warmup: bool = False,
                  sync: Optional[Callable[[], None]] = None) -> List[float]:
    """Best ``clock`` seconds of each of ``runs`` over ``repeats`` rounds in which the runs take
    turns, so that load from other jobs on a shared machine hits them alike. ``warmup``: one
    untimed run of each first (page faults, allocator, kernel caches); ``sync`` (a device
    synchronisation) is called after every run, inside the timed span."""
    sync = sync or (lambda: None)
    if warmup:
        for run in runs:
            run()
            sync()
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for k, run in enumerate(runs):
            start = clock()
            run()
            sync()
            best[k] = min(best[k], clock() - start)
    return best


def best_time(run: Callable[[], object], repeats: int, **kwargs) -> float:
    """Best seconds of ``run`` over ``repeats`` runs (options of :func:`best_in_turns`)."""
    return best_in_turns([run], repeats, **kwargs)[0]


def device_time(step: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall seconds of ``step`` on ``device`` over ``repeats`` runs, after one warm-up run
    (CUDA: synchronised)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return best_time(step, repeats, warmup=True, sync=sync)


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """FLOP/s of an n x n by n x n matrix product (the device's practical peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2.0 * n ** 3 / device_time(lambda: torch.mm(a, b), repeats, device)


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int) -> float:
    """Bytes/s of copying a tensor of ``nbytes`` (bytes read + bytes written)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / device_time(lambda: dst.copy_(src), repeats, device)


@dataclasses.dataclass(frozen=True)
class Limits:
    """The device's limits measured in the run: matmul FLOP/s and copy bytes/s."""

    matmul_flops: float
    copy_bytes: float

    @classmethod
    def measure(cls, device: torch.device, repeats: int, dtype: torch.dtype = torch.float32,
                matmul_size: int = 0, copy_bytes: int = 1 << 28) -> "Limits":
        """Matmul of side ``matmul_size`` (0: 2048 on CPU, 8192 on GPU), copy of 256 MiB."""
        size = matmul_size or (8192 if device.type == "cuda" else 2048)
        return cls(matmul_rate(size, dtype, device, repeats),
                   copy_bandwidth(copy_bytes, device, repeats))

    def roofline(self, flops: float, nbytes: float) -> float:
        """Attainable FLOP/s at ``flops`` / ``nbytes``: min(matmul rate, bandwidth x
        intensity)."""
        return min(self.matmul_flops, self.copy_bytes * flops / nbytes)

    def describe(self) -> str:
        return (f"matmul {self.matmul_flops / 1e9:,.1f} GFLOP/s, copy "
                f"{self.copy_bytes / 1e9:,.1f} GB/s (read + written)")


ROOFLINE_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("samples/s", ">10,.0f"), ("MFLOP / sample", ">14,.2f"), ("kB / sample", ">11,.1f"),
    ("GFLOP/s", ">8.2f"), ("GB/s", ">6.2f"), ("x roofline", ">10.3f"))


def roofline_cells(samples_per_s: float, flops_per_sample: float, bytes_per_sample: float,
                   limits: Limits) -> Tuple[float, ...]:
    """The cells of :data:`ROOFLINE_COLUMNS` for one measured rate and its per-sample cost."""
    flops, nbytes = samples_per_s * flops_per_sample, samples_per_s * bytes_per_sample
    return (samples_per_s, flops_per_sample / 1e6, bytes_per_sample / 1e3, flops / 1e9,
            nbytes / 1e9, flops / limits.roofline(flops_per_sample, bytes_per_sample))


def import_seconds(modules: Sequence[str], repeats: int) -> float:
    """Best wall seconds of a fresh Python process that imports ``modules`` and exits (the
    start-up that every stage process pays)."""
    code = "; ".join(f"import {m}" for m in modules)

    def run() -> None:
        subprocess.run([sys.executable, "-c", code], check=True)
    return best_time(run, repeats)


_SPEC = re.compile(r"([<>^]?)(\d+)")


def benchmark_results(config: Any, out: str, **fields: Any) -> Dict[str, Any]:
    """A benchmark's results: date, machine, CPUs, its ``config`` (a dataclass) and ``fields``,
    written as JSON to ``out`` (atomically; nothing when empty)."""
    from iat_torchrec.atomic import atomic_output
    from iat_torchrec.config import to_dict

    result = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
              "cpus": os.cpu_count(), "config": to_dict(config), **fields}
    if out:
        with atomic_output(out, overwrite=True) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
    return result


def markdown_table(columns: Sequence[Tuple[str, str]], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table of fixed-width columns, each ``(title, format spec)``: the spec starts
    with an alignment and a width (``"<52"``, ``">12,.0f"``); a string cell is only aligned."""
    heads = [_SPEC.match(spec) for _, spec in columns]
    for (title, spec), m in zip(columns, heads):
        if m is None:
            raise ValueError(f"column {title!r}: format spec {spec!r} has no width")

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    out = [line([format(title, m.group(0)) for (title, _), m in zip(columns, heads)]),
           "|" + "|".join("-" * (int(m.group(2)) + 2) for m in heads) + "|"]
    for row in rows:
        out.append(line([format(v, m.group(0) if isinstance(v, str) else spec)
                         for v, (_, spec), m in zip(row, columns, heads)]))
    return "\n".join(out)


def rate_table(rates: Sequence[Tuple[str, float]], ref: float, what_width: int) -> str:
    """The table of instances/s, each against the reference rate ``ref``."""
    return markdown_table([("what", f"<{what_width}"), ("instances/s", ">12,.0f"),
                           ("x reference", ">11.2f")],
                          [(name, rate, rate / ref) for name, rate in rates])


def criteo_shaped_log(num_instances: int, path: Path) -> Path:
    """A synthetic instance log of Criteo's shape (26 sparse + 13 dense fields) at ``path``."""
    from iat_torchrec.data.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(num_instances=num_instances, num_sparse_fields=26,
                                    num_dense_fields=13), path)
