"""Stage 1a: train the IAT source model and compress instances into a token store.

    python apps/compress.py --train_log .../train --valid_log .../valid --store outputs/tokens
    torchrun --nproc_per_node 2 apps/compress.py ...          # 2 processes (gloo on CPU)
    torchx run -s local_cwd torchx_components/components.py:compress --train_log ... -j 1x2

Every flag is a field of :class:`iat_torchrec.stages.compress.CompressConfig` (``--help``).
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

from iat_torchrec.config import parse_config
from iat_torchrec.stages.compress import CompressConfig, run_compress


def main(argv: Optional[List[str]] = None) -> int:
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    run_compress(parse_config(CompressConfig, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
