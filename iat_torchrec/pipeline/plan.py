"""The pipeline's plan: every stage of every dataset and seed, as TorchX component calls.

Per dataset (``--dataset``: synthetic, movielens or the path of a user's instance log) the data
stage makes, validates and splits the log in time; then per seed, under
``<run_dir>/work/<dataset>/seed<k>/``:

1. ``iat_temporal`` / ``iat_user``: the IAT source model (temporal / user order) trained on the
   train split only, every instance of train + valid + test exported (``compress``);
2. ``sif``: the HGAQ tokenizer trained on the train split only, codes of all three splits
   exported (``tokenize``);
3. ``hist_<store>_<split>``: the history shards of each split on each store (``assemble``; the
   stores hold all three splits, so valid / test histories include earlier valid / test
   instances, never later ones);
4. ``results_<variant>.json``: one downstream run per variant (``train``: valid each epoch, the
   test metrics of the best valid epoch).

A last ``evaluate`` stage reads every run's results and writes the comparison table, the plot
and ``summary.json`` into ``run_dir``. Only the stores and histories the chosen variants need
are planned.

Variants (METHOD.md, "Evaluation protocol"): DLRM (no history, dot interaction), DLRM+DIN,
DLRM+BST, IAT temporal-order, IAT user-order (each with the BST item branch beside the IAT
branch), SIF (HGAQ codes through the SIF-Mixer) and SIF over IAT tokens (``sif_iat``, user-order
store). The non-SIF variants use ``baseline_interaction`` (dot: TorchRec's DLRM); the SIF ones
need the SIF-Mixer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from iat_torchrec.data.prepare import DataConfig, DataPaths, data_paths

SPLITS = ("train", "valid", "test")
BASELINE = "DLRM+BST"
# name -> history source, the store its histories index (None: no history), SIF-Mixer or not
VARIANTS: Dict[str, Dict[str, Any]] = {
    "DLRM": dict(source="none", store=None, sif=False),
    "DLRM+DIN": dict(source="din", store="iat_temporal", sif=False),
    "DLRM+BST": dict(source="bst", store="iat_temporal", sif=False),
    "IAT temporal-order": dict(source="iat", store="iat_temporal", sif=False),
    "IAT user-order": dict(source="iat", store="iat_user", sif=False),
    "SIF": dict(source="sif_codes", store="sif", sif=True),
    "SIF over IAT tokens": dict(source="sif_iat", store="iat_user", sif=True),
}
SCHEMES = {"iat_temporal": "temporal", "iat_user": "user"}
RUNS_INDEX = "runs.json"


@dataclasses.dataclass
class PipelineConfig:
    """The whole pipeline: data, stage 1 (IAT source models, HGAQ tokenizer), assembly, every
    downstream variant over seeds, evaluation; each stage a TorchX job."""

    dataset: List[str] = dataclasses.field(default_factory=lambda: ["synthetic"], metadata={
        "help": "synthetic (built-in default), movielens, and / or paths of instance logs "
                "(a directory with feature_spec.json)"})
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "seeds (each re-trains every stage)"})
    variants: List[str] = dataclasses.field(default_factory=lambda: list(VARIANTS), metadata={
        "help": "variants to run (default all): " + ", ".join(VARIANTS)})
    run_dir: str = dataclasses.field(default="outputs/pipeline", metadata={
        "help": "results.{md,csv,png}, summary.json, logs/ (per stage) and work/ (stage "
                "outputs); a re-run skips the stages already made there"})
    data_dir: str = dataclasses.field(default="outputs/data", metadata={
        "help": "prepared data (shared between runs)"})
    movielens_source: str = dataclasses.field(default="../shared/data/ml-latest-small",
                                              metadata={"help": "MovieLens directory"})
    num_instances: int = dataclasses.field(default=50_000, metadata={
        "help": "synthetic: instances"})
    num_users: int = dataclasses.field(default=100, metadata={
        "help": "synthetic: users (500 instances each by default: the user x context signal "
                "needs long histories)"})
    num_items: int = dataclasses.field(default=2_000, metadata={"help": "synthetic: items"})
    num_sparse_fields: int = dataclasses.field(default=26, metadata={
        "help": "synthetic: sparse fields"})
    item_feature: str = dataclasses.field(default="", metadata={
        "help": "item-id field of the target (default: item_id, movie for movielens)"})
    # ------------------------------------------------------------------ resources
    scheduler: str = dataclasses.field(default="local_cwd", metadata={
        "help": "TorchX scheduler every stage is launched on (local_cwd, slurm, kubernetes ...)"})
    scheduler_args: List[str] = dataclasses.field(default_factory=list, metadata={
        "help": "key=value run options of the scheduler (e.g. partition=gpu for slurm)"})
    nnodes: int = dataclasses.field(default=1, metadata={"help": "nodes per training stage"})
    nproc: int = dataclasses.field(default=2, metadata={
        "help": "processes per node of every training stage"})
    assemble_nproc: int = dataclasses.field(default=1, metadata={
        "help": "processes per node of every assembly stage (assembly is light: below some 10M "
                "samples starting processes costs more than the work)"})
    device: str = dataclasses.field(default="cpu", metadata={"help": "cpu or cuda"})
    cpu: int = dataclasses.field(default=1, metadata={"help": "CPUs per process"})
    gpu: int = dataclasses.field(default=0, metadata={
        "help": "GPUs per process (1 with --device cuda)"})
    memMB: int = dataclasses.field(default=4096, metadata={"help": "memory per process, MB"})
    checkpoint_every: int = dataclasses.field(default=500, metadata={
        "help": "training steps between checkpoints: a killed stage resumes from the last"})
    # ------------------------------------------------------------------ training runs
    source_epochs: int = dataclasses.field(default=1, metadata={"help": "IAT source model"})
    tokenizer_epochs: int = dataclasses.field(default=1, metadata={"help": "HGAQ tokenizer"})
    epochs: int = dataclasses.field(default=1, metadata={
        "help": "downstream epochs (the best valid AUC epoch is reported)"})
    batch_size: int = dataclasses.field(default=512, metadata={"help": "rows per process step"})
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
        if not self.seeds or not self.dataset or not self.variants:
            raise ValueError("give at least one dataset, one seed and one variant")
        if min(self.nproc, self.assemble_nproc, self.nnodes) < 1:
            raise ValueError("--nproc, --assemble_nproc and --nnodes must be >= 1")
        bad = [a for a in self.scheduler_args if "=" not in a]
        if bad:
            raise ValueError(f"--scheduler_args takes key=value pairs, got {bad}")

    def data_config(self, dataset: str) -> DataConfig:
        return DataConfig(dataset=dataset, data_dir=self.data_dir,
                          movielens_source=self.movielens_source, num_users=self.num_users,
                          num_items=self.num_items, num_instances=self.num_instances,
                          num_sparse_fields=self.num_sparse_fields)

    def item_feature_of(self, dataset: str) -> str:
        if self.item_feature:
            return self.item_feature
        return "movie" if dataset == "movielens" else "item_id"


@dataclasses.dataclass
class Step:
    """One stage launch: ``component`` (a function of ``torchx_components/components.py``)
    called with ``args``; done when every path of ``outputs`` exists. ``after`` names the steps
    whose outputs it reads (their fingerprints enter its own); ``checkpoint_dir`` (if any) is
    where a killed run of it resumes from."""

    name: str
    component: str
    args: Dict[str, Any]
    outputs: List[str]
    after: List[str] = dataclasses.field(default_factory=list)
    checkpoint_dir: Optional[str] = None


def slug(variant: str) -> str:
    return variant.replace(" ", "_").replace("+", "_")


def work_dir(run_dir: Path, dataset_name: str, seed: int) -> Path:
    """Where one dataset and seed's stage outputs go."""
    return run_dir / "work" / dataset_name / f"seed{seed}"


