"""Stage ``evaluate``: every downstream run's results gathered into the comparison table.

Reads the index of runs the pipeline writes (``runs.json``: per dataset, each variant's results
file per seed), and writes into ``out_dir``: ``results.md`` (one table per dataset: test AUC,
GAUC and logloss as mean +- std over seeds, the relative AUC / GAUC gain over the index's
``baseline`` variant, and how each model was trained: optimizer steps, best epoch (mean over
seeds) and training seconds; below it, the most the last epoch raised a variant's best valid
AUC),
``results.csv`` (the same rows), ``results.png`` (test AUC per variant with its std as error
bars, one panel per dataset) and ``summary.json`` (the tables and every run's metrics). A
missing or unreadable results file is an error naming it.

Every gain carries its uncertainty: the std over seeds of the per-seed gains, and a paired
bootstrap interval over test users (:func:`~iat_torchrec.train.metrics.bootstrap_gain` on the
runs' test predictions: each resample draws the test users with replacement and scores the
variant and the baseline on the same draw). A gain whose interval holds zero is marked
``n.s.`` in the Markdown, the CSV (``*_gain_significant``) and the plot (hatched bar).

On the built-in synthetic data (a log whose provenance is the generator) the oracle AUCs of
the same test samples (:func:`~iat_torchrec.data.synthetic.oracle_auc`: the true logit, without
the drifting user x context term, user / item part only) are printed under the table and drawn
as lines on the plot: what the data allows.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from iat_torchrec.atomic import atomic_output
from iat_torchrec.config import from_dict
from iat_torchrec.data.log import read_provenance, validate_log
from iat_torchrec.data.spec import FeatureSpec
from iat_torchrec.data.synthetic import SyntheticConfig, oracle_auc
from iat_torchrec.train.metrics import bootstrap_gain
from iat_torchrec.train.predictions import aligned_logits, read_predictions

METRICS = ("auc", "gauc", "logloss")
# Per run, averaged over seeds.
TRAINING = ("steps", "best_epoch", "train_seconds", "last_epoch_gain")


@dataclasses.dataclass
class EvaluateConfig:
    """Gather the downstream runs into the comparison table, plot and summary."""

    runs: str = dataclasses.field(default="", metadata={
        "help": "index of the runs (runs.json, written by apps/pipeline.py) (required)"})
    out_dir: str = dataclasses.field(default="", metadata={
        "help": "where results.{md,csv,png} and summary.json go (default: the index's folder)"})
    bootstrap_draws: int = dataclasses.field(default=1000, metadata={
        "help": "resamples of the test users in the paired bootstrap of each gain (0: none)"})
    confidence: float = dataclasses.field(default=0.95, metadata={
        "help": "level of the bootstrap interval of each gain"})

    def __post_init__(self) -> None:
        if self.bootstrap_draws < 0 or not 0.0 < self.confidence < 1.0:
            raise ValueError("EvaluateConfig: bootstrap_draws must be >= 0, confidence in (0, 1)")


class ResultsError(ValueError):
    """A run's results that are missing or not what the evaluation expects."""


