"""Stage 1a: train the IAT source model and compress instances into a token store.

    python apps/compress.py --train_log .../train --valid_log .../valid --store outputs/tokens
    torchx run -s local_cwd torchx_components/components.py:compress --train_log ... -j 1x2

Under ``torchrun`` it runs on every process. Every flag is a (dotted) setting of
:class:`iat_torchrec.stages.compress.CompressConfig` (``--help``).
"""

from __future__ import annotations

import functools
import sys

from iat_torchrec.stages.cli import stage_main
from iat_torchrec.stages.compress import CompressConfig, run_compress

main = functools.partial(stage_main, CompressConfig, run_compress)


if __name__ == "__main__":
    sys.exit(main())
