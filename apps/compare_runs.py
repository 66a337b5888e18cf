"""Compare two pipeline runs variant by variant: valid / test AUC of each and the change.

    python apps/compare_runs.py --base outputs/pipeline --other outputs/pipeline-2x-data \
        --out results/main_job_twice_the_data.json

Every flag is a field of :class:`iat_torchrec.stages.evaluate.CompareConfig` (``--help``).
"""

from __future__ import annotations

import functools
import sys

from iat_torchrec.stages.cli import stage_main
from iat_torchrec.stages.evaluate import CompareConfig, run_compare

main = functools.partial(stage_main, CompareConfig, run_compare)


if __name__ == "__main__":
    sys.exit(main())
