"""The evaluation stage: the downstream runs of a pipeline gathered into the comparison table.

    python apps/evaluate.py --runs outputs/pipeline/runs.json
    torchx run -s local_cwd torchx_components/components.py:evaluate \
        --runs outputs/pipeline/runs.json

Prints mean +- std over seeds of test AUC, GAUC and logloss with the relative gains over
DLRM+BST, and writes ``results.md``, ``results.csv``, ``results.png`` and ``summary.json``
beside the index (or to ``--out_dir``). Every flag is a (dotted) setting of
:class:`iat_torchrec.stages.evaluate.EvaluateConfig` (``--help``).
"""

from __future__ import annotations

import functools
import sys

from iat_torchrec.stages.cli import stage_main
from iat_torchrec.stages.evaluate import EvaluateConfig, run_evaluate

main = functools.partial(stage_main, EvaluateConfig, run_evaluate)


if __name__ == "__main__":
    sys.exit(main())
