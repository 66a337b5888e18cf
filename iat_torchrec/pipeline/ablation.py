"""The papers' claims, measured one by one: each claim compares one variant of one pipeline run
against another variant (of the same run or of another), over the same seeds.

A run is an *arm*: the base experiment (``--base_config``) plus a few flags. Arms with the same
flags are one run, and the arm without flags is the base experiment itself, run in ``base_run_dir``
with every variant (for the main job's config: the main job's own run directory, whose stages
are then skipped). Every other arm runs only the variants its claims read, in
``<run_root>/<arm>``. A claim's gap is the mean test AUC (GAUC) of the measured variant minus the
reference's, relative to the reference; it counts as a gain or a loss only beyond twice the
larger of the two seed stds, else "within spread".

The claims over the history length L (``by_length``: SIF against DLRM+BST at L = 16, 64, 256
and the base experiment's L) are also drawn: ``<out>.png`` beside the JSON, both variants' test
AUC (mean +- std over seeds) against L, and SIF's relative gain.

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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
    """A claim: ``measured`` against ``reference``, with what the paper reports; ``by_length``:
    a point of the curve over the history length L (drawn by :func:`plot_lengths`)."""

    name: str
    claim: str
    paper: str
    measured: Arm
    reference: Arm
    by_length: bool = False


def _length(n: int) -> Tuple[str, ...]:
    return ("--assemble.max_len", str(n))


_L256 = (*_length(256), "--downstream.model.item_history_len", "256")


_EPOCHS2 = ("--compress.train.epochs", "2")
_TOKENIZER_EPOCHS10 = ("--tokenize.train.epochs", "10")


def _iat(*flags: str) -> Arm:
    return Arm("IAT user-order", tuple(flags))


# Histories blind to the candidate (encoded once per request when served): one arm for both.
BLIND = ("--downstream.model.iat.history_sees_query", "false",
         "--downstream.model.mixer.history_sees_target", "false")


LENGTH_GAINS = "gains grow with L where baselines saturate"


CLAIMS: Tuple[Claim, ...] = (
    Claim("user_order", "IAT user-order over temporal-order",
          "user-order +0.24-0.31% AUC over base, temporal-order up to +0.15%",
          Arm("IAT user-order"), Arm("IAT temporal-order")),
    # Two-pass and dead-code restarts act from the second epoch on: both arms train 2 epochs.
    Claim("two_pass", "IAT user-order: two-pass over one-pass source training (2 epochs)",
          "source model +0.6% -> +0.8% AUC",
          _iat(*_EPOCHS2, "--compress.two_pass", "true"), _iat(*_EPOCHS2)),
    Claim("sit_labels", "IAT user-order: matured earlier labels into the SIT (this project)",
          "-", Arm("IAT user-order", ("--compress.model.sit_labels", "true")),
          Arm("IAT user-order")),
    # A code is dead once its EMA count decays below 3% of the uniform share: with decay 0.99
    # that takes log(0.03) / log(0.99) = 349 steps; the main job's tokenizer makes 39 an epoch.
    Claim("no_restarts", "SIF: HGAQ without dead-code restarts (anti-collapse off, tokenizer "
          "10 epochs)", "-0.14% AUC",
          Arm("SIF", (*_TOKENIZER_EPOCHS10, "--tokenize.model.dead_code_threshold", "0")),
          Arm("SIF", _TOKENIZER_EPOCHS10)),
    Claim("sif_l16", "SIF over DLRM+BST at L = 16", LENGTH_GAINS,
          Arm("SIF", _length(16)), Arm("DLRM+BST", _length(16)), by_length=True),
    Claim("sif_l64", "SIF over DLRM+BST at L = 64", LENGTH_GAINS,
          Arm("SIF", _length(64)), Arm("DLRM+BST", _length(64)), by_length=True),
    Claim("sif_base_l", "SIF over DLRM+BST at the base experiment's L", LENGTH_GAINS,
          Arm("SIF"), Arm("DLRM+BST"), by_length=True),
    # BST's item history is capped at item_history_len: at L = 256 it reads all 256 steps too.
    Claim("sif_l256", "SIF over DLRM+BST at L = 256", LENGTH_GAINS,
          Arm("SIF", _L256), Arm("DLRM+BST", _L256), by_length=True),
    Claim("post_sit", "IAT user-order: store post-SIT instead of pre-SIT tokens",
          "post-SIT -0.09% AUC", _iat("--compress.export_token", "post_sit"), _iat()),
    Claim("no_side_labels", "IAT user-order: no label side information in the IAT branch",
          "label side information needed (a loss without)",
          _iat("--downstream.model.iat.side_labels", "false"), _iat()),
    Claim("iat_din", "IAT user-order: DIN instead of a Transformer over IAT tokens",
          "DIN +0.03% AUC over none, Transformer +0.29-0.31%",
          _iat("--downstream.model.iat.encoder", "din"), _iat()),
    Claim("sif_flat", "SIF: flat attention over all (L+1) T tokens instead of the SIF-Mixer",
          "-0.24% GAUC", Arm("SIF", ("--downstream.model.mixer.structure", "flat")),
          Arm("SIF")),
    Claim("sif_pooled", "SIF: sub-tokens mean-pooled per sample first, attention over samples",
          "-0.81% GAUC", Arm("SIF", ("--downstream.model.mixer.structure", "pooled")),
          Arm("SIF")),
    # The init scale of the side information (README "Side information starts slowly": in
    # isolation std 1.0 reached the hand-feature ceiling in 474 steps, std 0.02 needed > 1,000).
    Claim("iat_side_init", "IAT user-order: side information (label, gap) initialised at std "
          "1.0 instead of 0.02 (this project)", "-",
          _iat("--downstream.model.iat.side_init_std", "1.0"), _iat()),
    Claim("sif_side_init", "SIF: recency and side encodings initialised at std 1.0 instead of "
          "0.02 (this project)", "-",
          Arm("SIF", ("--downstream.model.mixer.side_init_std", "1.0")), Arm("SIF")),
    Claim("token_width32", "IAT user-order: instance tokens of width 32 instead of 64",
          "d = 64 by default", _iat("--compress.model.token_dim", "32"), _iat()),
    Claim("token_int8", "IAT user-order: tokens stored int8 instead of fp16", "-",
          _iat("--compress.token_dtype", "int8"), _iat()),
    Claim("iat_blind", "IAT user-order: history steps blind to the query (served: encoded once "
          "per request; this project)", "-", _iat(*BLIND), _iat()),
    Claim("sif_blind", "SIF: history rows blind to the target row (served: mixed once per "
          "request; this project)", "-", Arm("SIF", BLIND), Arm("SIF")),
)
CLAIM_NAMES = tuple(c.name for c in CLAIMS)


@dataclasses.dataclass
class AblationConfig:
    """Measure the papers' claims (:data:`CLAIMS`) on a base experiment."""

    base_config: str = dataclasses.field(default="experiments/main.json", metadata={
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


def claim_length(claim: Claim, base_length: int) -> Optional[int]:
    """The history length L of a ``by_length`` claim (the base experiment's unless its flags
    set ``--assemble.max_len``); None for the others."""
    if not claim.by_length:
        return None
    flags = claim.measured.flags
    if "--assemble.max_len" in flags:
        return int(flags[flags.index("--assemble.max_len") + 1])
    return base_length


def compare(claim: Claim, rows: Dict[Tuple[str, ...], Dict[str, Dict[str, Any]]],
            length: Optional[int] = None) -> Dict[str, Any]:
    """One table row: the claim's gaps (relative %, and absolute AUC), the spread and the
    verdict, from each arm's summary rows (variant -> mean / std metrics); ``length``: the
    history length of a ``by_length`` claim, kept as ``"length"``."""
    m = rows[claim.measured.flags][claim.measured.variant]
    r = rows[claim.reference.flags][claim.reference.variant]
    out: Dict[str, Any] = {"claim": claim.name, "what": claim.claim, "paper": claim.paper,
                           "measured": dataclasses.asdict(claim.measured),
                           "reference": dataclasses.asdict(claim.reference),
                           "seeds": [m["seeds"], r["seeds"]]}
    if length is not None:
        out["length"] = length
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


def plot_lengths(rows: Sequence[Dict[str, Any]], path: "str | os.PathLike") -> bool:
    """Draw the ``by_length`` rows (those with a ``"length"``) into the PNG ``path``
    (atomically): left, the measured (SIF) and reference (DLRM+BST) variants' test AUC, mean
    +- std over seeds, against L; right, the relative AUC and GAUC gain in %. False (nothing
    written) without such rows."""
    points = sorted((r for r in rows if r.get("length") is not None), key=lambda r: r["length"])
    if not points:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["length"] for r in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, side in enumerate(("measured", "reference")):
        left.errorbar(lengths, [r["auc"][i] for r in points],
                      yerr=[r["auc_std"][i] for r in points], marker="o", capsize=3,
                      label=points[0][side]["variant"])
    left.set(xscale="log", xlabel="history length L", ylabel="test AUC (mean +- std)",
             title="AUC against L")
    left.legend()
    for k in ("auc", "gauc"):
        right.plot(lengths, [r[f"{k}_gap_pct"] for r in points], marker="o",
                   label=f"{k.upper()} gain")
    right.axhline(0.0, color="grey", linewidth=0.8)
    right.set(xscale="log", xlabel="history length L", ylabel="relative gain (%)",
              title=f"{points[0]['measured']['variant']} over "
                    f"{points[0]['reference']['variant']}")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as t:
        fig.savefig(t, format="png", dpi=120)
    plt.close(fig)
    return True


def run_ablation(cfg: AblationConfig, log: Callable[[str], None] = print
                 ) -> List[Dict[str, Any]]:
    """Run (or reuse) every arm the chosen claims need, then print and write the table (and,
    for claims over L, the plot)."""
    claims = [c for c in CLAIMS if c.name in cfg.claims]
    rows: Dict[Tuple[str, ...], Dict[str, Dict[str, Any]]] = {}
    base_length = 0
    for flags, variants in plan_arms(claims).items():
        run_dir = arm_dir(cfg, flags)
        argv = ["--config", cfg.base_config, *flags, "--run_dir", str(run_dir)]
        if variants:
            argv += ["--variants", *variants]
        log(f"[ablation] arm {' '.join(flags) or '(base)'} -> {run_dir}")
        pipeline = parse_config(PipelineConfig, argv, exclude=pipeline_flag_exclusions())
        if not flags:
            base_length = pipeline.assemble.max_len
        run_pipeline(pipeline, log=log)
        rows[flags] = summary_rows(str(run_dir))
    table = [compare(c, rows, claim_length(c, base_length)) for c in claims]
    text = markdown(table)
    log(text)
    out = Path(cfg.out) if cfg.out else Path(cfg.run_root) / "ablation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if plot_lengths(table, out.with_suffix(".png")):
        log(f"[ablation] plot of the claims over L: {out.with_suffix('.png')}")
    with atomic_output(out, overwrite=True) as t:
        t.write_text(json.dumps({
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
            "base_config": cfg.base_config, "spread": "std over seeds (population std)",
            "rows": table}, indent=2) + "\n")
    return table


__all__: Sequence[str] = ("Arm", "Claim", "CLAIMS", "AblationConfig", "plan_arms",
                          "claim_length", "compare", "markdown", "plot_lengths", "run_ablation")
