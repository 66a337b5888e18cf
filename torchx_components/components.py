"""TorchX components launching the iat-torchrec stages on any TorchX scheduler.

    torchx run -s local_cwd torchx_components/components.py:prepare_data --dataset movielens
    torchx run -s local_cwd torchx_components/components.py:train --help

Each component's arguments are its stage config's settings under their dotted names
(``--model.mixer.num_blocks 4``; lists comma-separated: ``--model.dense_arch_layers 128,64``),
with the defaults and help texts of the config dataclasses (:mod:`torchx_components.stage`
derives them), plus the resources ``image``, ``cpu``, ``memMB`` (and ``j``, ``gpu`` for the
distributed stages), so the same component runs under local_cwd, Slurm or Kubernetes. The apps
run with ``python`` / ``torchrun`` from PATH: activate the project's environment first
(``.venv``). Each function below checks the config its arguments build before anything is
launched.
"""

import torchx.specs as specs

from iat_torchrec.distributed.plan import PlanConfig
from iat_torchrec.serving.bundle import ExportConfig
from iat_torchrec.serving.server import ServeConfig
from iat_torchrec.stages.assemble import AssembleConfig
from iat_torchrec.stages.compress import CompressConfig
from iat_torchrec.stages.evaluate import EvaluateConfig
from iat_torchrec.stages.prepare import DataConfig
from iat_torchrec.stages.tokenize import TokenizeConfig
from iat_torchrec.stages.train import TrainDownstreamConfig
from torchx_components.stage import Resources, stage_component


@stage_component(DataConfig, "apps/prepare_data.py", "iat-prepare-data",
                 Resources(j=None, gpu=None, memMB=4096))
def prepare_data(config: DataConfig) -> specs.AppDef:
    """Make or import an instance log, validate it and split it in time
    (apps/prepare_data.py)."""


@stage_component(CompressConfig, "apps/compress.py", "iat-compress")
def compress(config: CompressConfig) -> specs.AppDef:
    """Train the IAT source model on N processes and export instance tokens (apps/compress.py)."""
    config.check()


@stage_component(TokenizeConfig, "apps/tokenize_samples.py", "iat-tokenize")
def tokenize(config: TokenizeConfig) -> specs.AppDef:
    """Train the HGAQ sample tokenizer on N processes, export its codes
    (apps/tokenize_samples.py)."""
    config.check()


@stage_component(AssembleConfig, "apps/assemble.py", "iat-assemble",
                 Resources(j="1x1", gpu=None, memMB=4096))
def assemble(config: AssembleConfig) -> specs.AppDef:
    """Sequence assembly: history offsets of every sample of a target log (apps/assemble.py).
    With j = 1xN the samples are partitioned by user over N processes (torchrun); rank 0
    publishes the shards once every part is complete."""


@stage_component(TrainDownstreamConfig, "apps/train.py", "iat-train")
def train(config: TrainDownstreamConfig) -> specs.AppDef:
    """Train the downstream model (DLRM_SIF) on N processes, validate each epoch, test
    (apps/train.py). The model's settings are checked when its config is built."""


@stage_component(EvaluateConfig, "apps/evaluate.py", "iat-evaluate",
                 Resources(j=None, cpu=1, gpu=None, memMB=2048))
def evaluate(config: EvaluateConfig) -> specs.AppDef:
    """Gather the downstream runs into the comparison table, plot and summary
    (apps/evaluate.py)."""


@stage_component(ExportConfig, "apps/export_bundle.py", "iat-export-bundle",
                 Resources(j=None, gpu=None, memMB=4096))
def export_bundle(config: ExportConfig) -> specs.AppDef:
    """Package a trained downstream model and its stores as a serving bundle
    (apps/export_bundle.py)."""


@stage_component(ServeConfig, "apps/serve.py", "iat-serve",
                 Resources(j=None, gpu=None, memMB=4096))
def serve(config: ServeConfig) -> specs.AppDef:
    """Serve a bundle over HTTP: score requests with the user's live history, ingest new
    instances (apps/serve.py)."""


@stage_component(PlanConfig, "apps/plan.py", "iat-plan",
                 Resources(j=None, cpu=1, gpu=None, memMB=4096))
def plan(config: PlanConfig) -> specs.AppDef:
    """Plan the sharding of embedding tables and a token store for a described cluster with
    TorchRec's planner, on paper (apps/plan.py): no devices, nothing allocated."""
