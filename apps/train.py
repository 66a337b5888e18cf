"""Stage 3: train the downstream model (DLRM_SIF), validate each epoch, test, write results.

    python apps/train.py --train_log .../train --valid_log .../valid --test_log .../test \
        --history_source iat --iat_store outputs/tokens/iat --item_feature item_id \
        --train_history outputs/history/train --valid_history outputs/history/valid \
        --test_history outputs/history/test --results outputs/results/iat.json
    torchrun --nproc_per_node 2 apps/train.py ...          # 2 processes (gloo on CPU)
    torchx run -s local_cwd torchx_components/components.py:train --train_log ... -j 1x2

Every flag is a field of :class:`iat_torchrec.stages.train.TrainDownstreamConfig` (``--help``).
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

from iat_torchrec.config import parse_config
from iat_torchrec.stages.train import TrainDownstreamConfig, run_train


def main(argv: Optional[List[str]] = None) -> int:
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    run_train(parse_config(TrainDownstreamConfig, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