def load_runs(index: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per dataset ``{"name", "rows", "label", "baseline", "runs": {variant: [{"seed", "valid",
    "test", "best_epoch", "steps", "train_seconds"}]}}`` from the results files of the index (whose
    ``baseline`` names the variant the gains are relative to)."""
    datasets: Dict[str, Dict[str, Any]] = {}
    for name, entry in index["datasets"].items():
        label = FeatureSpec.load(entry["train_log"]).labels[0]
        runs: Dict[str, List[Dict[str, Any]]] = {}
        for variant, seeds in entry["runs"].items():
            runs[variant] = []
            for run in seeds:
                path = Path(run["results"])
                try:
                    saved = json.loads(path.read_text())
                    valid, test = saved["valid"][label], saved["test"][label]
                except FileNotFoundError:
                    raise ResultsError(f"{path}: no results for {name} seed {run['seed']} "
                                       f"{variant}: that train stage has not finished") from None
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ResultsError(f"{path}: not a results file with valid and test "
                                       f"metrics of label {label!r} ({e!r})") from None
                runs[variant].append({"seed": run["seed"], "valid": valid, "test": test,
                                      "test_predictions": saved.get("test_predictions"),
                                      "last_epoch_gain": last_epoch_gain(saved, label),
                                      "best_epoch": saved.get("best_epoch"),
                                      "steps": saved.get("steps"),
                                      "train_seconds": saved.get("train_seconds")})
        datasets[name] = {"name": name, "rows": validate_log(entry["log"]).rows,
                          "label": label, "baseline": index.get("baseline"), "runs": runs,
                          "oracle": test_oracle(entry["log"], runs, label)}
    return datasets


ORACLES = {"bayes": "Bayes (true logit)", "no_drift": "without the drifting user x context term",
           "static": "user / item part only",
           "transferable": "knowing only the other domain's user x context term"}


def test_oracle(log: str, runs: Dict[str, List[Dict[str, Any]]], label: str
                ) -> Optional[Dict[str, float]]:
    """The oracle AUCs (:data:`ORACLES`) on the runs' test samples when the log is the built-in
    synthetic data, else None."""
    provenance = read_provenance(log)
    paths = [r["test_predictions"] for rs in runs.values() for r in rs if r["test_predictions"]]
    if not provenance or provenance.get("source") != "synthetic" or not paths:
        return None
    config = from_dict(SyntheticConfig, provenance["config"])
    oracle = oracle_auc(config, read_predictions(paths[0], label)["instance_id"])
    return {k: oracle[k] for k in ORACLES if k in oracle}  # transferable: domains >= 1 only


def last_epoch_gain(results: Dict[str, Any], label: str) -> Optional[float]:
    """How much the last epoch raised the best valid AUC of a run (None: one epoch): whether
    another epoch still pays."""
    aucs = [e["valid"][label]["auc"] for e in results.get("epochs", [])]
    return max(aucs) - max(aucs[:-1]) if len(aucs) > 1 else None


def summarize(dataset: Dict[str, Any], draws: int = 0, confidence: float = 0.95
              ) -> List[Dict[str, Any]]:
    """One row per variant: mean / std over seeds of the test metrics, gains over the
    dataset's baseline variant with their std over seeds (the gains of seeds paired by seed)
    and, with ``draws``, their paired bootstrap interval over test users."""
    rows = []
    for variant, runs in dataset["runs"].items():
        s = {"variant": variant, "dataset": dataset["name"], "seeds": len(runs)}
        for m in METRICS:
            values = np.array([r["test"][m] for r in runs], dtype=float)
            s[f"{m}_mean"], s[f"{m}_std"] = float(values.mean()), float(values.std())
        for k in TRAINING:
            values = [r[k] for r in runs if r.get(k) is not None]
            s[k] = float(np.mean(values)) if values else float("nan")
        valid = np.array([r["valid"]["auc"] for r in runs], dtype=float)
        s["valid_auc_mean"], s["valid_auc_std"] = float(valid.mean()), float(valid.std())
        rows.append(s)
    base_runs = dataset["runs"].get(dataset["baseline"], [])
    for s in rows:
        s.update(gains_over(dataset["label"], dataset["runs"][s["variant"]], base_runs, draws,
                            confidence))
    return rows


def gains_over(label: str, runs: List[Dict[str, Any]], base_runs: List[Dict[str, Any]],
               draws: int = 0, confidence: float = 0.95) -> Dict[str, Any]:
    """The relative gain (%) of the seed-mean test AUC and GAUC of ``runs`` over
    ``base_runs``: ``{m}_gain_pct``, its std over seeds (``{m}_gain_std``), its paired bootstrap
    interval over test users (``{m}_gain_low`` / ``_high``, with ``draws``) and whether that
    interval excludes zero (``{m}_gain_significant``; None without one). NaN without base runs."""
    interval = gain_interval(label, runs, base_runs, draws, confidence)
    out: Dict[str, Any] = {}
    for m in ("auc", "gauc"):
        mean = float(np.mean([r["test"][m] for r in runs]))
        base = float(np.mean([r["test"][m] for r in base_runs])) if base_runs else float("nan")
        out[f"{m}_gain_pct"] = 100.0 * (mean - base) / base
        out[f"{m}_gain_std"] = seed_gain_std(runs, base_runs, m)
        low, high = interval.get(m, (float("nan"), float("nan")))
        out[f"{m}_gain_low"], out[f"{m}_gain_high"] = low, high
        out[f"{m}_gain_significant"] = bool(low > 0 or high < 0) if low == low else None
    return out


def seed_gain_std(runs: List[Dict[str, Any]], base_runs: List[Dict[str, Any]],
                  metric: str) -> float:
    """Std over seeds of the relative gain (%) of each seed's run over the baseline's run of
    the same seed (NaN without common seeds)."""
    base = {r["seed"]: r["test"][metric] for r in base_runs}
    gains = [100.0 * (r["test"][metric] - base[r["seed"]]) / base[r["seed"]]
             for r in runs if r["seed"] in base]
    return float(np.std(gains)) if gains else float("nan")


def gain_interval(label: str, runs: List[Dict[str, Any]], base_runs: List[Dict[str, Any]],
                  draws: int, confidence: float) -> Dict[str, Any]:
    """The paired bootstrap interval of the seed-mean gain of ``runs`` over ``base_runs``
    (metric -> (low, high)); empty without draws, predictions or a baseline, or for the
    baseline itself."""
    paths = [r["test_predictions"] for r in runs]
    base_paths = [r["test_predictions"] for r in base_runs]
    if not draws or not runs or not base_runs or runs is base_runs or None in paths + base_paths:
        return {}
    pred = aligned_logits(paths + base_paths, label)
    logits = pred["logits"]
    return bootstrap_gain(pred["label"], pred["user_id"], logits[:len(paths)],
                          logits[len(paths):], draws=draws, level=confidence)


def _gain(row: Dict[str, Any], metric: str) -> str:
    """A relative gain with its std over seeds and bootstrap interval, ``n.s.`` when the
    interval holds zero; "-" where the baseline variant was not run."""
    pct = row[f"{metric}_gain_pct"]
    if pct != pct:
        return "-"
    out = f"{pct:+.2f}%"
    if row[f"{metric}_gain_std"] == row[f"{metric}_gain_std"] and row["seeds"] > 1:
        out += f" +- {row[f'{metric}_gain_std']:.2f}"
    if row[f"{metric}_gain_significant"] is not None:
        out += (f" [{row[f'{metric}_gain_low']:+.2f}, {row[f'{metric}_gain_high']:+.2f}]"
                + ("" if row[f"{metric}_gain_significant"] else " n.s."))
    return out


def markdown(dataset: Dict[str, Any], rows: List[Dict[str, Any]], confidence: float = 0.95
             ) -> str:
    seeds = max((r["seeds"] for r in rows), default=0)
    base = dataset["baseline"]
    lines = [f"### {dataset['name']} ({dataset['rows']:,} instances), test split, label "
             f"{dataset['label']}, {seeds} seeds (mean +- std)", "",
             f"Gains over {base}: relative, +- their std over seeds, [the {confidence:.0%} "
             "paired bootstrap interval over test users]; n.s.: the interval holds zero.", "",
             f"| variant | AUC | GAUC | logloss | AUC vs {base} | GAUC vs {base} | steps | "
             "best epoch | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['auc_mean']:.4f} +- {r['auc_std']:.4f} | "
                     f"{r['gauc_mean']:.4f} +- {r['gauc_std']:.4f} | "
                     f"{r['logloss_mean']:.4f} +- {r['logloss_std']:.4f} | "
                     f"{_gain(r, 'auc')} | {_gain(r, 'gauc')} | "
                     f"{r['steps']:,.0f} | {r['best_epoch']:.1f} | {r['train_seconds']:.1f} |")
    if dataset.get("oracle"):
        lines += ["", "Oracle AUCs on these test samples (what the data allows): " + "; ".join(
            f"{text} {dataset['oracle'][k]:.4f}" for k, text in ORACLES.items()
            if k in dataset["oracle"]) + "."]
    gains = [r for r in rows if r["last_epoch_gain"] == r["last_epoch_gain"]]
    if gains:
        top = max(gains, key=lambda r: r["last_epoch_gain"])
        lines += ["", f"The last epoch raised the best valid AUC by at most "
                      f"{top['last_epoch_gain']:+.4f} (mean over seeds; {top['variant']})."]
    return "\n".join(lines)


CSV_FIELDS = ["dataset", "variant", "seeds", "auc_mean", "auc_std", "gauc_mean", "gauc_std",
              "logloss_mean", "logloss_std",
              *(f"{m}_gain_{k}" for m in ("auc", "gauc")
                for k in ("pct", "std", "low", "high", "significant")),
              "valid_auc_mean", "valid_auc_std", *TRAINING]


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in CSV_FIELDS})
    with atomic_output(path, overwrite=True) as t:
        t.write_text(buf.getvalue())


def write_plot(path: Path, tables: Dict[str, List[Dict[str, Any]]], baseline: str,
               oracles: Dict[str, Optional[Dict[str, float]]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], tables.items()):
        x = np.arange(len(rows))
        means = [r["auc_mean"] for r in rows]
        bars = ax.bar(x, means, yerr=[r["auc_std"] for r in rows], capsize=4,
                      color=["tab:gray" if r["variant"] == baseline else "tab:blue"
                             for r in rows])
        for bar, r in zip(bars, rows):  # the gain over the baseline; hatched: n.s.
            if r["variant"] == baseline or r["auc_gain_pct"] != r["auc_gain_pct"]:
                continue
            if r["auc_gain_significant"] is False:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
            mark = " n.s." if r["auc_gain_significant"] is False else ""
            ax.annotate(f"{r['auc_gain_pct']:+.2f}%{mark}", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height() + r["auc_std"]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels([r["variant"] for r in rows], rotation=35, ha="right", fontsize=8)
        lo = min(m - r["auc_std"] for m, r in zip(means, rows))
        hi = max(m + r["auc_std"] for m, r in zip(means, rows))
        for (k, text), style in zip(ORACLES.items(), ("-", "--", ":", "-.")):
            if oracles.get(name) and k in oracles[name]:  # what the data allows
                ax.axhline(oracles[name][k], color="tab:red", linestyle=style, linewidth=1,
                           label=f"oracle: {text}")
                lo, hi = min(lo, oracles[name][k]), max(hi, oracles[name][k])
        if oracles.get(name):
            ax.legend(fontsize=7, loc="lower right")
        pad = max(0.005, 0.1 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel(f"test AUC (mean +- std over seeds); gain vs {baseline}, "
                      "hatched: n.s.", fontsize=8)
        steps = sorted({int(r["steps"]) for r in rows if r["steps"] == r["steps"]})
        ax.set_title(f"{name}: {', '.join(f'{n:,}' for n in steps)} optimizer steps per model")
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as t:
        fig.savefig(t, format="png", dpi=120)
    plt.close(fig)


def run_evaluate(cfg: EvaluateConfig) -> Dict[str, Any]:
    """Write the tables, plot and summary of the runs in ``cfg.runs``; prints the tables and
    returns the summary (``{"datasets": {name: {..., "runs", "table"}}}``)."""
    if not cfg.runs:
        raise ValueError("--runs is required: the runs.json index apps/pipeline.py writes")
    index_path = Path(cfg.runs)
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResultsError(f"{index_path}: cannot read the index of runs ({e})") from None
    datasets = load_runs(index)
    tables = {name: summarize(d, cfg.bootstrap_draws, cfg.confidence)
              for name, d in datasets.items()}
    text = "\n\n".join(markdown(datasets[n], tables[n], cfg.confidence) for n in tables)
    out = Path(cfg.out_dir) if cfg.out_dir else index_path.parent
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "results.md", overwrite=True) as t:
        t.write_text(text + "\n")
    write_csv(out / "results.csv", [r for rows in tables.values() for r in rows])
    write_plot(out / "results.png", tables, index.get("baseline"),
               {n: datasets[n]["oracle"] for n in datasets})
    summary = {"datasets": {n: {**datasets[n], "table": tables[n]} for n in datasets}}
    with atomic_output(out / "summary.json", overwrite=True) as t:
        t.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(text, flush=True)
    return summary


@dataclasses.dataclass
class CompareConfig:
    """Compare two pipeline runs variant by variant (e.g. the main job against the same with
    twice the data): does the change still raise valid AUC?"""

    base: str = dataclasses.field(default="", metadata={
        "help": "run directory of the reference run (its summary.json) (required)"})
    other: str = dataclasses.field(default="", metadata={
        "help": "run directory of the changed run (required)"})
    out: str = dataclasses.field(default="", metadata={
        "help": "JSON file for the comparison (default: none)"})


def summary_rows(run_dir: str) -> Dict[str, Dict[str, Any]]:
    """A pipeline run's table rows by variant (its ``summary.json``)."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: cannot read a pipeline summary ({e})") from None
    return {r["variant"]: r for d in summary["datasets"].values() for r in d["table"]}


def run_compare(cfg: CompareConfig) -> List[Dict[str, Any]]:
    """Per variant of both runs: valid and test AUC (mean over seeds) of each and the change;
    printed as a table, written to ``out`` if given."""
    if not cfg.base or not cfg.other:
        raise ValueError("--base and --other are required: two pipeline run directories")
    base, other = summary_rows(cfg.base), summary_rows(cfg.other)
    rows = []
    for variant in [v for v in base if v in other]:
        b, o = base[variant], other[variant]
        rows.append({"variant": variant, "seeds": [b["seeds"], o["seeds"]],
                     "valid_auc": [b["valid_auc_mean"], o["valid_auc_mean"]],
                     "valid_auc_change": o["valid_auc_mean"] - b["valid_auc_mean"],
                     "test_auc": [b["auc_mean"], o["auc_mean"]],
                     "test_auc_change": o["auc_mean"] - b["auc_mean"]})
    lines = [f"base {cfg.base}, other {cfg.other}", "",
             "| variant | valid AUC base | valid AUC other | change | test AUC change |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['valid_auc'][0]:.4f} | {r['valid_auc'][1]:.4f} | "
              f"{r['valid_auc_change']:+.4f} | {r['test_auc_change']:+.4f} |" for r in rows]
    print("\n".join(lines), flush=True)
    if cfg.out:
        with atomic_output(cfg.out, overwrite=True) as t:
            t.write_text(json.dumps({"base": cfg.base, "other": cfg.other, "rows": rows},
                                    indent=2) + "\n")
    return rows
