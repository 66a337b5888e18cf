"""The data stage on its own: make or import the instance log, validate it, split it in time.

    python apps/prepare_data.py --dataset synthetic --synthetic.num_instances 100000
    torchx run -s local_cwd torchx_components/components.py:prepare_data --dataset movielens

Under ``torchrun`` it runs on every process. Every flag is a (dotted) setting of
:class:`iat_torchrec.stages.prepare.DataConfig` (``--help``).
"""

from __future__ import annotations

import functools
import sys

from iat_torchrec.stages.cli import stage_main
from iat_torchrec.stages.prepare import DataConfig, prepare_data

main = functools.partial(stage_main, DataConfig,
                         lambda config: print(prepare_data(config).format()))


if __name__ == "__main__":
    sys.exit(main())
