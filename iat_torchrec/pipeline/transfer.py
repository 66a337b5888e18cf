"""Tokens that travel (IAT paper, transfer): a source model of one domain serving histories to a
downstream model of another, measured as the gain of the other domain's tokens.

Each run is the base experiment (``--base_config``: a pipeline config whose ``transfer_data`` is
the other domain and whose variants include the transfer ones), once per value of the synthetic
generator's ``domain_correlation`` (``--correlations``; none: the base config as it is, e.g. the
MovieLens genre split), in ``<run_root>/<name>``. From each run's test predictions:

- the gain of adding the other domain's IAT tokens to the target's own item history
  ("DLRM+BST + other-domain IAT" over "DLRM+BST"), of the tokens alone over no history
  ("Other-domain IAT" over "DLRM"), and of a second IAT branch over them beside the target's
  own IAT tokens ("IAT user-order + other-domain IAT" over "IAT user-order");
- each with its std over seeds and a paired bootstrap interval over test users; a gain whose
  interval holds zero is "n.s.";
- on synthetic data, the oracle AUCs of the target's test samples, ``transferable`` included:
  the most a model that knows the other domain's propensity, but not the target's own part,
  can reach.

Written to ``--out`` (JSON) with a plot beside it (``.png``): gain against the correlation.

Example::

    rows = run_transfer(TransferConfig(correlations=[0.0, 1.0], out="results/transfer.json"))
    rows[0]["gains"]["DLRM+BST + other-domain IAT"]["auc_gain_pct"]
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from iat_torchrec.atomic import atomic_output
from iat_torchrec.config import parse_config
from iat_torchrec.pipeline.plan import PipelineConfig, runs_index
from iat_torchrec.pipeline.runner import run_pipeline
from iat_torchrec.stages.evaluate import EvaluateConfig, gains_over, load_runs

# measured variant -> the reference its gain is relative to
GAINS = {"DLRM+BST + other-domain IAT": "DLRM+BST", "Other-domain IAT": "DLRM",
         "IAT user-order + other-domain IAT": "IAT user-order"}


@dataclasses.dataclass
class TransferConfig:
    """The transfer experiment: one pipeline run per correlation, then the gains table."""

    base_config: str = dataclasses.field(default="experiments/transfer_synthetic.json",
                                         metadata={"help": "pipeline config of every run"})
    correlations: List[float] = dataclasses.field(
        default_factory=lambda: [0.0, 0.5, 1.0], metadata={
            "help": "--data.synthetic.domain_correlation of each run (none: one run of the "
                    "base config as it is)"})
    run_root: str = dataclasses.field(default="outputs/transfer", metadata={
        "help": "one run directory per correlation under it (a re-run skips finished stages)"})
    out: str = dataclasses.field(default="", metadata={
        "help": "JSON file of the results, the plot beside it as .png (default: none)"})

    def runs(self) -> Dict[str, List[str]]:
        """Run name -> its extra pipeline flags."""
        if not self.correlations:
            return {"base": []}
        for r in self.correlations:
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"--correlations: {r} is not in [0, 1]")
        return {f"rho{r:g}": ["--data.synthetic.domain_correlation", str(r)]
                for r in self.correlations}


def transfer_row(name: str, pipeline: PipelineConfig, correlation: Optional[float],
                 draws: int, confidence: float) -> Dict[str, Any]:
    """One run's variants (test AUC / GAUC mean and std over seeds) and :data:`GAINS`."""
    (dataset,) = load_runs(runs_index(pipeline)).values()
    runs = dataset["runs"]
    variants = {v: {f"{m}_{stat.__name__}": float(stat([r["test"][m] for r in rs]))
                    for m in ("auc", "gauc") for stat in (np.mean, np.std)}
                for v, rs in runs.items()}
    gains: Dict[str, Dict[str, Any]] = {}
    for measured, reference in GAINS.items():
        if measured not in runs or reference not in runs:
            continue
        gains[measured] = {"reference": reference, **gains_over(
            dataset["label"], runs[measured], runs[reference], draws, confidence)}
    return {"run": name, "dataset": dataset["name"], "correlation": correlation,
            "seeds": sorted({r["seed"] for rs in runs.values() for r in rs}),
            "variants": variants, "gains": gains,
            "oracle_auc_test": dataset["oracle"]}


