"""Benchmark: token lookup rows/s through FBGEMM, on one core.

    python apps/bench_lookup.py [--num_rows 2000000] [--dim 64]

Writes one token store per dtype (fp32, fp16, int8; the same sigmoid tokens), then times, in the
same run and on the same core, looking up ``[batch, L]`` random row ids:

- the reference: ``torch.index_select`` on the same tokens as one fp32 ``[num_rows, dim]`` tensor;
- :class:`InstanceTokenLookup` (FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen``,
  ``PoolingMode.NONE``, fp32 output) for each store dtype;

and, for memory traffic, bytes moved per second (token rows read + fp32 output written) against
a large memory copy (``Tensor.copy_`` of ``copy_mib`` MiB: bytes read + written). Rates are per
CPU-second of the pinned process (``time.process_time``), best of ``repeats`` runs taken in turns.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from iat_torchrec.benchmark import best_in_turns, markdown_table, pin_one_core
from iat_torchrec.config import parse_config
from iat_torchrec.tokens.lookup import InstanceTokenLookup
from iat_torchrec.tokens.store import TokenStore



@dataclasses.dataclass
class BenchLookupConfig:
    """Token-lookup benchmark."""

    num_rows: int = dataclasses.field(default=2_000_000, metadata={"help": "store rows"})
    dim: int = dataclasses.field(default=64, metadata={"help": "token dim d"})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "B"})
    max_len: int = dataclasses.field(default=256, metadata={"help": "L"})
    batches: int = dataclasses.field(default=20, metadata={"help": "batches per timed run"})
    copy_mib: int = dataclasses.field(default=1024, metadata={
        "help": "size of the memory-copy reference"})
    repeats: int = dataclasses.field(default=5, metadata={"help": "timed runs (best kept)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed"})
    work_dir: str = dataclasses.field(default="", metadata={"help": "scratch dir (default tmp)"})


def _each(ids: List[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for i in ids:
        fn(i)


def main(argv: Optional[List[str]] = None) -> None:
    cfg = parse_config(BenchLookupConfig, argv)
    rng = np.random.default_rng(cfg.seed)
    n, d = cfg.num_rows, cfg.dim
    tokens = (1 / (1 + np.exp(-rng.standard_normal((n, d))))).astype(np.float32)
    ids = [torch.from_numpy(rng.integers(0, n, (cfg.batch_size, cfg.max_len)))
           for _ in range(cfg.batches)]
    rows_per_run = cfg.batches * cfg.batch_size * cfg.max_len
    with tempfile.TemporaryDirectory(dir=cfg.work_dir or None) as tmp:
        stores = {}
        for dtype in ("fp32", "fp16", "int8"):
            w = TokenStore.create(Path(tmp) / dtype, kind="iat", token_shape=(d,), dtype=dtype)
            for lo in range(0, n, 1 << 20):
                hi = min(n, lo + (1 << 20))
                w.append(np.arange(lo, hi), np.zeros(hi - lo, np.int64),
                         np.zeros(hi - lo, np.int64), np.zeros(hi - lo), tokens[lo:hi])
            stores[dtype] = w.close()
        pin_one_core()
        weights = torch.from_numpy(tokens)
        names = ["torch.index_select on the fp32 tokens (reference)"]
        row_bytes = [4 * d]
        # Each output is dropped before the next call, as in a training loop, so the allocator
        # reuses one buffer instead of faulting in fresh pages for every batch.
        runs: List[Callable[[], object]] = [
            lambda: _each(ids, lambda i: torch.index_select(weights, 0, i.view(-1)))]
        for dtype, store in stores.items():
            lookup = InstanceTokenLookup(store)
            got = lookup(ids[0])
            want = torch.from_numpy(store.tokens_fp32(ids[0].view(-1).numpy())).view(got.shape)
            assert torch.equal(got, want), dtype
            names.append(f"InstanceTokenLookup (FBGEMM), {dtype} rows")
            row_bytes.append(store.row_bytes)
            runs.append(lambda lookup=lookup: _each(ids, lookup))
        src = torch.ones(cfg.copy_mib << 18, dtype=torch.float32)
        dst = torch.empty_like(src)
        runs.append(lambda: dst.copy_(src))
        # CPU seconds, one warm-up each first (page faults of weights and outputs)
        seconds = best_in_turns(runs, cfg.repeats, clock=time.process_time, warmup=True)
        copy_bps = 2 * src.numel() * 4 / seconds.pop()
        results = list(zip(names, row_bytes, seconds))

    ref = rows_per_run / results[0][2]
    print(f"\nlookup benchmark: {n:,} rows, d = {d}, batches of [{cfg.batch_size}, "
          f"{cfg.max_len}] random row ids, fp32 output, one core, best of {cfg.repeats}")
    table = []
    for name, row_bytes, seconds in results:
        rate = rows_per_run / seconds
        moved = rate * (row_bytes + 4 * d)  # row read + fp32 output row written
        table.append((name, rate, rate / ref, moved / 1e9, moved / copy_bps))
    table.append((f"Tensor.copy_ of {cfg.copy_mib} MiB (memory-copy reference)", "", "",
                  copy_bps / 1e9, 1))
    print(markdown_table([("what", "<52"), ("rows/s", ">12,.0f"), ("x index_select", ">14.2f"),
                          ("GB/s moved", ">10.2f"), ("x memcpy", ">8.2f")], table))


if __name__ == "__main__":
    main()
