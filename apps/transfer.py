"""Tokens that travel: the other domain's IAT tokens in the target domain's model, one pipeline
run per cross-domain correlation of the synthetic data, then the gains table and plot.

    python apps/transfer.py --out results/transfer_synthetic.json       # rho 0, 0.5, 1
    python apps/transfer.py --base_config experiments/transfer_movielens.json --correlations \\
        --run_root outputs/transfer-ml --out results/transfer_movielens.json

Every flag is a field of :class:`iat_torchrec.pipeline.transfer.TransferConfig` (``--help``);
the base configs name the two domains (``transfer_data``: the source, ``data``: the target).
"""

from __future__ import annotations

import sys
from typing import List, Optional

from iat_torchrec.config import parse_config
from iat_torchrec.data.errors import report_input_errors
from iat_torchrec.pipeline.runner import StageFailed
from iat_torchrec.pipeline.transfer import TransferConfig, run_transfer


def main(argv: Optional[List[str]] = None) -> int:
    """Run the experiment; an input error is one line on stderr and exit code 2."""
    return report_input_errors(_run, argv)


def _run(argv: List[str]) -> int:
    try:
        run_transfer(parse_config(TransferConfig, argv))
    except StageFailed as e:
        print(f"\n[transfer] {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
