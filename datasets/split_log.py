#!/usr/bin/env python
"""Split an instance log into time-respecting train/valid/test logs.

    # Protocol P1 (per user, chronological 80/10/10):
    python datasets/split_log.py --source outputs/data/ml-latest-small \
        --output outputs/data/ml-latest-small-p1
    # global time cut at the 80% and 90% quantiles of ts:
    python datasets/split_log.py --source LOG --output OUT --method time --quantiles 0.8 0.9

Options: iat_torchrec.data.splits.SplitConfig (the same names as split_log's arguments).
"""

import dataclasses
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from iat_torchrec.config import parse_config  # noqa: E402
from iat_torchrec.data.splits import SplitConfig, split_log  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_config(SplitConfig, argv)
    t0 = time.perf_counter()
    summaries = split_log(**dataclasses.asdict(cfg))
    for name, summary in summaries.items():
        print(f"[{name}]")
        print(summary.format())
    print(f"split {cfg.source} -> {cfg.output} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
