"""The papers' claims, measured one by one: each claim compares one variant of one pipeline run
against another variant (of the same run or of another), over the same seeds.

A run is an *arm*: the base experiment (``--config``) plus a few flags. Arms with the same flags
are one run, and the arm without flags is the base experiment itself, run in ``base_run_dir``
with every variant (for the main job's config: the main job's own run directory, whose stages
are then skipped). Every other arm runs only the variants its claims read, in
``<run_root>/<arm>``. A claim's gap is the mean test AUC (GAUC) of the measured variant minus the
reference's, relative to the reference; it counts as a gain or a loss only beyond twice the
larger of the two seed stds, else "within spread".

Example::

    rows = run_ablation(AblationConfig(claims=["two_pass"]))
    rows[0]["auc_gap_pct"], rows[0]["verdict"]
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

from iat_torchrec.atomic import atomic_output
from iat_torchrec.config import parse_config
from iat_torchrec.pipeline.plan import PipelineConfig, pipeline_flag_exclusions
from iat_torchrec.pipeline.runner import run_pipeline
from iat_torchrec.stages.evaluate import summary_rows


@dataclasses.dataclass(frozen=True)
class Arm:
    """One variant of the run made with ``flags`` on top of the base experiment."""

    variant: str
    flags: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim: ``measured`` against ``reference``, with what the paper reports."""

    name: str
    claim: str
    paper: str
    measured: Arm
    reference: Arm


def _length(n: int) -> Tuple[str, ...]:
    return ("--assemble.max_len", str(n))


CLAIMS: Tuple[Claim, ...] = (
    Claim("user_order", "IAT user-order over temporal-order",
          "user-order +0.24-0.31% AUC over base, temporal-order up to +0.15%",
          Arm("IAT user-order"), Arm("IAT temporal-order")),
    Claim("two_pass", "IAT user-order: two-pass over one-pass source training",
          "source model +0.6% -> +0.8% AUC",
          Arm("IAT user-order", ("--compress.two_pass", "true")), Arm("IAT user-order")),
    Claim("sit_labels", "IAT user-order: matured earlier labels into the SIT (this project)",
          "-", Arm("IAT user-order", ("--compress.model.sit_labels", "true")),
          Arm("IAT user-order")),
    Claim("no_restarts", "SIF: HGAQ without dead-code restarts (anti-collapse off)",
          "-0.14% AUC",
          Arm("SIF", ("--tokenize.model.dead_code_threshold", "0")), Arm("SIF")),
    Claim("sif_l16", "SIF over DLRM+BST at L = 16", "gains grow with L where baselines saturate",
          Arm("SIF", _length(16)), Arm("DLRM+BST", _length(16))),
    Claim("sif_l64", "SIF over DLRM+BST at L = 64", "gains grow with L where baselines saturate",
          Arm("SIF", _length(64)), Arm("DLRM+BST", _length(64))),
    Claim("sif_base_l", "SIF over DLRM+BST at the base experiment's L",
          "gains grow with L where baselines saturate", Arm("SIF"), Arm("DLRM+BST")),
)
CLAIM_NAMES = tuple(c.name for c in CLAIMS)


@dataclasses.dataclass
class AblationConfig:
    """Measure the papers' claims (:data:`CLAIMS`) on a base experiment."""

    config: str = dataclasses.field(default="experiments/main.json", metadata={
        "help": "the base experiment (a pipeline --config file)"})
    claims: List[str] = dataclasses.field(default_factory=lambda: list(CLAIM_NAMES), metadata={
        "help": "claims to measure: " + ", ".join(CLAIM_NAMES)})
    base_run_dir: str = dataclasses.field(default="outputs/pipeline", metadata={
        "help": "run directory of the base experiment (the main job's by default: reused)"})
    run_root: str = dataclasses.field(default="outputs/ablation", metadata={
        "help": "where the other arms run, one directory each"})
    out: str = dataclasses.field(default="", metadata={
        "help": "JSON file for the table (default: <run_root>/ablation.json)"})

    def __post_init__(self) -> None:
        unknown = [c for c in self.claims if c not in CLAIM_NAMES]
        if unknown or not self.claims:
            raise ValueError(f"unknown or no claims {unknown}; choose from {list(CLAIM_NAMES)}")


