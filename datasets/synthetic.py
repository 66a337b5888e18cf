"""Generate the default synthetic instance log, validate it and print its summary.

    python datasets/synthetic.py --out data/synthetic --num_instances 1000000

Every flag is a field of :class:`iat_torchrec.data.synthetic.SyntheticConfig` (``--help``); the
generative process is documented in :mod:`iat_torchrec.data.synthetic`. This script only wires the
library together; ``datasets/`` is not a Python package.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from iat_torchrec.config import add_config_arguments
from iat_torchrec.data.errors import report_input_errors
from iat_torchrec.data.log import validate_log
from iat_torchrec.data.synthetic import SyntheticConfig, generate


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code 0, or 2 after an input error such as an existing output (one line on stderr;
    ``--debug`` shows its traceback)."""
    return report_input_errors(_generate, argv)


def _generate(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_config_arguments(parser, SyntheticConfig)
    ns = vars(parser.parse_args(argv))
    out, overwrite = ns.pop("out"), ns.pop("overwrite")
    try:
        config = SyntheticConfig(**ns)
    except ValueError as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    path = generate(config, out, overwrite=overwrite)
    dt = time.perf_counter() - t0
    print(f"generated {config.num_instances:,} instances in {dt:.1f} s "
          f"({config.num_instances / dt:,.0f} instances/s, Parquet write included)")
    summary = validate_log(path)
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