def run_transfer(cfg: TransferConfig, log=print) -> List[Dict[str, Any]]:
    """Run (or resume) every run of the experiment, then write and print the gains."""
    evaluate = EvaluateConfig()
    rows = []
    for name, flags in cfg.runs().items():
        pipeline = parse_config(PipelineConfig, ["--config", cfg.base_config, "--run_dir",
                                                 str(Path(cfg.run_root) / name), *flags])
        log(f"[transfer] run {name}: {pipeline.run_dir}")
        run_pipeline(pipeline, log=log)
        correlation = (pipeline.data.synthetic.domain_correlation if cfg.correlations
                       else None)
        rows.append(transfer_row(name, pipeline, correlation, evaluate.bootstrap_draws,
                                 evaluate.confidence))
    log("\n" + markdown(rows))
    if cfg.out:
        with atomic_output(cfg.out, overwrite=True) as t:
            t.write_text(json.dumps({
                "date": datetime.date.today().isoformat(),
                "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs",
                "command": "python apps/transfer.py " + _flags(cfg),
                "spread": "std over seeds (population); interval: paired bootstrap over test "
                          f"users, {evaluate.bootstrap_draws} draws, {evaluate.confidence:.0%}",
                "config": dataclasses.asdict(cfg), "rows": rows}, indent=1) + "\n")
        plot(rows, Path(cfg.out).with_suffix(".png"))
    return rows


def _flags(cfg: TransferConfig) -> str:
    return (f"--base_config {cfg.base_config} --correlations "
            + " ".join(f"{r:g}" for r in cfg.correlations) + f" --run_root {cfg.run_root}"
            + (f" --out {cfg.out}" if cfg.out else ""))


def _gain_cell(g: Dict[str, Any], m: str) -> str:
    out = f"{g[f'{m}_gain_pct']:+.2f}% +- {g[f'{m}_gain_std']:.2f}"
    if g[f"{m}_gain_significant"] is not None:
        out += (f" [{g[f'{m}_gain_low']:+.2f}, {g[f'{m}_gain_high']:+.2f}]"
                + ("" if g[f"{m}_gain_significant"] else " n.s."))
    return out


def markdown(rows: List[Dict[str, Any]]) -> str:
    """The gains table: one line per run and measured variant."""
    lines = ["| run | correlation | variant | over | test AUC | AUC gain | GAUC gain |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        rho = "-" if row["correlation"] is None else f"{row['correlation']:g}"
        for measured, g in row["gains"].items():
            v = row["variants"][measured]
            lines.append(f"| {row['dataset']} | {rho} | {measured} | {g['reference']} | "
                         f"{v['auc_mean']:.4f} +- {v['auc_std']:.4f} | {_gain_cell(g, 'auc')} | "
                         f"{_gain_cell(g, 'gauc')} |")
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: Path) -> None:
    """The AUC gain of each measured variant (std over seeds as error bars, hollow where n.s.)
    against the correlation, or per run where there is none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r["correlation"] if r["correlation"] is not None else i for i, r in enumerate(rows)]
    for measured, reference in GAINS.items():
        pts = [(x, r["gains"][measured]) for x, r in zip(xs, rows) if measured in r["gains"]]
        if not pts:
            continue
        ax.errorbar([x for x, _ in pts], [g["auc_gain_pct"] for _, g in pts],
                           yerr=[g["auc_gain_std"] for _, g in pts], marker="o", capsize=3,
                           label=f"{measured} over {reference}")
        for x, g in pts:
            if g["auc_gain_significant"] is False:
                ax.plot([x], [g["auc_gain_pct"]], "o", color="white", markersize=4)
    ax.axhline(0.0, color="gray", lw=0.8)
    if all(r["correlation"] is not None for r in rows):
        ax.set_xlabel("correlation of the user x context propensity across domains")
    else:
        ax.set_xticks(xs, [r["dataset"] for r in rows])
    ax.set_ylabel("test AUC gain, % (mean +- std over seeds)")
    ax.set_title("other domain's IAT tokens (hollow: n.s. by paired bootstrap)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