def results_path(work: Path, variant: str) -> Path:
    """The results file of one variant's downstream run."""
    return work / f"results_{slug(variant)}.json"


class _Planner:
    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.steps: List[Step] = []

    def add(self, step: Step) -> str:
        self.steps.append(step)
        return step.name

    def resources(self, training: bool = True) -> Dict[str, Any]:
        c = self.cfg
        nproc = c.nproc if training else c.assemble_nproc
        res: Dict[str, Any] = dict(j=f"{c.nnodes}x{nproc}", cpu=c.cpu, memMB=c.memMB)
        if training:
            res.update(gpu=c.gpu, device=c.device)
        return res

    def data(self, dataset: str) -> DataPaths:
        c = self.cfg
        dc = c.data_config(dataset)
        paths = data_paths(dc)
        args = {f.name: getattr(dc, f.name) for f in dataclasses.fields(dc)}
        self.add(Step(name=f"{paths.name}/data", component="prepare_data",
                      args={**args, "cpu": c.cpu, "memMB": c.memMB},
                      outputs=[str(p) for p in paths.splits.values()]))
        return paths

    def stores(self, paths: DataPaths, seed: int, work: Path, needed: set) -> Dict[str, str]:
        c = self.cfg
        splits = {k: str(v) for k, v in paths.splits.items()}
        common = dict(train_log=splits["train"], valid_log=splits["valid"],
                      export_logs=[splits[s] for s in SPLITS], seed=seed,
                      batch_size=c.batch_size, log_every=0,
                      checkpoint_every=c.checkpoint_every, **self.resources())
        data_step = f"{paths.name}/data"
        out: Dict[str, str] = {}
        for name in sorted(needed):
            store = str(work / name)
            out[name] = store
            ckpt = str(work / "checkpoints" / name)
            if name in SCHEMES:
                component = "compress"
                args = dict(store=store, scheme=SCHEMES[name], epochs=c.source_epochs,
                            token_dim=c.token_dim, dense_arch_layers=list(c.source_dense_layers),
                            decompress_layers=list(c.decompress_layers),
                            cross_rank=c.cross_rank, sit_heads=c.sit_heads,
                            sit_context=c.sit_context, token_dtype="fp32")
            else:
                component = "tokenize"
                args = dict(store=store, epochs=c.tokenizer_epochs, field_dim=c.field_dim,
                            d0=c.d0, levels=c.levels, codebook_size=c.codebook_size)
            self.add(Step(name=f"{paths.name}/seed{seed}/{name}", component=component,
                          args={**common, **args, "checkpoint_dir": ckpt}, outputs=[store],
                          after=[data_step], checkpoint_dir=ckpt))
        return out

    def histories(self, paths: DataPaths, seed: int, work: Path, stores: Dict[str, str],
                  needed: set) -> Dict[str, Dict[str, str]]:
        out: Dict[str, Dict[str, str]] = {}
        for name in sorted(needed):
            out[name] = {}
            for split in SPLITS:
                output = str(work / f"hist_{name}_{split}")
                out[name][split] = output
                self.add(Step(
                    name=f"{paths.name}/seed{seed}/hist_{name}_{split}", component="assemble",
                    args=dict(target_log=str(paths.splits[split]), store=stores[name],
                              output=output, max_len=self.cfg.max_len,
                              **self.resources(training=False)),
                    outputs=[output],
                    after=[f"{paths.name}/data", f"{paths.name}/seed{seed}/{name}"]))
        return out

    def train(self, paths: DataPaths, dataset: str, seed: int, work: Path, variant: str,
              stores: Dict[str, str], histories: Dict[str, Dict[str, str]]) -> str:
        c = self.cfg
        v = VARIANTS[variant]
        splits = {k: str(p) for k, p in paths.splits.items()}
        prefix = f"{paths.name}/seed{seed}"
        after = [f"{paths.name}/data"]
        kw: Dict[str, Any] = {}
        if v["store"] is not None:
            h = histories[v["store"]]
            kw.update(train_history=h["train"], valid_history=h["valid"],
                      test_history=h["test"])
            after += [f"{prefix}/hist_{v['store']}_{s}" for s in SPLITS]
            if v["store"] != "sif":
                kw["iat_store"] = stores[v["store"]]
                after.append(f"{prefix}/{v['store']}")
        if v["sif"]:
            kw["sif_store"] = stores["sif"]
            after.append(f"{prefix}/sif")
        results = str(results_path(work, variant))
        ckpt = str(work / "checkpoints" / slug(variant))
        args = dict(
            train_log=splits["train"], valid_log=splits["valid"], test_log=splits["test"],
            history_source=v["source"],
            interaction="mixer" if v["sif"] else c.baseline_interaction, results=results,
            seed=seed, epochs=c.epochs, batch_size=c.batch_size, log_every=0,
            checkpoint_dir=ckpt, checkpoint_every=c.checkpoint_every,
            embedding_dim=c.embedding_dim, dense_arch_layers=list(c.dense_arch_layers),
            over_arch_layers=list(c.over_arch_layers), item_feature=c.item_feature_of(dataset),
            item_history_len=min(c.item_history_len, c.max_len), d0=c.d0,
            num_blocks=c.num_blocks, num_heads=c.num_heads, bst_heads=c.num_heads,
            din_attention_layers=list(c.din_attention_layers), iat_adapt_dim=c.iat_adapt_dim,
            iat_side_dim=c.iat_side_dim, iat_layers=c.iat_layers, iat_heads=c.iat_heads,
            **kw, **self.resources())
        self.add(Step(name=f"{prefix}/train_{slug(variant)}", component="train", args=args,
                      outputs=[results], after=after, checkpoint_dir=ckpt))
        return results


