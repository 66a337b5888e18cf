"""Stage 1b: train the HGAQ sample tokenizer and export T x M uint8 codes into a token store.

    python apps/tokenize_samples.py --train_log .../train --valid_log .../valid --store out/codes
    torchx run -s local_cwd torchx_components/components.py:tokenize --train_log ... -j 1x2

Under ``torchrun`` it runs on every process. Every flag is a (dotted) setting of
:class:`iat_torchrec.stages.tokenize.TokenizeConfig` (``--help``).
(Not named ``tokenize.py``: a script runs with its folder first on the import path, and that
name would then shadow the standard library's ``tokenize`` for every app in this folder.)
"""

from __future__ import annotations

import functools
import sys

from iat_torchrec.stages.cli import stage_main
from iat_torchrec.stages.tokenize import TokenizeConfig, run_tokenize

main = functools.partial(stage_main, TokenizeConfig, run_tokenize)


if __name__ == "__main__":
    sys.exit(main())
