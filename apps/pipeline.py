"""The main job: the whole pipeline, every stage a TorchX job, ending with the comparison table.

    python apps/pipeline.py --config experiments/main.json   # the main job (CPU sizes), 2 procs
    python apps/pipeline.py --config experiments/main.json --datasets movielens
    python apps/pipeline.py --datasets path/to/log         # your instance log + feature_spec.json
    python apps/pipeline.py --downstream.model.mixer.num_blocks 4 --run_dir outputs/n4

Stages (each through ``torchx_components/components.py`` on ``--scheduler``, default
``local_cwd``): data (make / import, validate, split in time) -> per seed: IAT source models
(temporal, user order) and the HGAQ tokenizer, trained on the train split only, exporting every
split -> history assembly -> one downstream training per variant -> evaluation: test AUC, GAUC
and logloss (mean +- std over seeds, gains over DLRM+BST) in ``<run_dir>/results.{md,csv}``,
``results.png`` and ``summary.json``; each stage's log in ``<run_dir>/logs/``. A re-run skips
the stages whose outputs exist and whose inputs are unchanged, so a run that failed or was
killed resumes where it stopped. Every flag is a (dotted) setting of
:class:`iat_torchrec.pipeline.plan.PipelineConfig` (``--help``): the stage configs' own settings
under ``data.``, ``compress.``, ``tokenize.``, ``assemble.`` and ``downstream.``, with their
defaults (the method's sizes); ``--config FILE`` reads a JSON file of settings first (the run
writes every setting to ``<run_dir>/config.json``, which re-runs it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

from iat_torchrec.config import parse_config
from iat_torchrec.data.errors import report_input_errors
from iat_torchrec.pipeline.plan import PipelineConfig, pipeline_flag_exclusions
from iat_torchrec.pipeline.runner import StageFailed, run_pipeline


def _log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the pipeline; an input error is one line on stderr and exit code 2 (``--debug``: its
    traceback)."""
    return report_input_errors(_run, argv)


def _run(argv: List[str]) -> int:
    cfg = parse_config(PipelineConfig, argv, exclude=pipeline_flag_exclusions())
    run_dir = Path(cfg.run_dir).resolve()
    start = time.perf_counter()
    try:
        run_pipeline(cfg, log=_log)
    except StageFailed as e:
        print(f"\n[pipeline] {e}", file=sys.stderr, flush=True)
        return 1
    print("\n" + (run_dir / "results.md").read_text(), flush=True)
    _log(f"finished in {time.perf_counter() - start:.0f} s; table, plot, summary and per-stage "
         f"logs in {run_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
