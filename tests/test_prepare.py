"""The data stage: synthetic, MovieLens and a user's own log; reuse on a re-run."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from conftest import require_ml_latest_small, tiny_columns, tiny_spec
from iat_torchrec.data.log import write_log
from iat_torchrec.data.synthetic import SyntheticConfig
from iat_torchrec.stages.prepare import DataConfig, prepare_data
from iat_torchrec.data.splits import SplitMethod

TINY = DataConfig(synthetic=SyntheticConfig(num_users=300, num_items=200, num_instances=6_000,
                                            num_sparse_fields=8, num_dense_fields=3))


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_synthetic_is_made_split_in_time_and_reused(tmp_path):
    cfg = dataclasses.replace(TINY, data_dir=str(tmp_path))
    first = prepare_data(cfg)
    assert first.summary.rows == 6_000 and first.split_method is SplitMethod.TIME
    rows = {k: s.rows for k, s in first.split_summaries.items()}
    assert rows == {"train": 4_800, "valid": 600, "test": 600}
    train, valid = first.split_summaries["train"], first.split_summaries["valid"]
    assert train.ts_max <= valid.ts_min
    before = _mtimes(tmp_path)
    again = prepare_data(cfg)
    assert again.log == first.log and _mtimes(tmp_path) == before
    other = prepare_data(dataclasses.replace(
        cfg, synthetic=dataclasses.replace(cfg.synthetic, seed=1)))
    assert other.log != first.log
    assert "| train |      4,800 |" in first.format()


def test_movielens_uses_protocol_p1(tmp_path):
    require_ml_latest_small()
    prepared = prepare_data(DataConfig(dataset="movielens", data_dir=str(tmp_path)))
    assert prepared.split_method is SplitMethod.PER_USER
    assert prepared.summary.rows == 100_004
    assert {k: s.rows for k, s in prepared.split_summaries.items()} == {
        "train": 79_748, "valid": 9_957, "test": 10_299}
    assert (prepared.splits["train"] / "README.txt").is_file()


def test_own_log_is_read_in_place(tmp_path):
    log = write_log(pa.table(tiny_columns(n=400)), tmp_path / "mine", tiny_spec())
    before = _mtimes(log)
    prepared = prepare_data(DataConfig(dataset=str(log), data_dir=str(tmp_path / "data"),
                                       split_method="per_user"))
    assert prepared.log == log.resolve() and _mtimes(log) == before
    assert sum(s.rows for s in prepared.split_summaries.values()) == 400
    assert all(p.is_relative_to(tmp_path / "data") for p in prepared.splits.values())


def test_unknown_split_method(tmp_path):
    with pytest.raises(ValueError, match="sideways"):
        prepare_data(dataclasses.replace(TINY, data_dir=str(tmp_path), split_method="sideways"))
