"""TorchX components launching the iat-torchrec apps on any TorchX scheduler.

    torchx run -s local_cwd torchx_components/components.py:prepare_data --dataset movielens

Each component's arguments carry the same names as the app's flags and the library's config
dataclass (a test checks them against it); ``image``, ``cpu`` and ``memMB`` are the resources,
so the same component runs under local_cwd, Slurm or Kubernetes without code changes. The apps
run with ``python`` from PATH: activate the project's environment first (``.venv``).
(No ``from __future__ import annotations`` here: TorchX decodes arguments from real types.)
"""


from typing import List, Optional

import torchx
import torchx.specs as specs
from torchx.components.dist import ddp
from torchx.components.utils import python

from iat_torchrec.config import config_to_args
from iat_torchrec.data.prepare import DataConfig
from iat_torchrec.models.source import Scheme, SourceModelConfig
from iat_torchrec.models.hgaq import HGAQConfig
from iat_torchrec.stages.compress import CompressConfig
from iat_torchrec.stages.tokenize import TokenizeConfig


def prepare_data(
    dataset: str = "synthetic",
    data_dir: str = "outputs/data",
    movielens_source: str = "../shared/data/ml-latest-small",
    num_users: int = 20_000,
    num_items: int = 10_000,
    num_instances: int = 1_000_000,
    num_sparse_fields: int = 26,
    num_dense_fields: int = 13,
    seed: int = 0,
    split_method: str = "auto",
    train_fraction: float = 0.8,
    valid_fraction: float = 0.1,
    image: str = torchx.IMAGE,
    cpu: int = 2,
    memMB: int = 4096,
) -> specs.AppDef:
    """Make or import an instance log, validate it and split it in time (apps/prepare_data.py).

    Args:
        dataset: synthetic (built-in default), movielens, or the path of your own instance log
        data_dir: where prepared logs and their splits are written
        movielens_source: MovieLens directory for --dataset movielens
        num_users: synthetic: users
        num_items: synthetic: items
        num_instances: synthetic: instances
        num_sparse_fields: synthetic: sparse fields
        num_dense_fields: synthetic: dense fields
        seed: synthetic: seed
        split_method: auto (per_user for movielens, time otherwise), per_user or time
        train_fraction: per user: fraction of each user's rows; time: quantile of ts
        valid_fraction: likewise for valid; the rest is test
        image: image (local_cwd: the working directory)
        cpu: CPUs
        memMB: memory in MB
    """
    config = DataConfig(dataset=dataset, data_dir=data_dir, movielens_source=movielens_source,
                        num_users=num_users, num_items=num_items, num_instances=num_instances,
                        num_sparse_fields=num_sparse_fields, num_dense_fields=num_dense_fields,
                        seed=seed, split_method=split_method, train_fraction=train_fraction,
                        valid_fraction=valid_fraction)
    return python(*config_to_args(config), script="apps/prepare_data.py", image=image,
                  name="iat-prepare-data", cpu=cpu, memMB=memMB)


