"""Benchmark: downstream training samples/s of DLRM_SIF with a history of L steps, against DLRM.

    python apps/bench_downstream.py [--lengths 64 256] [--batch_size 256]   # one CPU core
    python apps/bench_downstream.py --one_core false [--threads 0]           # all CPU cores
    python apps/bench_downstream.py --device cuda --one_core false           # one GPU

Times, in the same run and on the same device, training steps (forward, backward, optimizer) of
``DLRM_SIFTrain(DLRM_SIF(...))`` for

- the reference: **DLRM, no history** (history source ``none``, dot interaction: TorchRec's DLRM);
- at each history length L: **DLRM+DIN** and **DLRM+BST** (item-id history of the last k = L
  steps, or ``--item_history_len`` k <= L), **IAT** (``iat``: IAT tokens through the IAT branch,
  beside the BST item branch as the library builds it), all with the dot interaction; **SIF**
  (HGAQ codes through the SIF-Mixer, ``sif_codes``) and **SIF over IAT tokens** (``sif_iat``),
  both with L_align.

The model is built and trained the way ``apps/train.py`` does (``run_train``): the
``TrainDownstreamConfig`` defaults (its nested model config), sharded by ``build_sharded``
(tables on the meta device, DistributedModelParallel in a one-process gloo / nccl group, fused
row-wise Adagrad on the tables, Adam on the rest) and stepped by ``TrainPipelineSparseDist``.

Inputs are synthetic and built once, in a temporary folder: a generated instance log (26 sparse
fields of dim 16, 13 dense), ``num_batches`` batches of it cycled; an IAT token store of
``store_rows`` random tokens (``InstanceTokenLookup``), random HGAQ codes of the same rows
(``SampleCodeLookup``) and random codebooks; per batch a random history of exactly L real steps
(store rows, matured labels, gap buckets) and random items. Per model, ``warmup`` steps are not
timed; then the models take turns running ``steps`` steps, ``repeats`` times, and the best turn
is kept. Samples/s = batch_size / seconds per step.

Per row also the model's FLOPs and bytes per sample (forward + backward, counted analytically as
``iat_torchrec.models.cost`` says: the history branch or mixer, DLRM's dense and over arch MLPs,
the dot interaction, the embeddings, tokens and codes read; the optimizer is not counted),
achieved GFLOP/s and GB/s, and the fraction of the roofline min(matmul rate, copy bandwidth x
FLOPs / bytes), both limits measured in the same run (``iat_torchrec.benchmark.Limits``). A last
row: the start-up of one stage process, the best wall seconds of ``startup_repeats`` fresh
processes importing torch, torchrec and ``iat_torchrec.stages.train``.

Sizes: ``--mixer.*`` and ``--iat.*`` set the SIF-Mixer and IAT branch (default: the method's,
``DLRMSIFConfig``'s defaults); the main job's are ``--lengths 50 --mixer.num_blocks 2
--iat.adapt_dim 32 --iat.side_dim 32 --iat.num_layers 1 --iat.num_heads 2 --token_dim 32
--token_dtype fp32``.

Clock: by default (``one_core``, CPU) the process runs on one core with one thread
(``iat_torchrec.benchmark.pin_one_core``) and steps are timed in CPU seconds of the process
(``time.process_time``): per-core rates that other jobs on a shared machine hardly skew (with
several threads, a core taken by another job stalls every parallel region). Otherwise steps are
timed in wall seconds (after a CUDA synchronize on GPU) with ``threads`` CPU threads.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from iat_torchrec.benchmark import (ROOFLINE_COLUMNS, Limits, best_in_turns, import_seconds,
                                    markdown_table, pin_one_core, roofline_cells)
from iat_torchrec.config import parse_config
from iat_torchrec.data.batch import InstanceBatch
from iat_torchrec.data.reader import InstanceLogReader, ReaderConfig
from iat_torchrec.data.spec import FeatureSpec
from iat_torchrec.data.synthetic import SyntheticConfig, generate
from iat_torchrec.distributed.collectives import DistEnv, init_process_group
from iat_torchrec.distributed.sharding import ShardingConfig
from iat_torchrec.history import LABEL_PAD, DownstreamBatch, HistoryBatch, HistoryLayout
from iat_torchrec.models import cost
from iat_torchrec.models.dlrm_sif import DLRM_SIF, DLRM_SIFTrain, DLRMSIFConfig
from iat_torchrec.models.hgaq import HGAQConfig, subtoken_layout
from iat_torchrec.models.history import IATBranchConfig
from iat_torchrec.models.mixer import SIFMixerConfig
from iat_torchrec.stages.common import build_sharded
from iat_torchrec.stages.train import TrainDownstreamConfig
from iat_torchrec.tokens.lookup import InstanceTokenLookup, SampleCodeLookup
from iat_torchrec.tokens.store import TokenStore
from iat_torchrec.train.loop import TrainConfig

ITEM_FEATURE = "item_id"  # the synthetic log's item field
STAGE_MODULES = ("torch", "torchrec", "iat_torchrec.stages.train")
TOKEN_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
REFERENCE = ("DLRM, no history", "none", "dot")
STARTUP = "stage process start-up"  # the row of import_seconds(STAGE_MODULES)
# (row name, history source, interaction), timed at every L.
VARIANTS: Tuple[Tuple[str, str, str], ...] = (
    ("DLRM+DIN", "din", "dot"),
    ("DLRM+BST", "bst", "dot"),
    ("IAT (IAT branch + BST items)", "iat", "dot"),
    ("SIF (HGAQ codes, SIF-Mixer)", "sif_codes", "mixer"),
    ("SIF over IAT tokens", "sif_iat", "mixer"),
)


@dataclasses.dataclass
class BenchDownstreamConfig:
    """Downstream-model training benchmark."""

    device: str = dataclasses.field(default="cpu", metadata={"help": "cpu or cuda"})
    lengths: List[int] = dataclasses.field(default_factory=lambda: [64, 256],
                                           metadata={"help": "history lengths L"})
    batch_size: int = dataclasses.field(default=256, metadata={"help": "samples per step"})
    num_batches: int = dataclasses.field(default=4, metadata={
        "help": "distinct batches, cycled (the log holds batch_size x num_batches rows)"})
    item_history_len: int = dataclasses.field(default=0, metadata={
        "help": "k of DIN / BST / IAT's item branch, capped at L (0: k = L)"})
    store_rows: int = dataclasses.field(default=100_000, metadata={
        "help": "rows of the token store the histories index"})
    token_dim: int = dataclasses.field(default=64, metadata={"help": "IAT token width d"})
    token_dtype: str = dataclasses.field(default="fp16", metadata={
        "help": "IAT store dtype: fp32 | fp16 | int8"})
    mixer: SIFMixerConfig = dataclasses.field(default_factory=SIFMixerConfig, metadata={
        "help": "SIF-Mixer sizes"})
    iat: IATBranchConfig = dataclasses.field(default_factory=IATBranchConfig, metadata={
        "help": "IAT branch sizes"})
    startup_repeats: int = dataclasses.field(default=3, metadata={
        "help": "fresh stage processes timed for the start-up row (best kept; 0: no row)"})
    warmup: int = dataclasses.field(default=1, metadata={"help": "untimed steps per model"})
    steps: int = dataclasses.field(default=1, metadata={"help": "steps per timed turn"})
    repeats: int = dataclasses.field(default=3, metadata={"help": "timed turns (best kept)"})
    one_core: bool = dataclasses.field(default=True, metadata={
        "help": "CPU: one pinned core, one thread, CPU-seconds clock (see the docstring)"})
    threads: int = dataclasses.field(default=0, metadata={
        "help": "CPU threads without one_core (0: torch's default)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of data and weights"})
    work_dir: str = dataclasses.field(default="", metadata={"help": "scratch dir (default tmp)"})


@dataclasses.dataclass
class Inputs:
    """What every model reads: spec, frozen lookups and codebooks, the instance batches."""

    spec: FeatureSpec
    token_lookup: InstanceTokenLookup
    code_lookup: SampleCodeLookup
    codebooks: torch.Tensor
    batches: List[InstanceBatch]


def make_inputs(cfg: BenchDownstreamConfig, env: DistEnv, tmp: Path) -> Inputs:
    """The synthetic log's batches, a random IAT token store with its lookup, random codes of
    the same rows and random codebooks (HGAQ's default sizes)."""
    rng = np.random.default_rng(cfg.seed)
    log = generate(SyntheticConfig(num_instances=cfg.batch_size * cfg.num_batches,
                                   num_sparse_fields=26, num_dense_fields=13, seed=cfg.seed,
                                   threads=0), tmp / "log")
    spec = FeatureSpec.load(log)
    batches = list(InstanceLogReader(log, spec, ReaderConfig(batch_size=cfg.batch_size,
                                                             drop_last=True)))
    n = cfg.store_rows
    writer = TokenStore.create(tmp / "iat", kind="iat", token_shape=(cfg.token_dim,),
                               dtype=cfg.token_dtype)
    writer.append(np.arange(n), rng.integers(0, 1000, n), np.arange(n), rng.integers(0, 2, n),
                  rng.standard_normal((n, cfg.token_dim), dtype=np.float32))
    store = writer.close()
    hgaq = HGAQConfig()
    t = len(subtoken_layout(spec, hgaq.fields_per_subtoken))
    codes = rng.integers(0, hgaq.codebook_size, (n, t, hgaq.levels), dtype=np.uint8)
    codebooks = torch.from_numpy(rng.standard_normal(
        (t, hgaq.levels, hgaq.codebook_size, hgaq.d0), dtype=np.float32))
    return Inputs(spec, InstanceTokenLookup(store, env.device),
                  SampleCodeLookup(codes, env.device), codebooks, batches)


def random_history(rng: np.random.Generator, batch_size: int, length: int, store_rows: int,
                   layout: HistoryLayout) -> HistoryBatch:
    """A history of exactly ``length`` real steps per sample: random store rows, labels and gap
    buckets (growing towards the oldest step)."""
    gaps = -np.sort(-rng.integers(0, layout.gap_pad, (batch_size, length)), axis=1)
    return HistoryBatch(
        row_ids=torch.from_numpy(rng.integers(0, store_rows, (batch_size, length))),
        mask=torch.ones(batch_size, length, dtype=torch.bool),
        label=torch.from_numpy(rng.integers(0, LABEL_PAD, (batch_size, length))),
        gap_bucket=torch.from_numpy(gaps),
        length=torch.full((batch_size,), length, dtype=torch.long))


def variant_config(cfg: BenchDownstreamConfig, source: str, interaction: str,
                   length: int) -> TrainDownstreamConfig:
    """``apps/train.py``'s configuration of one variant (its model and sharding defaults)."""
    return TrainDownstreamConfig(
        model=DLRMSIFConfig(history_source=source, interaction=interaction,
                            item_feature=ITEM_FEATURE, mixer=cfg.mixer, iat=cfg.iat,
                            item_history_len=min(cfg.item_history_len or length, length)),
        train=TrainConfig(batch_size=cfg.batch_size, seed=cfg.seed),
        sharding=ShardingConfig(device=cfg.device))


def variant_batches(inputs: Inputs, mcfg: DLRMSIFConfig, length: int, seed: int,
                    store_rows: int, device: torch.device) -> List[DownstreamBatch]:
    """The batches a variant reads, on ``device``: history, item features and target codes as
    its history source needs (the same random draws for every variant of one L)."""
    rng = np.random.default_rng((seed, length))
    v = mcfg.variant
    k = mcfg.item_history_len if mcfg.item_branch != "none" else 0
    t, levels, codebook_size = inputs.codebooks.shape[:3]
    item_vocab = inputs.spec.field(ITEM_FEATURE).num_embeddings
    out = []
    for b in inputs.batches:
        n = len(b)
        history = random_history(rng, n, length, store_rows, HistoryLayout())
        items = torch.from_numpy(rng.integers(0, item_vocab, (n, length)))
        codes = torch.from_numpy(rng.integers(0, codebook_size, (n, t, levels)))
        out.append(DownstreamBatch.build(
            b, history if v.reads_history else None, items if k else None, k,
            codes if v.is_sif else None).to(device))
    return out


def _mlp(batch: int, sizes: List[int]) -> cost.Cost:
    """Linear layers of ``sizes[0] -> ... -> sizes[-1]`` on one row per sample."""
    return cost.total([cost.linear(batch, a, b) + cost.activations(2 * batch * b)
                       for a, b in zip(sizes, sizes[1:])])


def variant_cost(cfg: BenchDownstreamConfig, spec: FeatureSpec, mcfg: DLRMSIFConfig,
                 length: int) -> cost.Cost:
    """One training step's analytic cost (``iat_torchrec.models.cost``): DLRM's dense arch,
    embeddings, interaction and over arch, plus the variant's history parts."""
    b, d, f = cfg.batch_size, mcfg.embedding_dim, len(spec.sparse)
    v, k = mcfg.variant, mcfg.item_history_len
    parts = [_mlp(b, [len(spec.dense), *mcfg.dense_arch_layers, d]), cost.inputs(b * f * d)]
    items = [cost.inputs(b * k * d)] if mcfg.item_branch != "none" else []
    if mcfg.item_branch == "din":
        items.append(cost.din(b, k, d, mcfg.din.attention_layers))
    elif mcfg.item_branch == "bst":
        items.append(cost.bst(b, k, d, mcfg.bst.num_heads, mcfg.bst.ffn_mult,
                              mcfg.bst.num_layers, mcfg.bst.output == "target"))
    parts += items
    i, m = mcfg.iat, mcfg.mixer
    if v.is_sif:
        layout = subtoken_layout(spec, HGAQConfig().fields_per_subtoken)
        t, width = len(layout), max(len(s.fields) for s in layout)
        parts.append(cost.sif_mixer(b, length, t, m.d0, m.num_heads, m.ffn_mult, m.num_blocks,
                                    (1 + width) * d))
        if v.uses_codes:
            parts.append(cost.inputs(b * length * t * HGAQConfig().levels, 8))
        if v.uses_tokens:
            parts += [cost.inputs(b * length * cfg.token_dim, TOKEN_BYTES[cfg.token_dtype]),
                      cost.linear(b * length, cfg.token_dim, t * m.d0)]
        over_in = m.d0
    else:
        if v.uses_tokens:
            parts.append(cost.iat_branch(b, length, cfg.token_dim, (1 + f) * d, d, i.adapt_dim,
                                         i.side_dim, i.num_heads, i.ffn_mult, i.num_layers,
                                         TOKEN_BYTES[cfg.token_dtype]))
        n = f + int(mcfg.item_branch != "none") + int(v.uses_tokens)  # features + tokens
        parts.append(cost.Cost(cost.FWD_BWD * b * n * (n + 1) * d, 0.0))  # dot products
        over_in = d + n * (n - 1) // 2 + n
    parts.append(_mlp(b, [over_in, *mcfg.over_arch_layers, len(spec.labels)]))
    return cost.total(parts)


def build_pipeline(inputs: Inputs, train_cfg: TrainDownstreamConfig,
                   env: DistEnv) -> TrainPipelineSparseDist:
    """One variant sharded and wrapped as ``run_train`` does it (default history layout and
    tokenizer B)."""
    mcfg = train_cfg.model
    v = mcfg.variant
    model, optimizer = build_sharded(
        lambda tables: DLRM_SIFTrain(DLRM_SIF(
            inputs.spec, mcfg, token_lookup=inputs.token_lookup if v.uses_tokens else None,
            code_lookup=inputs.code_lookup if v.uses_codes else None,
            codebooks=inputs.codebooks if v.is_sif else None,
            gap_vocab_size=HistoryLayout().gap_vocab_size,
            fields_per_subtoken=HGAQConfig().fields_per_subtoken,
            device=env.device if tables is not None else None, table_device=tables)),
        train_cfg.train.seed, env, train_cfg.sharding, train_cfg.train.batch_size)
    return TrainPipelineSparseDist(model, optimizer, env.device)


def _steps(pipeline: TrainPipelineSparseDist, batches: Iterator[DownstreamBatch],
           n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            pipeline.progress(batches)
    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: Optional[List[str]] = None) -> None:
    logging.getLogger().setLevel(logging.ERROR)
    cfg = parse_config(BenchDownstreamConfig, argv)
    per_core = cfg.one_core and cfg.device == "cpu"
    if per_core:
        pin_one_core()
    elif cfg.threads:
        torch.set_num_threads(cfg.threads)
    clock = time.process_time if per_core else time.perf_counter
    env = init_process_group(cfg.device)
    # (L, name, history source, interaction); L = 0: no history.
    rows = [(0, *REFERENCE)] + [(length, *v) for length in cfg.lengths for v in VARIANTS]
    try:
        limits = Limits.measure(env.device, cfg.repeats)
        with tempfile.TemporaryDirectory(dir=cfg.work_dir or None) as tmp:
            inputs = make_inputs(cfg, env, Path(tmp))
            runs, costs = [], []
            for length, _, source, interaction in rows:
                train_cfg = variant_config(cfg, source, interaction, length)
                mcfg = train_cfg.model
                costs.append(variant_cost(cfg, inputs.spec, mcfg, length)
                             .per_sample(cfg.batch_size))
                pipeline = build_pipeline(inputs, train_cfg, env)
                batches = itertools.cycle(variant_batches(inputs, mcfg, length, cfg.seed,
                                                 cfg.store_rows, env.device))
                _steps(pipeline, batches, cfg.warmup)()
                runs.append(_steps(pipeline, batches, cfg.steps))
            best = best_in_turns(runs, cfg.repeats, clock=clock,
                                 sync=lambda: _sync(env.device))
    finally:
        dist.destroy_process_group()
    seconds = [s / cfg.steps for s in best]

    device = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} thread(s)"
    k = f"k = {cfg.item_history_len}" if cfg.item_history_len else "k = L"
    print(f"\ndownstream training benchmark on {device}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}: batch {cfg.batch_size}, "
          f"{len(inputs.spec.sparse)} sparse fields (D = {mcfg.embedding_dim}) + "
          f"{len(inputs.spec.dense)} dense, item history {k}, IAT tokens d = {cfg.token_dim} "
          f"{cfg.token_dtype} ({cfg.store_rows:,} rows); IAT branch {cfg.iat.adapt_dim} + "
          f"{cfg.iat.side_dim}, {cfg.iat.num_layers} layer(s), {cfg.iat.num_heads} heads; "
          f"SIF-Mixer N = {cfg.mixer.num_blocks}; one process, DMP + fused row-wise "
          f"Adagrad + Adam, TrainPipelineSparseDist; best of {cfg.repeats} x {cfg.steps} steps "
          f"after {cfg.warmup} warm-up, in {'CPU' if per_core else 'wall'} seconds")
    print(f"limits measured in this run: {limits.describe()}")
    ref = cfg.batch_size / seconds[0]
    table = []
    for (length, name, source, interaction), secs, c in zip(rows, seconds, costs):
        rate = cfg.batch_size / secs
        table.append((length or "-", name, source, interaction, secs * 1e3, rate / ref,
                      *roofline_cells(rate, c.flops, c.bytes, limits)))
    if cfg.startup_repeats:
        table.append(("-", STARTUP, "-", "-", 1e3 * import_seconds(STAGE_MODULES,
                                                                    cfg.startup_repeats),
                      *["-"] * (1 + len(ROOFLINE_COLUMNS))))
    print(markdown_table([("L", ">4"), ("what", "<30"), ("source", "<9"), ("interaction", "<11"),
                          ("ms / step", ">9.1f"), ("x " + REFERENCE[0], ">20.4f"),
                          *ROOFLINE_COLUMNS], table))


if __name__ == "__main__":
    main()
