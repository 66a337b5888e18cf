"""End-to-end comparison of every downstream variant over seeds and datasets.

    python apps/compare.py                    # synthetic + ml-latest-small, seeds 0 1 2
    python apps/compare.py --datasets movielens --seeds 0 1 2 --epochs 3
    python apps/compare.py --datasets synthetic --num_instances 200000 --out_dir outputs/cmp

Variants: DLRM, DLRM+DIN, DLRM+BST, IAT temporal-order, IAT user-order, SIF, SIF over IAT
tokens. The source models and the tokenizer train on the training window only; every variant is
evaluated on the later test split (the epoch with the best valid AUC). Prints mean +- std of
test AUC, GAUC and logloss with relative gains over DLRM+BST and writes ``results.csv``,
``results.md``, ``results.png`` and ``summary.json`` to ``--out_dir``; intermediate outputs go
to ``<out_dir>/work/<dataset>/seed<k>/`` and a re-run skips what exists.

Every flag is a field of :class:`iat_torchrec.stages.compare.CompareConfig` (``--help``).
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

from iat_torchrec.config import parse_config
from iat_torchrec.stages.compare import CompareConfig, run_compare


def main(argv: Optional[List[str]] = None) -> int:
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    run_compare(parse_config(CompareConfig, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
