"""Shared fixtures: a tiny instance log with every kind of field."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow as pa
import pytest

from iat_torchrec.data.spec import DenseField, FeatureGroup, FeatureSpec, SparseField

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ML_LATEST_SMALL = SHARED_DATA / "ml-latest-small"


def require_ml_latest_small() -> Path:
    """The real data the suite checks against; its absence fails the test, never skips it."""
    if not (ML_LATEST_SMALL / "ratings.csv").is_file():
        pytest.fail(f"{ML_LATEST_SMALL} is missing: the tests expect the shared data beside the "
                    "checkout (../shared/data/ml-latest-small)")
    return ML_LATEST_SMALL


def tiny_spec() -> FeatureSpec:
    return FeatureSpec(
        sparse=[
            SparseField("item", 50, 8, FeatureGroup.ITEM),
            SparseField("tags", 20, 8, FeatureGroup.ITEM, multi_valued=True),
            SparseField("device", 4, 4, FeatureGroup.CONTEXT),
            SparseField("cross", 64, 4, FeatureGroup.CROSS, hashed=True),
        ],
        dense=[DenseField("price", FeatureGroup.ITEM), DenseField("age", FeatureGroup.USER)],
        labels=["click", "buy"],
        label_delay_s=60,
    )


def tiny_columns(n: int = 500, seed: int = 0, users: int = 13) -> Dict[str, object]:
    """Columns of a valid log for :func:`tiny_spec`, rows in time order."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 4, n)
    offsets = np.r_[0, np.cumsum(lengths)]
    return {
        "instance_id": rng.permutation(np.arange(10 * n, 11 * n)),
        "user_id": rng.integers(0, users, n),
        "ts": np.sort(rng.integers(1_000, 100_000, n)),
        "click": rng.integers(0, 2, n).astype(np.int8),
        "buy": rng.integers(0, 2, n).astype(np.int8),
        "item": rng.integers(0, 50, n),
        "tags": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                         pa.array(rng.integers(0, 20, offsets[-1]))),
        "device": rng.integers(0, 4, n),
        "cross": rng.integers(-10**12, 10**12, n),
        "price": rng.random(n, dtype=np.float32),
        "age": rng.random(n, dtype=np.float32),
    }


@pytest.fixture
def spec() -> FeatureSpec:
    return tiny_spec()


@pytest.fixture
def columns() -> Dict[str, object]:
    return tiny_columns()
