"""The papers' claims, measured one by one: one pipeline run per arm (the base experiment plus a
few flags), then the table "claim / paper / measured here".

    python apps/ablate.py                                  # every claim on the main job's config
    python apps/ablate.py --claims two_pass sit_labels --out results/ablation.json
    python apps/ablate.py --base_config experiments/movielens_p1.json --base_run_dir outputs/ml-p1

The base arm is the base experiment itself, in ``--base_run_dir`` (the main job's run directory
by default, so its stages are reused); the others run in ``<run_root>/<arm>`` with only the
variants their claims read. The claims over the history length L (SIF against DLRM+BST at
L = 16, 64, 256 and the base L) are also drawn, next to the JSON as ``.png``. Every flag is a
field of :class:`iat_torchrec.pipeline.ablation.AblationConfig` (``--help``); the claims are
:data:`iat_torchrec.pipeline.ablation.CLAIMS`.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from iat_torchrec.config import parse_config
from iat_torchrec.data.errors import report_input_errors
from iat_torchrec.pipeline.ablation import AblationConfig, run_ablation
from iat_torchrec.pipeline.runner import StageFailed


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ablation; an input error is one line on stderr and exit code 2."""
    return report_input_errors(_run, argv)


def _run(argv: List[str]) -> int:
    try:
        run_ablation(parse_config(AblationConfig, argv))
    except StageFailed as e:
        print(f"\n[ablation] {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
