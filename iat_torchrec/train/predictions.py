"""Test predictions files: what a downstream run predicted for each test sample, so that gains
between runs can be put under a paired bootstrap over the same samples
(:func:`~iat_torchrec.train.metrics.bootstrap_gain`).

One Parquet file per run: ``instance_id``, ``user_id`` (int64) and per label ``label_<name>``
(int8) and ``logit_<name>`` (float32), rows sorted by instance id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iat_torchrec.atomic import atomic_output

PathLike = Union[str, Path]


class PredictionsError(ValueError):
    """A predictions file that is missing, unreadable or does not match the other runs."""


def write_predictions(path: PathLike, pred: Dict[str, np.ndarray],
                      label_names: Sequence[str]) -> None:
    """Write :func:`~iat_torchrec.train.loop.predict`'s output (atomically)."""
    order = np.argsort(pred["instance_id"], kind="stable")
    cols = {"instance_id": pa.array(pred["instance_id"][order].astype(np.int64)),
            "user_id": pa.array(pred["users"][order].astype(np.int64))}
    for j, name in enumerate(label_names):
        cols[f"label_{name}"] = pa.array(pred["labels"][order, j].astype(np.int8))
        cols[f"logit_{name}"] = pa.array(pred["logits"][order, j].astype(np.float32))
    with atomic_output(path, overwrite=True) as tmp:
        pq.write_table(pa.table(cols), tmp)


def read_predictions(path: PathLike, label: str) -> Dict[str, np.ndarray]:
    """``instance_id``, ``user_id``, ``label`` and ``logit`` [n] of one label."""
    try:
        table = pq.read_table(path, columns=["instance_id", "user_id", f"label_{label}",
                                             f"logit_{label}"])
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise PredictionsError(f"{path}: not a test predictions file with label {label!r} "
                               f"({e})") from None
    return {"instance_id": table.column(0).to_numpy(), "user_id": table.column(1).to_numpy(),
            "label": table.column(2).to_numpy(), "logit": table.column(3).to_numpy()}


def aligned_logits(paths: Sequence[PathLike], label: str
                   ) -> Dict[str, np.ndarray]:
    """The predictions of several runs on the same test samples: ``label``, ``user_id`` [n]
    and ``logits`` [runs, n]; runs over other samples are an error naming the file."""
    first = read_predictions(paths[0], label)
    logits: List[np.ndarray] = [first["logit"]]
    for path in paths[1:]:
        other = read_predictions(path, label)
        if not np.array_equal(other["instance_id"], first["instance_id"]):
            raise PredictionsError(f"{path}: predicts other test samples than {paths[0]}")
        logits.append(other["logit"])
    return {"label": first["label"], "user_id": first["user_id"], "logits": np.stack(logits)}
