"""The data stage on its own: make or import the instance log, validate it, split it in time.

    python apps/prepare_data.py --dataset synthetic --num_instances 100000
    torchx run -s local_cwd torchx_components/components.py:prepare_data --dataset movielens

Every flag is a field of :class:`iat_torchrec.data.prepare.DataConfig` (``--help``).
"""

from __future__ import annotations

import sys
from typing import List, Optional

from iat_torchrec.config import parse_config
from iat_torchrec.data.prepare import DataConfig, prepare_data


def main(argv: Optional[List[str]] = None) -> int:
    print(prepare_data(parse_config(DataConfig, argv)).format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
