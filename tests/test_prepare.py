"""The data stage: synthetic, MovieLens and a user's own log; reuse on a re-run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import require_ml_latest_small, tiny_columns, tiny_spec
from iat_torchrec.data.log import read_provenance, write_log
from iat_torchrec.data.synthetic import SyntheticConfig
from iat_torchrec.stages.prepare import DataConfig, _movielens_log, data_paths, prepare_data
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


def test_movielens_domains_have_their_own_names_and_folders():
    def paths(domain, **kwargs):
        # data_paths does no work: the source need not exist
        return data_paths(DataConfig(dataset="movielens", data_dir="/d", movielens_domain=domain,
                                     movielens_source="/no/ml-latest-small", **kwargs))

    default = paths("")
    # what they were before domains
    assert default.name == "movielens"
    assert default.splits["train"] == Path(
        "/d/movielens-ml-latest-small-b0e58d8f66/splits-5cd64c795b/train")
    assert default.log == Path("/d/movielens-ml-latest-small-b0e58d8f66/log")
    assert paths("", movielens_fields=["peer"]).log == Path(
        "/d/movielens-ml-latest-small-8fa0bc6230/log")
    action, other = paths("action"), paths("other")
    assert (action.name, other.name) == ("movielens-action", "movielens-other")
    assert action.log.parent.name.startswith("movielens-action-ml-latest-small-")
    action_peer = paths("action", movielens_fields=["peer"])
    assert len({default.log, action.log, other.log, action_peer.log}) == 4
    with pytest.raises(ValueError, match=r"^movielens_domain 'drama': expected one of "
                                         r"\('', 'action', 'other'\)$"):
        paths("drama")


def test_synthetic_domains_have_their_own_names():
    source, other = (data_paths(DataConfig(data_dir="/d", synthetic=SyntheticConfig(domain=d)))
                     for d in (0, 1))
    assert source.name == "synthetic" and other.name == "synthetic-domain1"
    assert source.log.parent.name.startswith("synthetic-") and "domain" not in str(source.log)
    assert other.log.parent.name.startswith("synthetic-domain1-")


def _genre_source(d: Path) -> Path:
    """A tiny MovieLens source: 6 users each rating movies 1-20, odd ones Action, even Comedy."""
    d.mkdir()
    (d / "movies.csv").write_text("movieId,title,genres\n" + "".join(
        f"{m},Movie {m} (2000),{'Action' if m % 2 else 'Comedy'}\n" for m in range(1, 21)))
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{m},{1 + (u + m) % 5}.0,{1000 * m + u}\n" for u in range(1, 7) for m in range(1, 21)))
    (d / "README.txt").write_text("licence text\n")
    return d


def test_movielens_domains_are_prepared_apart_and_reused(tmp_path):
    cfg = DataConfig(dataset="movielens", data_dir=str(tmp_path / "data"),
                     movielens_source=str(_genre_source(tmp_path / "ml")),
                     movielens_domain="action")
    action = prepare_data(cfg)
    assert action.name == "movielens-action" and action.split_method is SplitMethod.PER_USER
    assert action.summary.rows == 60 and action.summary.users == 6
    before = _mtimes(tmp_path / "data")
    assert prepare_data(cfg).log == action.log and _mtimes(tmp_path / "data") == before
    other = prepare_data(dataclasses.replace(cfg, movielens_domain="other"))
    assert other.log.parent != action.log.parent and other.summary.rows == 60
    assert (other.splits["train"] / "README.txt").is_file()
    # a log of another domain at the path is imported again, not reused
    _movielens_log(dataclasses.replace(cfg, movielens_domain="other"), action.log)
    assert read_provenance(action.log)["domain"] == "other"


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