def compress(
    train_log: str,
    store: str,
    valid_log: str = "",
    export_logs: Optional[List[str]] = None,
    overwrite: bool = False,
    scheme: str = "user",
    two_pass: bool = False,
    token_dtype: str = "fp16",
    results: str = "",
    token_dim: int = 64,
    bottleneck: bool = True,
    dense_arch_layers: Optional[List[int]] = None,
    cross_layers: int = 2,
    cross_rank: int = 64,
    decompress_layers: Optional[List[int]] = None,
    sit_layers: int = 2,
    sit_heads: int = 4,
    sit_context: int = 63,
    epochs: int = 1,
    batch_size: int = 1024,
    log_every: int = 100,
    checkpoint_dir: str = "",
    checkpoint_every: int = 0,
    seed: int = 0,
    device: str = "cpu",
    sharding_types: Optional[List[str]] = None,
    uvm_caching: bool = False,
    sparse_lr: float = 0.05,
    dense_lr: float = 1e-3,
    image: str = torchx.IMAGE,
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
) -> specs.AppDef:
    """Train the IAT source model on N processes and export instance tokens (apps/compress.py).

    Args:
        train_log: instance log of the training window (required)
        store: token store directory to write (must not exist unless --overwrite)
        valid_log: later instance log for validation after each epoch (optional)
        export_logs: logs whose instances are compressed into the store (default: train + valid)
        overwrite: replace an existing token store
        scheme: temporal (instances in time order) or user (whole user histories through the SIT)
        two_pass: user scheme: alternate epochs forward and reverse in user order
        token_dtype: storage of the tokens: fp32, fp16 or int8 (row-wise scale and bias)
        results: JSON file for the run's metrics and timings (optional)
        token_dim: bottleneck size d
        bottleneck: false: the same model without bottleneck (the base model)
        dense_arch_layers: dense MLP sizes
        cross_layers: DCN cross layers
        cross_rank: low rank of the cross
        decompress_layers: decompress MLP sizes
        sit_layers: SIT layers
        sit_heads: SIT attention heads
        sit_context: earlier tokens of the user (T-1) kept as stop-gradient SIT context
        epochs: passes over the train log
        batch_size: rows per process step
        log_every: steps between log lines
        checkpoint_dir: where checkpoints go; a run resumes from the latest one there
        checkpoint_every: steps between checkpoints (0: only at the end of training)
        seed: seed of initial weights
        device: cpu or cuda
        sharding_types: sharding types the planner may use (empty: those that keep rows whole)
        uvm_caching: CUDA: keep tables in host memory with an HBM cache
        sparse_lr: learning rate of the fused row-wise Adagrad on the tables
        dense_lr: learning rate of Adam on the dense parameters
        image: image (local_cwd: the working directory)
        j: {nnodes}x{nproc_per_node}
        cpu: CPUs per process
        gpu: GPUs per process (use 1 with --device cuda)
        memMB: memory per process in MB
    """
    config = CompressConfig(
        train_log=train_log, store=store, valid_log=valid_log,
        export_logs=list(export_logs or []), overwrite=overwrite, scheme=Scheme(scheme),
        two_pass=two_pass, token_dtype=token_dtype, results=results, token_dim=token_dim,
        bottleneck=bottleneck,
        dense_arch_layers=list(dense_arch_layers or SourceModelConfig().dense_arch_layers),
        cross_layers=cross_layers, cross_rank=cross_rank,
        decompress_layers=list(decompress_layers or SourceModelConfig().decompress_layers),
        sit_layers=sit_layers, sit_heads=sit_heads, sit_context=sit_context, epochs=epochs,
        batch_size=batch_size, log_every=log_every, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, seed=seed, device=device,
        sharding_types=list(sharding_types or []), uvm_caching=uvm_caching,
        sparse_lr=sparse_lr, dense_lr=dense_lr)
    config.check()
    return ddp(*config_to_args(config), script="apps/compress.py", image=image,
               name="iat-compress", j=j, cpu=cpu, gpu=gpu, memMB=memMB)


