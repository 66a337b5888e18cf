"""What the benchmark apps (``apps/bench_*.py``) share: pinning to one core, best-of-N timing,
Markdown rate tables, the Criteo-shaped log. Importing it needs PyTorch only (the pure-PyTorch
benchmarks run where nothing else is installed): pyarrow and the data package load on use."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch


def pin_one_core() -> None:
    """Run this process, torch and pyarrow on one core (for per-core rates)."""
    import pyarrow as pa

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
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


_SPEC = re.compile(r"([<>^]?)(\d+)")


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
