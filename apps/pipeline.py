"""The main job: the whole pipeline on the built-in default data, printing its results.

    python apps/pipeline.py                        # synthetic default data
    python apps/pipeline.py --dataset movielens    # ml-latest-small
    python apps/pipeline.py --dataset path/to/log  # your own instance log + feature_spec.json

Stages so far: data (generate or import, validate, split in time). Every flag is a field of
:class:`iat_torchrec.data.prepare.DataConfig` (``--help``).
"""

from __future__ import annotations

import sys
import time
from typing import List, Optional

from iat_torchrec.config import parse_config
from iat_torchrec.data.prepare import DataConfig, prepare_data


def main(argv: Optional[List[str]] = None) -> int:
    cfg = parse_config(DataConfig, argv)
    start = time.perf_counter()
    prepared = prepare_data(cfg)
    print()
    print(prepared.format())
    print(f"\npipeline finished in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
