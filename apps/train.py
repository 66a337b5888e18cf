"""Stage 3: train the downstream model (DLRM_SIF), validate each epoch, test, write results.

    python apps/train.py --train_log .../train --valid_log .../valid --test_log .../test \
        --model.history_source iat --iat_store outputs/tokens/iat --model.item_feature item_id \
        --train_history outputs/history/train --valid_history outputs/history/valid \
        --test_history outputs/history/test --results outputs/results/iat.json
    torchx run -s local_cwd torchx_components/components.py:train --train_log ... -j 1x2

Under ``torchrun`` it runs on every process. Every flag is a (dotted) setting of
:class:`iat_torchrec.stages.train.TrainDownstreamConfig` (``--help``).
"""

from __future__ import annotations

import functools
import sys

from iat_torchrec.stages.cli import stage_main
from iat_torchrec.stages.train import TrainDownstreamConfig, run_train

main = functools.partial(stage_main, TrainDownstreamConfig, run_train)


if __name__ == "__main__":
    sys.exit(main())
