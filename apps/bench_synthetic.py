"""Benchmark the synthetic instance-log generator (run by hand).

    python apps/bench_synthetic.py [--num_instances 2000000] [--num_sparse_fields 26] ...

Measures instances/s of generation alone (in the calling thread and with the configured worker
threads) and of generation plus the Parquet write through ``LogWriter``, and compares each with a
reference measured in the same run on the same machine:

- ``numpy``: drawing as many uniform random float64 values as the log has sparse + dense values
  (one ``Generator.random`` call per chunk): the cost of the randomness alone;
- ``pyarrow``: writing an equally sized log of pre-made columns (one generated chunk written over
  and over) through the same ``LogWriter``: the cost of the Parquet write alone.

Every flag of ``SyntheticConfig`` is accepted; ``--tmp_dir`` picks where the logs are written.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

try:
    import iat_torchrec  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iat_torchrec.config import add_config_arguments
from iat_torchrec.data.log import LogWriter
from iat_torchrec.data.synthetic import (
    CHUNK_ROWS,
    SyntheticConfig,
    feature_spec,
    generate,
    iter_tables,
)

from iat_torchrec.benchmark import best_time


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_config_arguments(parser, SyntheticConfig)
    parser.set_defaults(num_instances=2_000_000)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs (default 2)")
    parser.add_argument("--tmp_dir", default=None, help="where to write the logs (default: a "
                                                        "temporary directory, removed after)")
    ns = vars(parser.parse_args(argv))
    repeat, tmp_dir = ns.pop("repeat"), ns.pop("tmp_dir")
    cfg = SyntheticConfig(**ns)
    n = cfg.num_instances
    values = cfg.num_sparse_fields + cfg.num_dense_fields
    spec = feature_spec(cfg)
    print(f"synthetic generator: {n:,} instances, {cfg.num_sparse_fields} sparse + "
          f"{cfg.num_dense_fields} dense fields, {cfg.num_users:,} users, {cfg.num_items:,} items, "
          f"threads {cfg.threads}; best of {repeat}")

    # ------------------------------------------------------------------ references
    def numpy_draws() -> None:
        rng = np.random.default_rng(0)
        left = n
        while left:
            k = min(left, CHUNK_ROWS)
            rng.random(k * values)
            left -= k

    first = next(iter_tables(SyntheticConfig(**{**ns, "num_instances": min(n, CHUNK_ROWS)})))

    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        counter = iter(range(10**9))

        def fresh() -> Path:
            return Path(tmp) / f"log-{next(counter)}"

        def pyarrow_write() -> None:
            with LogWriter(fresh(), spec, rows_per_file=cfg.rows_per_file) as w:
                left = n
                while left:
                    k = min(left, first.num_rows)
                    w.write(first.slice(0, k))
                    left -= k

        def gen(threads: int) -> Callable[[], None]:
            def run() -> None:
                for _ in iter_tables(cfg, threads=threads):
                    pass
            return run

        t_numpy = best_time(numpy_draws, repeat)
        t_write = best_time(pyarrow_write, repeat)
        t_gen0 = best_time(gen(0), repeat)
        t_gen = best_time(gen(cfg.threads), repeat)
        t_all = best_time(lambda: generate(cfg, fresh()), repeat)

    rows: List[Tuple[str, float, str, float]] = [
        (f"numpy: draw {values} random floats per instance", t_numpy, "", 0.0),
        ("pyarrow: write equal pre-made columns (LogWriter)", t_write, "", 0.0),
        ("generate, calling thread only", t_gen0, "numpy", t_numpy),
        (f"generate, {cfg.threads} worker thread(s)", t_gen, "numpy", t_numpy),
        ("generate + write Parquet (generate())", t_all, "pyarrow", t_write),
    ]
    print(f"\n{'what':<52} {'seconds':>8} {'instances/s':>13}  {'vs reference':>18}")
    for what, t, ref, t_ref in rows:
        ratio = f"{t_ref / t:.2f}x {ref}" if ref else "(reference)"
        print(f"{what:<52} {t:8.2f} {n / t:13,.0f}  {ratio:>18}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
