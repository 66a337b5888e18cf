"""Benchmark: instances/s from an instance log into TorchRec batches, on one core.

    python apps/bench_reader.py [--num_instances 2000000] [--batch_size 8192]

Generates a synthetic log of 26 sparse + 13 dense fields (Criteo's shape), then times, in the
same run and on the same core:

- the reference: pyarrow decoding every row group of the Parquet files (the floor of any Parquet
  reader, no batches made);
- TorchRec's own ``InMemoryBinaryCriteoIterDataPipe`` making ``Batch`` objects from the same rows
  held in memory as Criteo-format NumPy arrays (no file decoding at all; the one multi-valued
  field is cut to its first id, as Criteo fields are single-valued);
- ``InstanceLogReader`` in each order (Parquet decoding included).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iat_torchrec.benchmark import best_time, criteo_shaped_log, pin_one_core, rate_table
from iat_torchrec.config import parse_config
from iat_torchrec.data.log import log_files
from iat_torchrec.data.reader import InstanceLogReader, ReaderConfig, ReadOrder
from iat_torchrec.data.spec import FeatureSpec



@dataclasses.dataclass
class BenchReaderConfig:
    """Reader benchmark."""

    num_instances: int = dataclasses.field(default=2_000_000, metadata={"help": "rows"})
    batch_size: int = dataclasses.field(default=8192, metadata={"help": "rows per batch"})
    repeats: int = dataclasses.field(default=3, metadata={"help": "timed runs (best kept)"})
    work_dir: str = dataclasses.field(default="", metadata={"help": "scratch dir (default tmp)"})


def _best_rate(rows: int, run: Callable[[], int], repeats: int) -> float:
    def checked() -> None:
        seen = run()
        assert seen == rows, f"read {seen} rows, expected {rows}"
    return rows / best_time(checked, repeats)


def _count(batches: Iterable) -> int:
    return sum(int(b.labels.shape[0]) for b in batches)


def _first_id(lists: pa.ListArray) -> np.ndarray:
    """The first id of each list, 0 for an empty list."""
    offsets = lists.offsets.to_numpy()
    values = np.r_[lists.values.to_numpy(), 0]
    return np.where(np.diff(offsets) > 0, values[offsets[:-1]], 0)


def _criteo_arrays(log: Path, spec: FeatureSpec, out: Path) -> Tuple[str, str, str]:
    """The log as Criteo npy files: dense float32 [N, 13], sparse int32 [N, 26], labels [N, 1]."""
    table = pa.concat_tables(pq.read_table(f) for f in log_files(log))
    dense = np.stack([table[f.name].to_numpy() for f in spec.dense], axis=1)
    sparse = np.stack([_first_id(table[f.name].combine_chunks()) if f.multi_valued
                       else table[f.name].to_numpy() for f in spec.sparse], axis=1)
    sparse = (sparse % np.iinfo(np.int32).max).astype(np.int32)
    labels = table[spec.labels[0]].to_numpy().astype(np.int32).reshape(-1, 1)
    paths = tuple(str(out / f"day_0_{k}.npy") for k in ("dense", "sparse", "labels"))
    for p, a in zip(paths, (dense, sparse, labels)):
        np.save(p, a)
    return paths


def main(argv: List[str] = None) -> None:
    cfg = parse_config(BenchReaderConfig, argv)
    from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe

    with tempfile.TemporaryDirectory(dir=cfg.work_dir or None) as tmp:
        tmp = Path(tmp)
        log = criteo_shaped_log(cfg.num_instances, tmp / "log")
        spec = FeatureSpec.load(log)
        dense, sparse, labels = _criteo_arrays(log, spec, tmp)
        pin_one_core()
        n = cfg.num_instances

        def torchrec_reference() -> int:
            pipe = InMemoryBinaryCriteoIterDataPipe(
                stage="train", dense_paths=[dense], sparse_paths=[sparse],
                labels_paths=[labels], batch_size=cfg.batch_size, rank=0, world_size=1)
            return _count(pipe)

        def pyarrow_decode() -> int:
            rows = 0
            for f in log_files(log):
                pf = pq.ParquetFile(f)
                for g in range(pf.num_row_groups):
                    rows += pf.read_row_group(g).num_rows
            return rows

        def ours(order: ReadOrder) -> Callable[[], int]:
            config = ReaderConfig(batch_size=cfg.batch_size, order=order)
            return lambda: _count(InstanceLogReader(log, spec, config, tmp_dir=tmp))

        rows = [("pyarrow: decode all row groups, no batches (reference)", pyarrow_decode),
                ("torchrec InMemoryBinaryCriteoIterDataPipe, rows already in memory",
                 torchrec_reference)]
        rows += [(f"InstanceLogReader order={o.value}", ours(o)) for o in ReadOrder]
        rates = [(name, _best_rate(n, fn, cfg.repeats)) for name, fn in rows]

    ref = rates[0][1]
    print(f"\nreader benchmark: {n:,} instances, 26 sparse + 13 dense fields, batch "
          f"{cfg.batch_size}, one core, best of {cfg.repeats}")
    print(rate_table(rates, ref, what_width=66))


if __name__ == "__main__":
    main()
