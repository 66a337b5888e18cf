"""The end-to-end comparison: every downstream variant, several seeds, each dataset, one protocol.

Per dataset (:func:`iat_torchrec.data.prepare.prepare_data`, time-respecting splits) and per
seed, under ``<out_dir>/work/<dataset>/seed<k>/``:

1. ``iat_temporal`` / ``iat_user``: the IAT source model (temporal / user order) trained on the
   train split only, every instance of train + valid + test exported (``run_compress``);
2. ``sif``: the HGAQ tokenizer trained on the train split only, codes of all three splits
   exported (``run_tokenize``);
3. ``hist_<store>_<split>``: history shards of each split on each store (the stores hold all
   three splits, so valid / test histories include earlier valid / test instances);
4. ``results_<variant>.json``: one downstream run per variant (``run_train``).

Every step is skipped when its output already exists (a token store's manifest, a history
shards folder, a results file), so a re-run resumes where the last one stopped; the settings the
work was made with are recorded in ``work/<dataset>/config.json`` and a re-run with other
settings (other than datasets, seeds, variants, out_dir) is refused.

Variants (METHOD.md, "Evaluation protocol"): DLRM (no history, dot interaction), DLRM+DIN,
DLRM+BST, IAT temporal-order, IAT user-order (each with the BST item branch beside the IAT
branch), SIF (HGAQ codes through the SIF-Mixer) and SIF over IAT tokens (``sif_iat``, user-order
store). The non-SIF variants use ``baseline_interaction`` (dot: TorchRec's DLRM), the SIF ones
need the SIF-Mixer.

Outputs in ``out_dir``: ``results.csv``, ``results.md`` (one table per dataset: test AUC, GAUC,
logloss as mean +- std over seeds and relative AUC / GAUC gain over DLRM+BST), ``results.png``
(test AUC per variant with std error bars, one panel per dataset) and ``summary.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from iat_torchrec.data.atomic import atomic_output
from iat_torchrec.data.prepare import DataConfig, PreparedData, prepare_data
from iat_torchrec.data.spec import FeatureSpec
from iat_torchrec.models.source import Scheme
from iat_torchrec.stages import compress as compress_stage
from iat_torchrec.stages import tokenize as tokenize_stage
from iat_torchrec.stages import train as train_stage
from iat_torchrec.tokens import assembly as assembly_stage
from iat_torchrec.tokens.store import MANIFEST

SPLITS = ("train", "valid", "test")
BASELINE = "DLRM+BST"
# name -> (history source, history store or None, uses the SIF store)
VARIANTS: Dict[str, Dict[str, Any]] = {
    "DLRM": dict(source="none", store=None, sif=False),
    "DLRM+DIN": dict(source="din", store="iat_temporal", sif=False),
    "DLRM+BST": dict(source="bst", store="iat_temporal", sif=False),
    "IAT temporal-order": dict(source="iat", store="iat_temporal", sif=False),
    "IAT user-order": dict(source="iat", store="iat_user", sif=False),
    "SIF": dict(source="sif_codes", store="sif", sif=True),
    "SIF over IAT tokens": dict(source="sif_iat", store="iat_user", sif=True),
}
METRICS = ("auc", "gauc", "logloss")


@dataclasses.dataclass
class CompareConfig:
    """Run every downstream variant over seeds and datasets; tables, plot and summary."""

    datasets: List[str] = dataclasses.field(
        default_factory=lambda: ["synthetic", "movielens"],
        metadata={"help": "synthetic, movielens and / or paths of instance logs"})
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0, 1, 2],
                                         metadata={"help": "seeds (each re-trains every stage)"})
    variants: List[str] = dataclasses.field(default_factory=lambda: list(VARIANTS), metadata={
        "help": "variants to run (default all): " + ", ".join(VARIANTS)})
    data_dir: str = dataclasses.field(default="outputs/data", metadata={"help": "prepared data"})
    out_dir: str = dataclasses.field(default="outputs/compare", metadata={
        "help": "results.{csv,md,png}, summary.json and work/ (intermediate outputs)"})
    movielens_source: str = dataclasses.field(default="../shared/data/ml-latest-small",
                                              metadata={"help": "MovieLens directory"})
    num_instances: int = dataclasses.field(default=1_000_000, metadata={
        "help": "synthetic: instances"})
    num_users: int = dataclasses.field(default=0, metadata={
        "help": "synthetic: users (0: the generator's default)"})
    num_items: int = dataclasses.field(default=0, metadata={
        "help": "synthetic: items (0: the generator's default)"})
    num_sparse_fields: int = dataclasses.field(default=0, metadata={
        "help": "synthetic: sparse fields (0: the generator's default)"})
    synthetic_item_feature: str = dataclasses.field(default="item_id", metadata={
        "help": "item-id field of the synthetic log (and of a user's own log)"})
    movielens_item_feature: str = dataclasses.field(default="movie", metadata={
        "help": "item-id field of the MovieLens log"})
    # ------------------------------------------------------------------ training runs
    source_epochs: int = dataclasses.field(default=1, metadata={"help": "IAT source model"})
    tokenizer_epochs: int = dataclasses.field(default=1, metadata={"help": "HGAQ tokenizer"})
    epochs: int = dataclasses.field(default=3, metadata={
        "help": "downstream epochs (the best valid AUC epoch is reported)"})
    batch_size: int = dataclasses.field(default=1024, metadata={"help": "rows per step"})
    max_len: int = dataclasses.field(default=50, metadata={"help": "L: history length"})
    baseline_interaction: str = dataclasses.field(default="dot", metadata={
        "help": "interaction of the non-SIF variants: dot (TorchRec DLRM) or mixer"})
    # ------------------------------------------------------------------ model sizes
    token_dim: int = dataclasses.field(default=32, metadata={"help": "IAT token width d"})
    source_dense_layers: List[int] = dataclasses.field(default_factory=lambda: [64, 32],
                                                       metadata={"help": "source dense arch"})
    decompress_layers: List[int] = dataclasses.field(default_factory=lambda: [64, 32],
                                                     metadata={"help": "source decompressor"})
    cross_rank: int = dataclasses.field(default=16, metadata={"help": "source DCN rank"})
    sit_heads: int = dataclasses.field(default=2, metadata={"help": "SIT heads"})
    sit_context: int = dataclasses.field(default=16, metadata={"help": "SIT context"})
    field_dim: int = dataclasses.field(default=8, metadata={"help": "HGAQ field size"})
    d0: int = dataclasses.field(default=16, metadata={"help": "HGAQ codeword / SIF token size"})
    levels: int = dataclasses.field(default=3, metadata={"help": "HGAQ levels"})
    codebook_size: int = dataclasses.field(default=64, metadata={"help": "HGAQ codes per level"})
    embedding_dim: int = dataclasses.field(default=16, metadata={"help": "downstream D"})
    dense_arch_layers: List[int] = dataclasses.field(default_factory=lambda: [64],
                                                     metadata={"help": "downstream dense arch"})
    over_arch_layers: List[int] = dataclasses.field(default_factory=lambda: [64, 32],
                                                    metadata={"help": "downstream over arch"})
    item_history_len: int = dataclasses.field(default=50, metadata={
        "help": "k: item-id history length (capped at max_len)"})
    din_attention_layers: List[int] = dataclasses.field(default_factory=lambda: [64, 32],
                                                        metadata={"help": "DIN unit"})
    num_blocks: int = dataclasses.field(default=2, metadata={"help": "SIF-Mixer blocks"})
    num_heads: int = dataclasses.field(default=2, metadata={"help": "SIF-Mixer / BST heads"})
    iat_adapt_dim: int = dataclasses.field(default=32, metadata={"help": "IAT branch adapt"})
    iat_side_dim: int = dataclasses.field(default=32, metadata={"help": "IAT branch side"})
    iat_layers: int = dataclasses.field(default=1, metadata={"help": "IAT branch blocks"})
    iat_heads: int = dataclasses.field(default=2, metadata={"help": "IAT branch heads"})

    def check(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        if not self.seeds or not self.datasets:
            raise ValueError("give at least one dataset and one seed")


def _log(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def _item_feature(cfg: CompareConfig, dataset: str) -> str:
    return cfg.movielens_item_feature if dataset == "movielens" else cfg.synthetic_item_feature


def prepare(cfg: CompareConfig, dataset: str) -> PreparedData:
    extra = {k: getattr(cfg, k) for k in ("num_users", "num_items", "num_sparse_fields")
             if getattr(cfg, k)}
    return prepare_data(DataConfig(dataset=dataset, data_dir=cfg.data_dir,
                                   movielens_source=cfg.movielens_source,
                                   num_instances=cfg.num_instances, **extra))


def _store_done(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _stores(cfg: CompareConfig, prepared: PreparedData, work: Path, seed: int,
            needed: set) -> Dict[str, Path]:
    """Train the source models / tokenizer (train window only) and export all three splits."""
    splits = prepared.splits
    common = dict(train_log=str(splits["train"]), valid_log=str(splits["valid"]),
                  export_logs=[str(splits[s]) for s in SPLITS], seed=seed,
                  batch_size=cfg.batch_size, log_every=0)
    paths = {name: work / name for name in needed}
    for name, scheme in (("iat_temporal", Scheme.TEMPORAL), ("iat_user", Scheme.USER)):
        if name not in needed:
            continue
        if _store_done(paths[name]):
            _log(f"reusing {paths[name]}")
            continue
        _log(f"{prepared.name} seed {seed}: source model ({scheme.value}) -> {paths[name]}")
        compress_stage.run_compress(compress_stage.CompressConfig(
            store=str(paths[name]), scheme=scheme, epochs=cfg.source_epochs,
            token_dim=cfg.token_dim, dense_arch_layers=list(cfg.source_dense_layers),
            decompress_layers=list(cfg.decompress_layers), cross_rank=cfg.cross_rank,
            sit_heads=cfg.sit_heads, sit_context=cfg.sit_context, token_dtype="fp32",
            overwrite=paths[name].exists(), **common))
    if "sif" in needed:
        if _store_done(paths["sif"]):
            _log(f"reusing {paths['sif']}")
        else:
            _log(f"{prepared.name} seed {seed}: HGAQ tokenizer -> {paths['sif']}")
            tokenize_stage.run_tokenize(tokenize_stage.TokenizeConfig(
                store=str(paths["sif"]), epochs=cfg.tokenizer_epochs, field_dim=cfg.field_dim,
                d0=cfg.d0, levels=cfg.levels, codebook_size=cfg.codebook_size,
                overwrite=paths["sif"].exists(), **common))
    return paths


def _histories(cfg: CompareConfig, prepared: PreparedData, work: Path,
               stores: Dict[str, Path], needed: set) -> Dict[str, Dict[str, Path]]:
    out: Dict[str, Dict[str, Path]] = {}
    for name in needed:
        out[name] = {}
        for split in SPLITS:
            path = work / f"hist_{name}_{split}"
            out[name][split] = path
            if path.exists():
                continue
            assembly_stage.assemble_history(assembly_stage.AssembleConfig(
                target_log=str(prepared.splits[split]), store=str(stores[name]),
                output=str(path), max_len=cfg.max_len))
    return out


def _train_config(cfg: CompareConfig, prepared: PreparedData, variant: str, seed: int,
                  stores: Dict[str, Path], histories: Dict[str, Dict[str, Path]],
                  results: Path) -> train_stage.TrainDownstreamConfig:
    v = VARIANTS[variant]
    splits = prepared.splits
    kw: Dict[str, Any] = {}
    if v["store"] is not None:
        h = histories[v["store"]]
        kw.update(train_history=str(h["train"]), valid_history=str(h["valid"]),
                  test_history=str(h["test"]))
        if v["store"] != "sif":
            kw["iat_store"] = str(stores[v["store"]])
    if v["sif"]:
        kw["sif_store"] = str(stores["sif"])
    return train_stage.TrainDownstreamConfig(
        train_log=str(splits["train"]), valid_log=str(splits["valid"]),
        test_log=str(splits["test"]), history_source=v["source"],
        interaction="mixer" if v["sif"] else cfg.baseline_interaction, results=str(results),
        seed=seed, epochs=cfg.epochs, batch_size=cfg.batch_size, log_every=0,
        embedding_dim=cfg.embedding_dim, dense_arch_layers=list(cfg.dense_arch_layers),
        over_arch_layers=list(cfg.over_arch_layers),
        item_feature=_item_feature(cfg, prepared.name),
        item_history_len=min(cfg.item_history_len, cfg.max_len), d0=cfg.d0,
        num_blocks=cfg.num_blocks, num_heads=cfg.num_heads, bst_heads=cfg.num_heads,
        din_attention_layers=list(cfg.din_attention_layers), iat_adapt_dim=cfg.iat_adapt_dim,
        iat_side_dim=cfg.iat_side_dim, iat_layers=cfg.iat_layers, iat_heads=cfg.iat_heads,
        **kw)


# Fields that do not change what a stage makes: a resumed run may change them.
NOT_IN_FINGERPRINT = ("datasets", "seeds", "variants", "out_dir")


def check_work_config(cfg: CompareConfig, folder: Path) -> None:
    """Record the configuration the work under ``folder`` is made with; refuse to resume it
    under another one (its stores and results would be silently reused)."""
    config = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                    if k not in NOT_IN_FINGERPRINT}))
    path = folder / "config.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        differ = sorted(k for k in set(config) | set(recorded)
                        if config.get(k) != recorded.get(k))
        if differ:
            raise ValueError(f"{folder}: made with other settings ({', '.join(differ)}); use "
                             "another --out_dir or remove it")
        return
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as t:
        t.write_text(json.dumps(config, indent=2) + "\n")


def run_dataset(cfg: CompareConfig, dataset: str) -> Dict[str, Any]:
    """Every variant x seed on one dataset: ``{"name", "rows", "label", "runs": {variant:
    [{"seed", "valid", "test", "best_epoch", "train_seconds"}]}}``."""
    prepared = prepare(cfg, dataset)
    label = FeatureSpec.load(str(prepared.splits["train"])).labels[0]
    needed_stores = {VARIANTS[v]["store"] for v in cfg.variants} - {None}
    if any(VARIANTS[v]["sif"] for v in cfg.variants):
        needed_stores.add("sif")
    needed_hist = {VARIANTS[v]["store"] for v in cfg.variants} - {None}
    runs: Dict[str, List[Dict[str, Any]]] = {v: [] for v in cfg.variants}
    check_work_config(cfg, Path(cfg.out_dir) / "work" / prepared.name)
    for seed in cfg.seeds:
        work = Path(cfg.out_dir) / "work" / prepared.name / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        results_paths = {v: work / f"results_{v.replace(' ', '_').replace('+', '_')}.json"
                         for v in cfg.variants}
        if all(p.is_file() for p in results_paths.values()):
            stores, histories = {}, {}  # every run done: no store or history is needed
        else:
            stores = _stores(cfg, prepared, work, seed, needed_stores)
            histories = _histories(cfg, prepared, work, stores, needed_hist)
        for variant in cfg.variants:
            path = results_paths[variant]
            if not path.is_file():
                started = time.perf_counter()
                train_stage.run_train(_train_config(cfg, prepared, variant, seed, stores,
                                                    histories, path))
                _log(f"{prepared.name} seed {seed} {variant}: "
                     f"{time.perf_counter() - started:.0f} s")
            saved = json.loads(path.read_text())
            test = saved["test"][label]
            runs[variant].append({"seed": seed, "valid": saved["valid"][label], "test": test,
                                  "best_epoch": saved["best_epoch"],
                                  "train_seconds": saved.get("train_seconds")})
            _log(f"{prepared.name} seed {seed} {variant}: test auc {test['auc']:.4f} "
                 f"gauc {test['gauc']:.4f} logloss {test['logloss']:.4f}")
    return {"name": prepared.name, "rows": prepared.summary.rows, "label": label, "runs": runs}


def summarize(dataset: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per variant: mean / std over seeds of the test metrics, gains over DLRM+BST."""
    rows = []
    stats = {}
    for variant, runs in dataset["runs"].items():
        s = {"variant": variant, "dataset": dataset["name"], "seeds": len(runs)}
        for m in METRICS:
            values = np.array([r["test"][m] for r in runs], dtype=float)
            s[f"{m}_mean"], s[f"{m}_std"] = float(values.mean()), float(values.std())
        stats[variant] = s
        rows.append(s)
    base = stats.get(BASELINE)
    for s in rows:
        for m in ("auc", "gauc"):
            s[f"{m}_gain_pct"] = (100.0 * (s[f"{m}_mean"] - base[f"{m}_mean"]) / base[f"{m}_mean"]
                                  if base else float("nan"))
    return rows