def build_plan(cfg: PipelineConfig) -> List[Step]:
    """Every step of the pipeline in an order that respects their inputs; the last one is the
    evaluation, whose index of runs (``<run_dir>/runs.json``) :func:`runs_index` describes."""
    cfg.check()
    p = _Planner(cfg)
    stores_needed = {VARIANTS[v]["store"] for v in cfg.variants} - {None}
    hist_needed = set(stores_needed)
    if any(VARIANTS[v]["sif"] for v in cfg.variants):
        stores_needed.add("sif")
    train_steps: List[str] = []
    for dataset in cfg.dataset:
        paths = p.data(dataset)
        for seed in cfg.seeds:
            work = work_dir(p.run_dir, paths.name, seed)
            stores = p.stores(paths, seed, work, stores_needed)
            histories = p.histories(paths, seed, work, stores, hist_needed)
            for variant in cfg.variants:
                p.train(paths, dataset, seed, work, variant, stores, histories)
                train_steps.append(p.steps[-1].name)
    out = p.run_dir
    p.add(Step(name="evaluate", component="evaluate",
               args=dict(runs=str(out / RUNS_INDEX), out_dir=str(out), cpu=cfg.cpu,
                         memMB=cfg.memMB),
               outputs=[str(out / n) for n in ("results.md", "results.csv", "results.png",
                                                "summary.json")],
               after=train_steps))
    return p.steps


def runs_index(cfg: PipelineConfig) -> Dict[str, Any]:
    """What the evaluation reads: per dataset, its train log and each variant's results file
    per seed (``{"datasets": {name: {"train_log", "runs": {variant: [{"seed", "results"}]}}}``)."""
    index: Dict[str, Any] = {"datasets": {}}
    for dataset in cfg.dataset:
        paths = data_paths(cfg.data_config(dataset))
        runs = {v: [{"seed": s, "results": str(results_path(
            work_dir(Path(cfg.run_dir), paths.name, s), v))} for s in cfg.seeds]
            for v in cfg.variants}
        index["datasets"][paths.name] = {"train_log": str(paths.splits["train"]),
                                         "log": str(paths.log), "runs": runs}
    return json.loads(json.dumps(index))
