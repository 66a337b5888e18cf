"""Sequence assembly: the history offsets of every sample of a target log, as shards.

    python apps/assemble.py --target_log outputs/data/ml-p1/test --store outputs/tokens/iat \
        --output outputs/history/test --max_len 256
    torchrun --nproc_per_node 4 apps/assemble.py ...    # partitioned by user over 4 processes
    torchx run -s local_cwd torchx_components/components.py:assemble -j 1x4 ...

Every flag is a field of :class:`iat_torchrec.stages.assemble.AssembleConfig` (``--help``).
Under torchrun (``WORLD_SIZE`` > 1) the processes form a gloo group, each assembles the samples
of its users, and rank 0 publishes the shards once all parts are complete.
"""

from __future__ import annotations

import functools
import sys

from iat_torchrec.stages.assemble import AssembleConfig, run_assemble
from iat_torchrec.stages.cli import stage_main

main = functools.partial(stage_main, AssembleConfig, run_assemble)


if __name__ == "__main__":
    sys.exit(main())