def markdown(dataset: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    seeds = max((r["seeds"] for r in rows), default=0)
    lines = [f"### {dataset['name']} ({dataset['rows']:,} instances), test split, label "
             f"{dataset['label']}, {seeds} seeds (mean +- std)", "",
             f"| variant | AUC | GAUC | logloss | AUC vs {BASELINE} | GAUC vs {BASELINE} |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['auc_mean']:.4f} +- {r['auc_std']:.4f} | "
                     f"{r['gauc_mean']:.4f} +- {r['gauc_std']:.4f} | "
                     f"{r['logloss_mean']:.4f} +- {r['logloss_std']:.4f} | "
                     f"{r['auc_gain_pct']:+.2f}% | {r['gauc_gain_pct']:+.2f}% |")
    return "\n".join(lines)


CSV_FIELDS = ["dataset", "variant", "seeds", "auc_mean", "auc_std", "gauc_mean", "gauc_std",
              "logloss_mean", "logloss_std", "auc_gain_pct", "gauc_gain_pct"]


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in CSV_FIELDS})
    with atomic_output(path, overwrite=True) as t:
        t.write_text(buf.getvalue())


def write_plot(path: Path, tables: Dict[str, List[Dict[str, Any]]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], tables.items()):
        x = np.arange(len(rows))
        means = [r["auc_mean"] for r in rows]
        ax.bar(x, means, yerr=[r["auc_std"] for r in rows], capsize=4,
               color=["tab:gray" if r["variant"] == BASELINE else "tab:blue" for r in rows])
        ax.set_xticks(x)
        ax.set_xticklabels([r["variant"] for r in rows], rotation=35, ha="right", fontsize=8)
        lo = min(m - r["auc_std"] for m, r in zip(means, rows))
        hi = max(m + r["auc_std"] for m, r in zip(means, rows))
        pad = max(0.005, 0.1 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel("test AUC (mean +- std over seeds)")
        ax.set_title(name)
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as t:
        fig.savefig(t, format="png", dpi=120)
    plt.close(fig)


def run_compare(cfg: CompareConfig) -> Dict[str, Any]:
    """Run (or resume) every dataset, write the outputs, print the tables; returns the
    summary (``{"config", "datasets": {name: {..., "runs", "table"}}}``)."""
    cfg.check()
    started = time.perf_counter()
    datasets: Dict[str, Dict[str, Any]] = {}
    tables: Dict[str, List[Dict[str, Any]]] = {}
    for dataset in cfg.datasets:
        result = run_dataset(cfg, dataset)
        tables[result["name"]] = summarize(result)
        datasets[result["name"]] = {**result, "table": tables[result["name"]]}
    text = "\n\n".join(markdown(datasets[n], tables[n]) for n in tables)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "results.md", overwrite=True) as t:
        t.write_text(text + "\n")
    write_csv(out / "results.csv", [r for rows in tables.values() for r in rows])
    write_plot(out / "results.png", tables)
    summary = {"config": dataclasses.asdict(cfg), "datasets": datasets,
               "total_seconds": time.perf_counter() - started}
    with atomic_output(out / "summary.json", overwrite=True) as t:
        t.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print("\n" + text, flush=True)
    return summary