def arm_dir(cfg: AblationConfig, flags: Tuple[str, ...]) -> Path:
    """The run directory of the arm with ``flags``."""
    if not flags:
        return Path(cfg.base_run_dir)
    name = "_".join(f.lstrip("-").replace(".", "-") for f in flags)
    return Path(cfg.run_root) / name


def plan_arms(claims: Sequence[Claim]) -> Dict[Tuple[str, ...], List[str]]:
    """flags -> the variants run with them (every variant for the base arm: an empty list)."""
    arms: Dict[Tuple[str, ...], List[str]] = {}
    for c in claims:
        for arm in (c.measured, c.reference):
            variants = arms.setdefault(arm.flags, [])
            if arm.flags and arm.variant not in variants:
                variants.append(arm.variant)
    return arms


def compare(claim: Claim, rows: Dict[Tuple[str, ...], Dict[str, Dict[str, Any]]]
            ) -> Dict[str, Any]:
    """One table row: the claim's gaps (relative %, and absolute AUC), the spread and the
    verdict, from each arm's summary rows (variant -> mean / std metrics)."""
    m = rows[claim.measured.flags][claim.measured.variant]
    r = rows[claim.reference.flags][claim.reference.variant]
    out: Dict[str, Any] = {"claim": claim.name, "what": claim.claim, "paper": claim.paper,
                           "measured": dataclasses.asdict(claim.measured),
                           "reference": dataclasses.asdict(claim.reference),
                           "seeds": [m["seeds"], r["seeds"]]}
    for k in ("auc", "gauc"):
        gap = m[f"{k}_mean"] - r[f"{k}_mean"]
        out[f"{k}"] = [m[f"{k}_mean"], r[f"{k}_mean"]]
        out[f"{k}_std"] = [m[f"{k}_std"], r[f"{k}_std"]]
        out[f"{k}_gap"] = gap
        out[f"{k}_gap_pct"] = 100.0 * gap / r[f"{k}_mean"]
        out[f"{k}_two_std"] = 2.0 * max(m[f"{k}_std"], r[f"{k}_std"])
    gap, bar = out["auc_gap"], out["auc_two_std"]
    out["verdict"] = "gain" if gap > bar else "loss" if gap < -bar else "within spread"
    return out


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| claim | paper | measured here: AUC | GAUC | AUC gap vs 2 x std | verdict |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['paper']} | {r['auc_gap_pct']:+.2f}% | "
                     f"{r['gauc_gap_pct']:+.2f}% | {r['auc_gap']:+.4f} vs {r['auc_two_std']:.4f} "
                     f"| {r['verdict']} |")
    return "\n".join(lines)


def run_ablation(cfg: AblationConfig, log: Callable[[str], None] = print
                 ) -> List[Dict[str, Any]]:
    """Run (or reuse) every arm the chosen claims need, then print and write the table."""
    claims = [c for c in CLAIMS if c.name in cfg.claims]
    rows: Dict[Tuple[str, ...], Dict[str, Dict[str, Any]]] = {}
    for flags, variants in plan_arms(claims).items():
        run_dir = arm_dir(cfg, flags)
        argv = ["--config", cfg.config, *flags, "--run_dir", str(run_dir)]
        if variants:
            argv += ["--variants", *variants]
        log(f"[ablation] arm {' '.join(flags) or '(base)'} -> {run_dir}")
        run_pipeline(parse_config(PipelineConfig, argv, exclude=pipeline_flag_exclusions()),
                     log=log)
        rows[flags] = summary_rows(str(run_dir))
    table = [compare(c, rows) for c in claims]
    text = markdown(table)
    log(text)
    out = Path(cfg.out) if cfg.out else Path(cfg.run_root) / "ablation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, overwrite=True) as t:
        t.write_text(json.dumps({
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
            "base_config": cfg.config, "spread": "std over seeds (population std)",
            "rows": table}, indent=2) + "\n")
    return table


__all__: Sequence[str] = ("Arm", "Claim", "CLAIMS", "AblationConfig", "plan_arms", "compare",
                          "markdown", "run_ablation")
