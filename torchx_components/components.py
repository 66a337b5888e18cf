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
