"""TorchX components launching the iat-torchrec apps on any TorchX scheduler.

    torchx run -s local_cwd torchx_components/components.py:prepare_data --dataset movielens

Each component's arguments carry the same names as the app's flags and the library's config
dataclass (a test checks them against it); ``image``, ``cpu`` and ``memMB`` are the resources,
so the same component runs under local_cwd, Slurm or Kubernetes without code changes. The apps
run with ``python`` from PATH: activate the project's environment first (``.venv``).
(No ``from __future__ import annotations`` here: TorchX decodes arguments from real types.)
"""


import torchx
import torchx.specs as specs
from torchx.components.utils import python

from iat_torchrec.config import config_to_args
from iat_torchrec.data.prepare import DataConfig


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