def assemble(
    target_log: str,
    store: str,
    output: str,
    max_len: int = 256,
    label_delay_s: Optional[int] = None,
    gap_boundaries_s: Optional[List[int]] = None,
    allow_unknown_users: bool = False,
    verify_store: bool = True,
    overwrite: bool = False,
    image: str = torchx.IMAGE,
    j: str = "1x1",
    cpu: int = 2,
    memMB: int = 4096,
) -> specs.AppDef:
    """Sequence assembly: history offsets of every sample of a target log (apps/assemble.py).

    With j = 1xN the samples are partitioned by user over N processes (torchrun); rank 0
    publishes the shards once every part is complete.

    Args:
        target_log: instance log (e.g. a train / valid / test split) whose samples get histories
        store: token store directory
        output: history shards directory to write
        max_len: L: the last L instances with ts < t
        label_delay_s: seconds after ts until a label is known (default: the target log's spec)
        gap_boundaries_s: bucket boundaries of the gap t - ts_i in seconds (default: the config's)
        allow_unknown_users: give users absent from the store empty histories instead of failing
        verify_store: check every store file's checksum when opening it
        overwrite: replace an existing output
        image: image (local_cwd: the working directory)
        j: {nnodes}x{nproc_per_node}
        cpu: CPUs per process
        memMB: memory per process in MB
    """
    from iat_torchrec.tokens.assembly import AssembleConfig

    extra = {"gap_boundaries_s": list(gap_boundaries_s)} if gap_boundaries_s else {}
    config = AssembleConfig(target_log=target_log, store=store, output=output, max_len=max_len,
                            label_delay_s=label_delay_s, allow_unknown_users=allow_unknown_users,
                            verify_store=verify_store, overwrite=overwrite, **extra)
    return ddp(*config_to_args(config), script="apps/assemble.py", image=image,
               name="iat-assemble", j=j, cpu=cpu, memMB=memMB)


def tokenize(
    train_log: str,
    store: str,
    valid_log: str = "",
    export_logs: Optional[List[str]] = None,
    overwrite: bool = False,
    results: str = "",
    fields_per_subtoken: int = 32,
    field_dim: int = 8,
    d0: int = 16,
    levels: int = 3,
    codebook_size: int = 256,
    commitment: float = 0.25,
    ema_decay: float = 0.99,
    ema_epsilon: float = 1e-5,
    dead_code_threshold: float = 0.03,
    entropy_weight: float = 0.0,
    entropy_temperature: float = 1.0,
    aux_layers: Optional[List[int]] = None,
    epochs: int = 1,
    batch_size: int = 1024,
    log_every: int = 100,
    checkpoint_dir: str = "",
    checkpoint_every: int = 0,
    seed: int = 0,
    device: str = "cpu",
    sharding_types: Optional[List[str]] = None,
    uvm_caching: bool = False,
    sparse_lr: float = 0.05,
    dense_lr: float = 1e-3,
    image: str = torchx.IMAGE,
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
) -> specs.AppDef:
    """Train the HGAQ sample tokenizer on N processes, export its codes (apps/tokenize_samples.py).

    Args:
        train_log: instance log of the training window (required)
        store: token store directory to write (must not exist unless --overwrite)
        valid_log: later instance log for validation after each epoch (optional)
        export_logs: logs whose instances are tokenized into the store (default: train + valid)
        overwrite: replace an existing token store
        results: JSON file for the run's metrics, code usage and timings (optional)
        fields_per_subtoken: B: at most this many fields per sub-token
        field_dim: field embedding size
        d0: sub-token / codeword size
        levels: M: residual VQ levels
        codebook_size: V: codes per level (at most 256: codes are stored as uint8)
        commitment: commitment weight
        ema_decay: codebook EMA decay
        ema_epsilon: Laplace smoothing of the EMA counts
        dead_code_threshold: restart a code whose EMA count falls below this share (0: off)
        entropy_weight: weight of the code-usage entropy term (0: off)
        entropy_temperature: temperature of the soft assignment of the entropy term
        aux_layers: hidden sizes of the aux CTR head
        epochs: passes over the train log
        batch_size: rows per process step
        log_every: steps between log lines
        checkpoint_dir: where checkpoints go; a run resumes from the latest one there
        checkpoint_every: steps between checkpoints (0: only at the end of training)
        seed: seed of initial weights and of the shuffled order
        device: cpu or cuda
        sharding_types: sharding types the planner may use (empty: those that keep rows whole)
        uvm_caching: CUDA: keep tables in host memory with an HBM cache
        sparse_lr: learning rate of the fused row-wise Adagrad on the tables
        dense_lr: learning rate of Adam on the dense parameters
        image: image (local_cwd: the working directory)
        j: {nnodes}x{nproc_per_node}
        cpu: CPUs per process
        gpu: GPUs per process (use 1 with --device cuda)
        memMB: memory per process in MB
    """
    config = TokenizeConfig(
        train_log=train_log, store=store, valid_log=valid_log,
        export_logs=list(export_logs or []), overwrite=overwrite, results=results,
        fields_per_subtoken=fields_per_subtoken, field_dim=field_dim, d0=d0, levels=levels,
        codebook_size=codebook_size, commitment=commitment, ema_decay=ema_decay,
        ema_epsilon=ema_epsilon, dead_code_threshold=dead_code_threshold,
        entropy_weight=entropy_weight, entropy_temperature=entropy_temperature,
        aux_layers=list(aux_layers or HGAQConfig().aux_layers), epochs=epochs,
        batch_size=batch_size, log_every=log_every, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, seed=seed, device=device,
        sharding_types=list(sharding_types or []), uvm_caching=uvm_caching,
        sparse_lr=sparse_lr, dense_lr=dense_lr)
    config.check()
    return ddp(*config_to_args(config), script="apps/tokenize_samples.py", image=image,
               name="iat-tokenize", j=j, cpu=cpu, gpu=gpu, memMB=memMB)


