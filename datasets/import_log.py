#!/usr/bin/env python
"""Import your own CSV or Parquet log, described by a feature spec, as an instance log.

    python datasets/import_log.py --source log.csv --spec spec.json --output outputs/data/mylog \
        --user_column userId --ts_column time --list_delimiter '|'

Options: iat_torchrec.data.importer.ImportConfig (the same names as import_log's arguments).
"""

import dataclasses
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from iat_torchrec.config import parse_config  # noqa: E402
from iat_torchrec.data.importer import ImportConfig, import_log  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_config(ImportConfig, argv)
    t0 = time.perf_counter()
    summary = import_log(**dataclasses.asdict(cfg))
    print(summary.format())
    print(f"imported {cfg.source} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
