#!/usr/bin/env python
"""Split an instance log into time-respecting train/valid/test logs.

    # Protocol P1 (per user, chronological 80/10/10):
    python datasets/split_log.py --source outputs/data/ml-latest-small \
        --output outputs/data/ml-latest-small-p1
    # global time cut at the 80% and 90% quantiles of ts:
    python datasets/split_log.py --source LOG --output OUT --method time --quantiles 0.8 0.9

Options: iat_torchrec.data.splits.SplitConfig (the same names as split_log's arguments).
"""

import sys

from _common import run_config  # first: puts the repository on sys.path

from iat_torchrec.data.splits import SplitConfig, split_log


def main(argv=None) -> int:
    return run_config(SplitConfig, split_log, "split {cfg.source} -> {cfg.output}", argv)


if __name__ == "__main__":
    sys.exit(main())
