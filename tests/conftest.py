"""Shared fixtures: a tiny instance log with every kind of field."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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


@pytest.fixture(scope="session")
def ml_small_log(tmp_path_factory):
    """ml-latest-small imported once per session: (log directory, its import summary). Read
    only: a test that changes the log must copy it first."""
    from iat_torchrec.data.movielens import import_movielens

    require_ml_latest_small()
    out = tmp_path_factory.mktemp("ml") / "ml-latest-small"
    return out, import_movielens(ML_LATEST_SMALL, out)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's tests (the test machine is shared: it avoids
    oversubscription), the thread count restored after. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_log(path: Path) -> pa.Table:
    """All rows of an instance log directory, its ``*.parquet`` files in name order."""
    return pa.concat_tables(pq.read_table(f) for f in sorted(Path(path).glob("*.parquet")))


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


def small_splits(data_dir: Path) -> Dict[str, Path]:
    """The train / valid / test logs of a small synthetic log (150 users, 4,000 instances, 8
    sparse + 3 dense fields), prepared by the data stage under ``data_dir``."""
    from iat_torchrec.data.synthetic import SyntheticConfig
    from iat_torchrec.stages.prepare import DataConfig, prepare_data

    return prepare_data(DataConfig(data_dir=str(data_dir), synthetic=SyntheticConfig(
        num_users=150, num_items=100, num_instances=4_000, num_sparse_fields=8,
        num_dense_fields=3))).splits
