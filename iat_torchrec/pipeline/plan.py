"""The pipeline's plan: every stage of every dataset and seed, as TorchX component calls.

Per dataset (``--datasets``: synthetic, movielens or the path of a user's instance log) the data
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

**Transfer** (IAT paper: one source model serving other scenarios): the variants marked
``transfer`` read the IAT user-order tokens of *another domain*, ``transfer_data`` (its own
log, feature spec and splits, prepared like any dataset): its source model is trained on its
own train split under ``work/<its name>/seed<k>/iat_user``, every instance of it exported, and
each target split's histories are assembled on that store by user id
(``hist_transfer_iat_user_<split>``; target users it does not know get empty histories, labels
shown once matured in that domain's own delay). "Other-domain IAT" reads those tokens alone;
"DLRM+BST + other-domain IAT" keeps the target domain's own item history (BST) beside them;
"IAT user-order + other-domain IAT" is IAT user-order (BST and an IAT branch over the target
domain's own user-order store) with a second IAT branch over the other domain's tokens.

Settings: :class:`PipelineConfig` nests one typed config per stage (``data``, ``compress``,
``tokenize``, ``assemble``, ``downstream``: the stage configs themselves, so every setting keeps
its one declaration and default); the plan fills the fields it owns (:data:`PLAN_OWNED`: paths,
the seed, the variant's history source, the device) and passes the rest through unchanged.
A run is reproducible from the ``config.json`` it writes (``--config``).

Variants (METHOD.md, "Evaluation protocol"): DLRM (no history, dot interaction), DLRM+pooled
history and DCNv2 (the peer's DNN and DCNv2: the mean of the last k items and the mean of their
labels as two more features, through the dot interaction or TorchRec's DCN cross net),
DLRM+DIN, DLRM+BST, IAT temporal-order, IAT user-order (each with the BST item branch beside
the IAT branch), SIF (HGAQ codes through the SIF-Mixer) and SIF over IAT tokens (``sif_iat``,
user-order store). The
variants without an interaction of their own use ``baseline_interaction`` (dot: TorchRec's
DLRM); the SIF ones need the SIF-Mixer. What each variant needs (tokens, codes, the mixer)
comes from the model's table of history sources (:data:`iat_torchrec.models.variants.VARIANTS`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from iat_torchrec.config import nested, to_flat
from iat_torchrec.models.variants import HistorySource
from iat_torchrec.models.source import Scheme
from iat_torchrec.stages.assemble import AssembleConfig
from iat_torchrec.stages.compress import CompressConfig
from iat_torchrec.stages.evaluate import EvaluateConfig
from iat_torchrec.stages.prepare import DataConfig, DataPaths, data_paths
from iat_torchrec.stages.tokenize import TokenizeConfig
from iat_torchrec.stages.train import TrainDownstreamConfig

SPLITS = ("train", "valid", "test")
BASELINE = "DLRM+BST"
TRANSFER_STORE = "transfer_iat_user"  # the other domain's IAT user-order store
# name -> (history source, the store its histories index (None: no history), optionally its
# own interaction)
VARIANTS: Dict[str, Dict[str, Any]] = {
    "DLRM": dict(source="none", store=None),
    "DLRM+pooled history": dict(source="pooled", store="iat_temporal"),
    "DCNv2": dict(source="pooled", store="iat_temporal", interaction="dcn"),
    "DLRM+DIN": dict(source="din", store="iat_temporal"),
    "DLRM+BST": dict(source="bst", store="iat_temporal"),
    "IAT temporal-order": dict(source="iat", store="iat_temporal"),
    "IAT user-order": dict(source="iat", store="iat_user"),
    "SIF": dict(source="sif_codes", store="sif"),
    "SIF over IAT tokens": dict(source="sif_iat", store="iat_user"),
    "Other-domain IAT": dict(source="iat", store=TRANSFER_STORE, iat_item_branch="none"),
    "DLRM+BST + other-domain IAT": dict(source="iat", store=TRANSFER_STORE,
                                        item_store="iat_temporal", iat_item_branch="bst"),
    "IAT user-order + other-domain IAT": dict(source="iat", store=TRANSFER_STORE,
                                              item_store="iat_user", iat_item_branch="bst",
                                              item_store_iat=True),
}
SCHEMES = {"iat_temporal": Scheme.TEMPORAL, "iat_user": Scheme.USER}
TRANSFER_VARIANTS = tuple(v for v, d in VARIANTS.items() if d["store"] == TRANSFER_STORE)
RUNS_INDEX = "runs.json"
# Settings of each stage config that the plan sets (paths, seeds, per-variant choices, the
# device): not offered as pipeline flags.
_TRAINING = ("train.seed", "train.checkpoint_dir", "sharding.device")
_EXPORT = ("train_log", "valid_log", "export_logs", "store", "overwrite", "results", *_TRAINING)
PLAN_OWNED: Dict[str, tuple] = {
    "data": ("dataset",),
    "compress": (*_EXPORT, "scheme"),
    "tokenize": _EXPORT,
    "assemble": ("target_log", "store", "output", "overwrite"),
    "downstream": ("train_log", "valid_log", "test_log", "iat_store", "sif_store",
                   "train_history", "valid_history", "test_history", "item_logs", "results",
                   "item_store", "train_item_history", "valid_item_history",
                   "test_item_history", "model.history_source", "model.interaction",
                   "model.iat_item_branch", "model.item_store_iat", *_TRAINING),
}


def _needs_sif_store(variant: str) -> bool:
    """The SIF code store: codes of history steps, or codebooks for the mixer's L_align (the
    model's table: :attr:`~iat_torchrec.models.variants.Variant.is_sif`)."""
    return HistorySource(VARIANTS[variant]["source"]).variant.is_sif


