#!/usr/bin/env python
"""Import MovieLens ratings as an instance log (one instance per rating, click = rating >= 4).

    python datasets/movielens.py --output outputs/data/ml-latest-small
    python datasets/movielens.py --source /data/ml-1m --output outputs/data/ml-1m --overwrite true

The default source, ../shared/data/ml-latest-small, is resolved relative to the repository root
when it does not exist relative to the current directory. Options: iat_torchrec.data.movielens.
MovieLensConfig (the same names as import_movielens's arguments).
"""

import dataclasses
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from iat_torchrec.config import parse_config  # noqa: E402
from iat_torchrec.data.movielens import (  # noqa: E402
    MovieLensConfig, import_movielens, resolve_source)


def main(argv=None) -> int:
    cfg = parse_config(MovieLensConfig, argv)
    cfg.source = str(resolve_source(cfg.source))
    t0 = time.perf_counter()
    summary = import_movielens(**dataclasses.asdict(cfg))
    print(summary.format())
    print(f"imported {cfg.source} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
