"""Source-model evidence: AUC / logloss of the IAT source model variants over several seeds.

    python apps/compare_source.py --dataset synthetic --seeds 0 1 2
    python apps/compare_source.py --dataset movielens

Variants (METHOD.md, "Stage 1a"): the same model without bottleneck (base, temporal order),
temporal-order, user-order (SIT), user-order two-pass (forward then reverse user order). Each is
trained on the train split and validated on the valid split; the table gives mean +- std over
seeds and the relative AUC gain over the base. Results also go to ``--out`` (JSON, Markdown).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from iat_torchrec.config import parse_config
from iat_torchrec.atomic import atomic_output
from iat_torchrec.data.synthetic import SyntheticConfig
from iat_torchrec.models.source import Scheme, SourceModelConfig
from iat_torchrec.stages.compress import CompressConfig, run_compress
from iat_torchrec.stages.prepare import DataConfig, prepare_data
from iat_torchrec.train.loop import TrainConfig

VARIANTS = {
    "base (no bottleneck)": dict(model=SourceModelConfig(bottleneck=False),
                                 scheme=Scheme.TEMPORAL),
    "temporal-order": dict(scheme=Scheme.TEMPORAL),
    "user-order": dict(scheme=Scheme.USER),
    "user-order two-pass": dict(scheme=Scheme.USER, two_pass=True),
}


@dataclasses.dataclass
class CompareSourceConfig:
    """Compare source-model variants over seeds."""

    dataset: str = dataclasses.field(default="synthetic", metadata={
        "help": "synthetic, movielens, or the path of an instance log"})
    data_dir: str = dataclasses.field(default="outputs/data", metadata={"help": "prepared data"})
    num_instances: int = dataclasses.field(default=1_000_000, metadata={
        "help": "synthetic: instances"})
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0, 1, 2],
                                         metadata={"help": "seeds"})
    epochs: int = dataclasses.field(default=1, metadata={
        "help": "epochs of one-pass variants (two-pass runs twice as many)"})
    batch_size: int = dataclasses.field(default=1024, metadata={"help": "rows per step"})
    out: str = dataclasses.field(default="outputs/compare_source", metadata={
        "help": "directory for results.json and results.md"})


def _table(results: Dict[str, List[Dict[str, float]]], title: str) -> str:
    base = np.mean([r["auc"] for r in results["base (no bottleneck)"]])
    lines = [f"### {title}", "",
             "| variant | AUC | logloss | AUC vs base |", "|---|---|---|---|"]
    for name, runs in results.items():
        auc = np.array([r["auc"] for r in runs])
        ll = np.array([r["logloss"] for r in runs])
        lines.append(f"| {name} | {auc.mean():.4f} +- {auc.std():.4f} | "
                     f"{ll.mean():.4f} +- {ll.std():.4f} | "
                     f"{100 * (auc.mean() - base) / base:+.2f}% |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    logging.getLogger().setLevel(logging.ERROR)
    cfg = parse_config(CompareSourceConfig, argv)
    prepared = prepare_data(DataConfig(dataset=cfg.dataset, data_dir=cfg.data_dir,
                                       synthetic=SyntheticConfig(num_instances=cfg.num_instances)))
    label = next(iter(prepared.summary.label_rates))
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in cfg.seeds:
            for name, variant in VARIANTS.items():
                epochs = cfg.epochs * (2 if variant.get("two_pass") else 1)
                run = CompressConfig(train_log=str(prepared.splits["train"]),
                                     valid_log=str(prepared.splits["valid"]),
                                     export_logs=[str(prepared.splits["valid"])],
                                     store=str(Path(tmp) / f"{seed}-{len(results[name])}-"
                                               f"{list(VARIANTS).index(name)}"),
                                     train=TrainConfig(seed=seed, epochs=epochs,
                                                       batch_size=cfg.batch_size, log_every=0),
                                     **variant)
                out = run_compress(run)
                metrics = out["validation"][-1][label]
                results[name].append({"seed": seed, **metrics,
                                      "train_seconds": out["train_seconds"]})
                print(f"[compare] {name} seed {seed}: auc {metrics['auc']:.4f} "
                      f"logloss {metrics['logloss']:.4f} ({out['train_seconds']:.0f} s)",
                      flush=True)
    title = (f"IAT source model on {prepared.name} ({prepared.summary.rows:,} instances), "
             f"validation split, {len(cfg.seeds)} seeds, {cfg.epochs} epoch(s) per pass")
    table = _table(results, title)
    print("\n" + table)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / f"{prepared.name}.json", overwrite=True) as t:
        t.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_output(out_dir / f"{prepared.name}.md", overwrite=True) as t:
        t.write_text(table + "\n")


if __name__ == "__main__":
    main()
