"""The evaluation stage: the downstream runs of a pipeline gathered into the comparison table.

    python apps/evaluate.py --runs outputs/pipeline/runs.json
    torchx run -s local_cwd torchx_components/components.py:evaluate \
        --runs outputs/pipeline/runs.json

Prints mean +- std over seeds of test AUC, GAUC and logloss with the relative gains over
DLRM+BST, and writes ``results.md``, ``results.csv``, ``results.png`` and ``summary.json``
beside the index (or to ``--out_dir``). Every flag is a field of
:class:`iat_torchrec.pipeline.report.EvaluateConfig` (``--help``).
"""

from __future__ import annotations

import sys
from typing import List, Optional

from iat_torchrec.config import parse_config
from iat_torchrec.pipeline.report import EvaluateConfig, run_evaluate


def main(argv: Optional[List[str]] = None) -> int:
    run_evaluate(parse_config(EvaluateConfig, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