@dataclasses.dataclass
class PipelineConfig:
    """The whole pipeline: data, stage 1 (IAT source models, HGAQ tokenizer), assembly, every
    downstream variant over seeds, evaluation; each stage a TorchX job."""

    datasets: List[str] = dataclasses.field(default_factory=lambda: ["synthetic"], metadata={
        "help": "synthetic (built-in default), movielens, and / or paths of instance logs "
                "(a directory with feature_spec.json)"})
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "seeds (each re-trains every stage)"})
    variants: List[str] = dataclasses.field(
        default_factory=lambda: [v for v in VARIANTS if v not in TRANSFER_VARIANTS], metadata={
            "help": "variants to run (default all but the transfer ones, which need "
                    "--transfer_data): " + ", ".join(VARIANTS)})
    baseline_interaction: str = dataclasses.field(default="dot", metadata={
        "help": "interaction of the non-SIF variants without one of their own: dot (TorchRec "
                "DLRM), concat (a DNN, the peer's), dcn or mixer"})
    run_dir: str = dataclasses.field(default="outputs/pipeline", metadata={
        "help": "results.{md,csv,png}, summary.json, logs/ (per stage) and work/ (stage "
                "outputs); a re-run skips the stages already made there"})
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
    cpu: int = dataclasses.field(default=1, metadata={"help": "CPUs per process"})
    gpu: int = dataclasses.field(default=0, metadata={
        "help": "GPUs per process of the training stages (> 0: they run on cuda)"})
    memMB: int = dataclasses.field(default=4096, metadata={"help": "memory per process, MB"})
    group_launches: bool = dataclasses.field(default=True, metadata={
        "help": "launch the ready stages of one kind together (one TorchX job running a task "
                "file: start-up paid once); false: one job per stage"})
    # ------------------------------------------------------------------ the stages
    data: DataConfig = nested(DataConfig, "the data stage (every dataset)")
    transfer_data: DataConfig = nested(DataConfig, "the other domain whose IAT user-order "
                                                   "tokens the transfer variants read (its "
                                                   "dataset must differ from every --datasets)")
    compress: CompressConfig = nested(CompressConfig, "the IAT source models (both orders)")
    tokenize: TokenizeConfig = nested(TokenizeConfig, "the HGAQ tokenizer")
    assemble: AssembleConfig = nested(AssembleConfig, "history assembly (every store and split)")
    downstream: TrainDownstreamConfig = nested(TrainDownstreamConfig, "every downstream variant")

    def check(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        if not self.seeds or not self.datasets or not self.variants:
            raise ValueError("give at least one dataset, one seed and one variant")
        if min(self.nproc, self.assemble_nproc, self.nnodes) < 1:
            raise ValueError("--nproc, --assemble_nproc and --nnodes must be >= 1")
        bad = [a for a in self.scheduler_args if "=" not in a]
        if bad:
            raise ValueError(f"--scheduler_args takes key=value pairs, got {bad}")
        if self.transfers:
            other = data_paths(self.transfer_data).name
            clash = [d for d in self.datasets if data_paths(self.data_config(d)).name == other]
            if clash:
                raise ValueError(f"--transfer_data is the dataset {other!r}, also in --datasets: "
                                 "the transfer variants read another domain (for synthetic "
                                 "data set --data.synthetic.domain 1 for the target; for "
                                 "MovieLens two --movielens_domain values)")

    @property
    def transfers(self) -> bool:
        """Some chosen variant reads the other domain (``transfer_data``)."""
        return any(v in TRANSFER_VARIANTS for v in self.variants)

    @property
    def device(self) -> str:
        """Where the training stages run."""
        return "cuda" if self.gpu > 0 else "cpu"

    def data_config(self, dataset: str) -> DataConfig:
        return dataclasses.replace(self.data, dataset=dataset)

    def item_feature_of(self, dataset: str) -> str:
        if self.downstream.model.item_feature:
            return self.downstream.model.item_feature
        return "movie" if dataset == "movielens" else "item_id"


def pipeline_flag_exclusions() -> List[str]:
    """The dotted settings of :class:`PipelineConfig` the plan owns (not offered as flags)."""
    return [f"{stage}.{name}" for stage, names in PLAN_OWNED.items() for name in names]


@dataclasses.dataclass
class Step:
    """One stage launch: ``component`` (a function of ``torchx_components/components.py``)
    called with :attr:`args`: the settings of ``config`` (the stage's typed config, or a plain
    mapping of component arguments) by dotted name, and ``resources``; done when every path of
    ``outputs`` exists. ``after`` names the steps whose outputs it reads (their fingerprints
    enter its own); ``checkpoint_dir`` (if any) is where a killed run of it resumes from."""

    name: str
    component: str
    config: Any
    outputs: List[str]
    after: List[str] = dataclasses.field(default_factory=list)
    checkpoint_dir: Optional[str] = None
    resources: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def args(self) -> Dict[str, Any]:
        """The component's keyword arguments."""
        settings = to_flat(self.config) if dataclasses.is_dataclass(self.config) \
            else dict(self.config)
        return {**settings, **self.resources}


def slug(variant: str) -> str:
    return variant.replace(" ", "_").replace("+", "_")


def work_dir(run_dir: Path, dataset_name: str, seed: int) -> Path:
    """Where one dataset and seed's stage outputs go."""
    return run_dir / "work" / dataset_name / f"seed{seed}"


def results_path(work: Path, variant: str) -> Path:
    """The results file of one variant's downstream run."""
    return work / f"results_{slug(variant)}.json"


def _training(config: Any, seed: int, checkpoint_dir: str, device: str) -> Dict[str, Any]:
    """The plan-owned training settings of a stage config."""
    return dict(train=dataclasses.replace(config.train, seed=seed,
                                          checkpoint_dir=checkpoint_dir),
                sharding=dataclasses.replace(config.sharding, device=device))


class _Planner:
    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.steps: List[Step] = []
        self.transfer_paths: Optional[DataPaths] = None

    def add(self, name: str, component: str, config: Any, outputs: List[str],
            after: Optional[List[str]] = None, checkpoint_dir: Optional[str] = None,
            training: bool = True, distributed: bool = True) -> str:
        c = self.cfg
        res: Dict[str, Any] = dict(cpu=c.cpu, memMB=c.memMB)
        if distributed:
            res["j"] = f"{c.nnodes}x{c.nproc if training else c.assemble_nproc}"
        if training:
            res["gpu"] = c.gpu
        self.steps.append(Step(name=name, component=component, config=config, outputs=outputs,
                               after=list(after or []), checkpoint_dir=checkpoint_dir,
                               resources=res))
        return name

    def data(self, dc: DataConfig) -> DataPaths:
        paths = data_paths(dc)
        self.add(f"{paths.name}/data", "prepare_data", dc,
                 [str(p) for p in paths.splits.values()], training=False, distributed=False)
        return paths

    def stores(self, paths: DataPaths, seed: int, needed: set) -> Dict[str, str]:
        return {name: self.transfer_store(seed) if name == TRANSFER_STORE
                else self.store(paths, seed, name) for name in sorted(needed)}

    def store(self, paths: DataPaths, seed: int, name: str) -> str:
        """Plan store ``name`` (an IAT scheme of :data:`SCHEMES`, or ``sif``) of ``paths``'
        dataset and ``seed``: trained on its train split, every split exported; its path."""
        c = self.cfg
        work = work_dir(self.run_dir, paths.name, seed)
        splits = {k: str(v) for k, v in paths.splits.items()}
        io = dict(train_log=splits["train"], valid_log=splits["valid"],
                  export_logs=[splits[s] for s in SPLITS])
        store = str(work / name)
        ckpt = str(work / "checkpoints" / name)
        if name in SCHEMES:
            component = "compress"
            config: Any = dataclasses.replace(c.compress, store=store, scheme=SCHEMES[name],
                                              **io, **_training(c.compress, seed, ckpt,
                                                                c.device))
        else:
            component = "tokenize"
            config = dataclasses.replace(c.tokenize, store=store, **io,
                                         **_training(c.tokenize, seed, ckpt, c.device))
        self.add(f"{paths.name}/seed{seed}/{name}", component, config, [store],
                 after=[f"{paths.name}/data"], checkpoint_dir=ckpt)
        return store

    def transfer_store(self, seed: int) -> str:
        """The other domain's IAT user-order store of ``seed`` (planned once per seed, with the
        other domain's data stage the first time)."""
        if self.transfer_paths is None:
            self.transfer_paths = self.data(self.cfg.transfer_data)
        paths = self.transfer_paths
        if self.store_step(paths, seed, TRANSFER_STORE) in {s.name for s in self.steps}:
            return str(work_dir(self.run_dir, paths.name, seed) / "iat_user")
        return self.store(paths, seed, "iat_user")

    def store_step(self, paths: DataPaths, seed: int, name: str) -> str:
        """The name of the step that makes store ``name`` for ``paths``' runs of ``seed``."""
        if name == TRANSFER_STORE:
            assert self.transfer_paths is not None
            return f"{self.transfer_paths.name}/seed{seed}/iat_user"
        return f"{paths.name}/seed{seed}/{name}"

    def histories(self, paths: DataPaths, seed: int, work: Path, stores: Dict[str, str],
                  needed: set) -> Dict[str, Dict[str, str]]:
        out: Dict[str, Dict[str, str]] = {}
        for name in sorted(needed):
            out[name] = {}
            for split in SPLITS:
                output = str(work / f"hist_{name}_{split}")
                out[name][split] = output
                config = dataclasses.replace(
                    self.cfg.assemble, target_log=str(paths.splits[split]), store=stores[name],
                    output=output,
                    allow_unknown_users=(name == TRANSFER_STORE
                                         or self.cfg.assemble.allow_unknown_users))
                self.add(f"{paths.name}/seed{seed}/hist_{name}_{split}", "assemble", config,
                         [output], after=[f"{paths.name}/data",
                                          self.store_step(paths, seed, name)],
                         training=False)
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
                after.append(self.store_step(paths, seed, v["store"]))
        if "item_store" in v:
            h = histories[v["item_store"]]
            kw.update(item_store=stores[v["item_store"]], train_item_history=h["train"],
                      valid_item_history=h["valid"], test_item_history=h["test"])
            after += [f"{prefix}/{v['item_store']}",
                      *(f"{prefix}/hist_{v['item_store']}_{s}" for s in SPLITS)]
        sif = _needs_sif_store(variant)
        if sif:
            kw["sif_store"] = stores["sif"]
            after.append(f"{prefix}/sif")
        results = str(results_path(work, variant))
        ckpt = str(work / "checkpoints" / slug(variant))
        d = c.downstream
        model = dataclasses.replace(
            d.model, history_source=HistorySource(v["source"]),
            interaction="mixer" if sif else v.get("interaction", c.baseline_interaction),
            item_feature=c.item_feature_of(dataset),
            iat_item_branch=v.get("iat_item_branch", d.model.iat_item_branch),
            item_store_iat=v.get("item_store_iat", False),
            item_history_len=min(d.model.item_history_len, c.assemble.max_len))
        config = dataclasses.replace(
            d, train_log=splits["train"], valid_log=splits["valid"], test_log=splits["test"],
            results=results, model=model, **kw, **_training(d, seed, ckpt, c.device))
        return self.add(f"{prefix}/train_{slug(variant)}", "train", config, [results],
                        after=after, checkpoint_dir=ckpt)


def build_plan(cfg: PipelineConfig) -> List[Step]:
    """Every step of the pipeline in an order that respects their inputs; the last one is the
    evaluation, whose index of runs (``<run_dir>/runs.json``) :func:`runs_index` describes."""
    cfg.check()
    p = _Planner(cfg)
    stores_needed = ({VARIANTS[v]["store"] for v in cfg.variants}
                     | {VARIANTS[v]["item_store"] for v in cfg.variants
                        if "item_store" in VARIANTS[v]}) - {None}
    hist_needed = set(stores_needed)
    if any(_needs_sif_store(v) for v in cfg.variants):
        stores_needed.add("sif")
    train_steps: List[str] = []
    for dataset in cfg.datasets:
        paths = p.data(cfg.data_config(dataset))
        for seed in cfg.seeds:
            work = work_dir(p.run_dir, paths.name, seed)
            stores = p.stores(paths, seed, stores_needed)
            histories = p.histories(paths, seed, work, stores, hist_needed)
            for variant in cfg.variants:
                train_steps.append(p.train(paths, dataset, seed, work, variant, stores,
                                           histories))
    out = p.run_dir
    p.add("evaluate", "evaluate", EvaluateConfig(runs=str(out / RUNS_INDEX), out_dir=str(out)),
          [str(out / n) for n in ("results.md", "results.csv", "results.png", "summary.json")],
          after=train_steps, training=False, distributed=False)
    return p.steps


def runs_index(cfg: PipelineConfig) -> Dict[str, Any]:
    """What the evaluation reads: the baseline variant, and per dataset its train log and each
    variant's results file per seed (``{"baseline", "datasets": {name: {"train_log", "log",
    "runs": {variant: [{"seed", "results"}]}}}}``)."""
    index: Dict[str, Any] = {"baseline": BASELINE, "datasets": {}}
    for dataset in cfg.datasets:
        paths = data_paths(cfg.data_config(dataset))
        runs = {v: [{"seed": s, "results": str(results_path(
            work_dir(Path(cfg.run_dir), paths.name, s), v))} for s in cfg.seeds]
            for v in cfg.variants}
        index["datasets"][paths.name] = {"train_log": str(paths.splits["train"]),
                                         "log": str(paths.log), "runs": runs}
    return json.loads(json.dumps(index))
