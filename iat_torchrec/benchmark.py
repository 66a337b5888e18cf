"""Helpers for the benchmark apps (``apps/bench_*.py``)."""

from __future__ import annotations

import os

import pyarrow as pa
import torch


def pin_one_core() -> None:
    """Run this process, torch and pyarrow on one core (for per-core rates)."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