def train(
    train_log: str,
    valid_log: str,
    test_log: str = "",
    history_source: str = "none",
    interaction: str = "mixer",
    iat_store: str = "",
    sif_store: str = "",
    train_history: str = "",
    valid_history: str = "",
    test_history: str = "",
    item_logs: Optional[List[str]] = None,
    token_dim: int = 0,
    results: str = "",
    embedding_dim: int = 16,
    dense_arch_layers: Optional[List[int]] = None,
    over_arch_layers: Optional[List[int]] = None,
    item_feature: str = "",
    item_history_len: int = 50,
    iat_item_branch: str = "bst",
    d0: int = 16,
    num_blocks: int = 4,
    num_heads: int = 2,
    alignment_weight: float = 0.25,
    bst_layers: int = 1,
    bst_heads: int = 2,
    din_attention_layers: Optional[List[int]] = None,
    iat_adapt_dim: int = 64,
    iat_side_dim: int = 64,
    iat_layers: int = 2,
    iat_heads: int = 4,
    epochs: int = 1,
    batch_size: int = 1024,
    log_every: int = 100,
    checkpoint_dir: str = "",
    checkpoint_every: int = 0,
    seed: int = 0,
    device: str = "cpu",
    sharding_types: Optional[List[str]] = None,
    uvm_caching: bool = False,
    sparse_lr: float = 0.05,
    dense_lr: float = 1e-3,
    image: str = torchx.IMAGE,
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
) -> specs.AppDef:
    """Train the downstream model (DLRM_SIF) on N processes, validate each epoch, test
    (apps/train.py).

    Args:
        train_log: target log the model is trained on (required)
        valid_log: later target log, evaluated after each epoch; selects the epoch (required)
        test_log: target log evaluated after each epoch; the best valid epoch's is reported
        history_source: none | din | bst | iat | sif_codes | sif_iat | sif_both
        interaction: mixer (SIF-Mixer) | dot (TorchRec DLRM's); SIF sources need mixer
        iat_store: IAT token store holding every instance of the histories
        sif_store: SIF code store: history codes and the targets' codes
        train_history: history shards of train_log (assembled on the IAT store, else the SIF one)
        valid_history: history shards of valid_log (same store)
        test_history: history shards of test_log (same store)
        item_logs: logs exported into the history store (default: the store's exported_logs)
        token_dim: IAT token width the model expects (0: the IAT store's)
        results: JSON file for the run's metrics and timings (optional)
        embedding_dim: D: width of every table, the dense embedding and branch tokens
        dense_arch_layers: hidden sizes of the dense arch
        over_arch_layers: hidden sizes of the over arch
        item_feature: the target's item-id field (item-id history)
        item_history_len: k: length of the item-id history
        iat_item_branch: hand-crafted branch kept beside the IAT branch: bst | din | none
        d0: SIF-Mixer token size
        num_blocks: SIF-Mixer blocks
        num_heads: SIF-Mixer attention heads
        alignment_weight: weight of L_align
        bst_layers: BST Transformer blocks
        bst_heads: BST attention heads
        din_attention_layers: DIN activation unit sizes
        iat_adapt_dim: IAT branch: adaptation MLP width
        iat_side_dim: IAT branch: side-information width
        iat_layers: IAT branch: Transformer blocks
        iat_heads: IAT branch: attention heads
        epochs: passes over the train log
        batch_size: rows per process step
        log_every: steps between log lines
        checkpoint_dir: where checkpoints go; a run resumes from the latest one there
        checkpoint_every: steps between checkpoints (0: only at the end of training)
        seed: seed of initial weights and of the shuffled order
        device: cpu or cuda
        sharding_types: sharding types the planner may use (empty: those that keep rows whole)
        uvm_caching: CUDA: keep tables in host memory with an HBM cache
        sparse_lr: learning rate of the fused row-wise Adagrad on the tables
        dense_lr: learning rate of Adam on the dense parameters
        image: image (local_cwd: the working directory)
        j: {nnodes}x{nproc_per_node}
        cpu: CPUs per process
        gpu: GPUs per process (use 1 with --device cuda)
        memMB: memory per process in MB
    """
    from iat_torchrec.stages.train import TrainDownstreamConfig, model_config

    defaults = TrainDownstreamConfig()
    config = TrainDownstreamConfig(
        train_log=train_log, valid_log=valid_log, test_log=test_log,
        history_source=history_source, interaction=interaction, iat_store=iat_store,
        sif_store=sif_store, train_history=train_history, valid_history=valid_history,
        test_history=test_history, item_logs=list(item_logs or []), token_dim=token_dim,
        results=results, embedding_dim=embedding_dim,
        dense_arch_layers=list(dense_arch_layers or defaults.dense_arch_layers),
        over_arch_layers=list(over_arch_layers or defaults.over_arch_layers),
        item_feature=item_feature, item_history_len=item_history_len,
        iat_item_branch=iat_item_branch, d0=d0, num_blocks=num_blocks, num_heads=num_heads,
        alignment_weight=alignment_weight, bst_layers=bst_layers, bst_heads=bst_heads,
        din_attention_layers=list(din_attention_layers or defaults.din_attention_layers),
        iat_adapt_dim=iat_adapt_dim, iat_side_dim=iat_side_dim, iat_layers=iat_layers,
        iat_heads=iat_heads, epochs=epochs, batch_size=batch_size, log_every=log_every,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, seed=seed,
        device=device, sharding_types=list(sharding_types or []), uvm_caching=uvm_caching,
        sparse_lr=sparse_lr, dense_lr=dense_lr)
    model_config(config)  # the model's sizes are checked here, before anything is launched
    return ddp(*config_to_args(config), script="apps/train.py", image=image,
               name="iat-train", j=j, cpu=cpu, gpu=gpu, memMB=memMB)


def evaluate(
    runs: str,
    out_dir: str = "",
    image: str = torchx.IMAGE,
    cpu: int = 1,
    memMB: int = 2048,
) -> specs.AppDef:
    """Gather the downstream runs into the comparison table, plot and summary (apps/evaluate.py).

    Args:
        runs: index of the runs (runs.json, written by apps/pipeline.py)
        out_dir: where results.{md,csv,png} and summary.json go (default: the index's folder)
        image: image (local_cwd: the working directory)
        cpu: CPUs
        memMB: memory in MB
    """
    from iat_torchrec.pipeline.report import EvaluateConfig

    config = EvaluateConfig(runs=runs, out_dir=out_dir)
    return python(*config_to_args(config), script="apps/evaluate.py", image=image,
                  name="iat-evaluate", cpu=cpu, memMB=memMB)
