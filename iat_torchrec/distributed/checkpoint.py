"""Distributed checkpoints of a sharded model and its optimizers (torch.distributed.checkpoint).

A checkpoint is a directory: the DCP shards of model and optimizer state, one ``rank<r>.pt`` per
rank for state that lives outside the model (RNG, per-user SIT context), and ``meta.json`` with
the training position and a fingerprint of the configuration. It is written under a temporary
name and renamed when every rank has finished, so a run killed while saving keeps its previous
checkpoint. Resuming from a checkpoint of another configuration is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch import nn
from torch.optim import Optimizer

from iat_torchrec.distributed.collectives import DistEnv, barrier, broadcast_object

LATEST = "latest"


class CheckpointMismatchError(ValueError):
    """A checkpoint made by a different configuration than the run resuming from it."""


def fingerprint(config: Dict[str, Any]) -> str:
    """A stable digest of everything that must match for a resume to be exact."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(directory: Path, model: nn.Module, optimizer: Optimizer,
                    position: Dict[str, int], config: Dict[str, Any],
                    rank_state: Dict[str, Any], env: DistEnv) -> Path:
    """Save to ``directory/step-<global_step>`` and point ``directory/latest`` at it."""
    directory = Path(directory)
    final = directory / f"step-{position['global_step']:09d}"
    tmp = Path(broadcast_object(str(directory / f".{final.name}.tmp-{os.getpid()}"), env))
    if env.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(env)
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()},
             checkpoint_id=str(tmp))
    torch.save({**rank_state, "rng": torch.get_rng_state()}, tmp / f"rank{env.rank}.pt")
    barrier(env)
    if env.is_main:
        meta = {"position": position, "fingerprint": fingerprint(config), "config": config,
                "world_size": env.world_size}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = directory / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, directory / LATEST)
    barrier(env)
    return final


def latest_checkpoint(directory: Path) -> Optional[Path]:
    """The checkpoint ``directory/latest`` points at, if any."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: Optimizer,
                    config: Dict[str, Any], env: DistEnv) -> Dict[str, Any]:
    """Load a checkpoint in place; returns its position and this rank's extra state."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    if meta["fingerprint"] != fingerprint(config):
        theirs, ours = meta["config"], json.loads(json.dumps(config, default=str))
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise CheckpointMismatchError(
            f"{path}: checkpoint was made with a different configuration (differs in {diff}); "
            "start a fresh run or point --checkpoint_dir elsewhere")
    if meta["world_size"] != env.world_size:
        raise CheckpointMismatchError(
            f"{path}: checkpoint was made by {meta['world_size']} processes, this run has "
            f"{env.world_size}; an exact resume needs the same data partition")
    # Optimizer state is created lazily on the first step: materialise it (a zero-gradient
    # step that moves nothing) so that DCP has tensors to load into. Parameters that never had
    # a gradient had no state when the checkpoint was saved: theirs stays as materialised (the
    # optimizer skips parameters without gradients, so it changes nothing). Anything else
    # missing from the checkpoint is an error.
    optimizer.init_state()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    missing = [k for k in _flat_keys(state) if k not in saved]
    lacking = [k for k in missing if not k.startswith("optim.state.")]
    if lacking:
        raise CheckpointMismatchError(f"{path}: checkpoint lacks {lacking[:5]}")
    dcp.load(state, checkpoint_id=str(path),
             planner=DefaultLoadPlanner(allow_partial_load=bool(missing)))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    rank_state = torch.load(Path(path) / f"rank{env.rank}.pt", weights_only=False)
    torch.set_rng_state(rank_state.pop("rng"))
    return {"position": meta["position"], "rank_state": rank_state}


def _flat_keys(state: Dict[str, Any], prefix: str = "") -> List[str]:
    """DCP's flattened keys of a nested state dict (dicts joined by dots)."""
    keys: List[str] = []
    for k, v in state.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            keys += _flat_keys(v, f"{name}.")
        else:
            keys.append(name)
    return keys
