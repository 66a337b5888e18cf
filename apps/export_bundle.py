"""Export a trained downstream model and its stores as a serving bundle.

    W=outputs/pipeline/work/synthetic/seed0
    python apps/export_bundle.py --train_results $W/results_IAT_user-order.json \
        --source_checkpoint $W/checkpoints/iat_user --table_dtype fp32 --output bundles/iat_user

The bundle (:mod:`iat_torchrec.serving.bundle`) holds the model in torchrec.inference's
quantised form, the stores it reads, the feature spec and the variant's config, with every
file's size and SHA-256 in its manifest. Every flag is a setting of
:class:`iat_torchrec.serving.bundle.ExportConfig` (``--help``).
"""

from __future__ import annotations

import functools
import sys

from iat_torchrec.serving.bundle import ExportConfig, export_bundle
from iat_torchrec.stages.cli import stage_main


def run(cfg: ExportConfig) -> None:
    path = export_bundle(cfg)
    print(f"bundle written to {path}")


main = functools.partial(stage_main, ExportConfig, run)


if __name__ == "__main__":
    sys.exit(main())
