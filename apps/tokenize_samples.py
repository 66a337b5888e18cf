"""Stage 1b: train the HGAQ sample tokenizer and export T x M uint8 codes into a token store.

    python apps/tokenize_samples.py --train_log .../train --valid_log .../valid --store out/codes
    torchrun --nproc_per_node 2 apps/tokenize_samples.py ...   # 2 processes (gloo on CPU)
    torchx run -s local_cwd torchx_components/components.py:tokenize --train_log ... -j 1x2

Every flag is a field of :class:`iat_torchrec.stages.tokenize.TokenizeConfig` (``--help``).
(Not named ``tokenize.py``: a script runs with its folder first on the import path, and that
name would then shadow the standard library's ``tokenize`` for every app in this folder.)
"""

import logging
import sys
from typing import List, Optional

from iat_torchrec.config import parse_config
from iat_torchrec.stages.tokenize import TokenizeConfig, run_tokenize


def main(argv: Optional[List[str]] = None) -> int:
    logging.getLogger().setLevel(logging.ERROR)
    run_tokenize(parse_config(TokenizeConfig, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
