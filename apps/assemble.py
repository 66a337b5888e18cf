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

import sys
import time
from typing import List, Optional

from iat_torchrec.config import parse_config
from iat_torchrec.distributed.collectives import process_group
from iat_torchrec.stages.assemble import AssembleConfig, assemble_history
from iat_torchrec.tokens.shards import HistoryShards


def main(argv: Optional[List[str]] = None) -> int:
    config = parse_config(AssembleConfig, argv)
    with process_group("cpu") as env:
        start = time.perf_counter()
        out = assemble_history(config, env)
    if env.is_main:
        m = HistoryShards.open(out, verify=False).manifest
        n, seconds = m["num_samples"], time.perf_counter() - start
        print(f"history shards  {out}\n"
              f"  target log {m['target_log']}\n"
              f"  store {m['store']['path']} (version {m['store']['version']})\n"
              f"  samples {n:,}   with history {m['num_with_history'] / max(n, 1):.1%}   "
              f"mean length {m['mean_length']:.1f} of {m['max_len']}   "
              f"label delay {m['label_delay_s']} s\n"
              f"  {len(m['parts'])} part(s) from {m['world_size']} process(es) in {seconds:.1f} s "
              f"({n / max(seconds, 1e-9):,.0f} samples/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
