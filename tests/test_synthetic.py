"""The synthetic instance-log generator: determinism, validity, skew and the context signal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iat_torchrec.config import parse_config
from iat_torchrec.atomic import OutputExistsError
from iat_torchrec.data.log import log_files, validate_log
from iat_torchrec.data.spec import KEY_COLUMNS, FeatureGroup, FeatureSpec
from iat_torchrec.data.synthetic import (
    CHUNK_ROWS,
    LABEL,
    NUM_CONTEXT_KEYS,
    SyntheticConfig,
    feature_spec,
    generate,
    iter_tables,
    iter_tables_with_truth,
    oracle_auc,
    true_click_probability,
)

SMALL = SyntheticConfig(num_users=500, num_items=400, num_instances=20_000, num_categories=20,
                        days=14, num_sparse_fields=26, num_dense_fields=13)


def _table(config: SyntheticConfig, **kw) -> pa.Table:
    return pa.concat_tables(list(iter_tables(config, **kw)))


def _cfg(**kw) -> SyntheticConfig:
    return dataclasses.replace(SMALL, **kw)


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_data_across_chunks_and_threads():
    cfg = _cfg(num_instances=CHUNK_ROWS + 5_000, num_sparse_fields=14, num_dense_fields=4)
    a = _table(cfg, threads=0)
    b = _table(cfg, threads=2)
    assert a.num_rows == cfg.num_instances
    assert a.equals(b)


def test_different_seed_different_data():
    a = _table(SMALL)
    b = _table(_cfg(seed=1))
    assert not a.equals(b)
    assert not np.array_equal(a["item_id"].to_numpy(), b["item_id"].to_numpy())
    assert not np.array_equal(a[LABEL].to_numpy(), b[LABEL].to_numpy())


def test_extra_fields_do_not_change_the_others():
    a = _table(_cfg(num_sparse_fields=5, num_dense_fields=2))
    b = _table(_cfg(num_sparse_fields=30, num_dense_fields=15))
    for name in a.column_names:
        assert a[name].equals(b[name]), name


def test_written_log_is_byte_identical_per_seed(tmp_path):
    cfg = _cfg(num_instances=3_000, num_sparse_fields=8, num_dense_fields=2)
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    fa, fb = log_files(tmp_path / "a"), log_files(tmp_path / "b")
    assert [f.name for f in fa] == [f.name for f in fb]
    for x, y in zip(fa, fb):
        assert pq.read_table(x).equals(pq.read_table(y))
    assert (tmp_path / "a" / "feature_spec.json").read_text() == \
        (tmp_path / "b" / "feature_spec.json").read_text()


# ----------------------------------------------------------------------------- validity
def test_generate_passes_validation_and_matches_spec(tmp_path):
    cfg = _cfg(rows_per_file=7_000)
    out = generate(cfg, tmp_path / "log")
    summary = validate_log(out)
    assert summary.rows == cfg.num_instances
    assert summary.files == 3
    assert summary.time_sorted
    assert 0.2 <= summary.label_rates[LABEL] <= 0.4
    assert summary.ts_min >= cfg.start_ts
    assert summary.ts_max < cfg.start_ts + cfg.days * 86400
    spec = FeatureSpec.load(out)
    assert spec == feature_spec(cfg)
    assert spec.label_delay_s == cfg.label_delay_s == 3600
    assert 1.0 < summary.sparse_mean_lengths["tags"] < 3.0


@pytest.mark.parametrize("ns,nd", [(2, 0), (5, 3), (19, 9), (26, 13), (33, 17)])
def test_field_counts_follow_the_parameters(ns, nd):
    cfg = _cfg(num_instances=2_000, num_sparse_fields=ns, num_dense_fields=nd)
    spec = feature_spec(cfg)
    assert len(spec.sparse) == ns and len(spec.dense) == nd
    assert spec.sparse_names[:2] == ["user", "item_id"]
    assert not set(spec.sparse_names + spec.dense_names) & set(KEY_COLUMNS)
    for f in spec.sparse:
        assert f.embedding_dim == 16 and f.num_embeddings > 0 and not f.hashed
        assert isinstance(f.group, FeatureGroup)
    table = _table(cfg)
    assert table.column_names == spec.columns
    for f in spec.sparse:
        col = table[f.name].combine_chunks()
        v = (col.flatten() if f.multi_valued else col).to_numpy()
        assert v.min() >= 0 and v.max() < f.num_embeddings, f.name
    for f in spec.dense:
        assert table[f.name].type == pa.float32()
        assert np.isfinite(table[f.name].to_numpy()).all()


def test_user_field_and_instance_ids():
    t = _table(SMALL)
    np.testing.assert_array_equal(t["user"].to_numpy(), t["user_id"].to_numpy())
    ids = t["instance_id"].to_numpy()
    assert np.unique(ids).size == ids.size
    assert (np.diff(t["ts"].to_numpy()) >= 0).all()


def test_tiny_config_works():
    cfg = SyntheticConfig(num_users=1, num_items=1, num_instances=10, num_categories=3, days=1,
                          num_sparse_fields=26, num_dense_fields=13)
    t = _table(cfg)
    assert t.num_rows == 10
    assert set(t["user_id"].to_numpy()) == {0} and set(t["item_id"].to_numpy()) == {0}


def test_time_order_across_files(tmp_path):
    cfg = _cfg(num_instances=CHUNK_ROWS + 1_000, num_sparse_fields=3, num_dense_fields=0,
               rows_per_file=100_000)
    out = generate(cfg, tmp_path / "log")
    files = log_files(out)
    assert len(files) == 3
    ts = np.concatenate([pq.read_table(f, columns=["ts"])["ts"].to_numpy() for f in files])
    assert ts.size == cfg.num_instances and (np.diff(ts) >= 0).all()
    assert validate_log(out).time_sorted


def test_existing_output_is_left_untouched(tmp_path):
    out = tmp_path / "log"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        generate(SMALL, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    generate(_cfg(num_instances=500), out, overwrite=True)
    assert validate_log(out).rows == 500


def test_config_flags_and_checks():
    cfg = parse_config(SyntheticConfig, ["--num_users", "7", "--num_sparse_fields", "3"])
    assert cfg.num_users == 7 and cfg.num_sparse_fields == 3
    assert all(f.metadata.get("help") for f in dataclasses.fields(SyntheticConfig))
    for bad in ({"num_sparse_fields": 1}, {"num_dense_fields": -1}, {"target_ctr": 1.0},
                {"embedding_dim": 6}, {"start_ts": 1_704_067_201}, {"num_users": 0}):
        with pytest.raises(ValueError):
            SyntheticConfig(**bad)


# ----------------------------------------------------------------------------- realism
def _slope(counts: np.ndarray, lo: int, hi: int) -> float:
    c = np.sort(counts)[::-1]
    r = np.arange(lo, hi)
    return float(np.polyfit(np.log(r + 1.0), np.log(c[r]), 1)[0])


def test_zipf_like_user_activity_and_item_popularity():
    cfg = _cfg(num_users=3_000, num_items=3_000, num_instances=300_000, num_categories=30,
               num_sparse_fields=2, num_dense_fields=0)
    t = _table(cfg)
    users = np.bincount(t["user_id"].to_numpy(), minlength=cfg.num_users)
    items = np.bincount(t["item_id"].to_numpy(), minlength=cfg.num_items)
    for counts in (users, items):
        c = np.sort(counts)[::-1]
        assert c[: len(c) // 100].sum() / c.sum() > 0.15  # top 1% hold well over 1%
        assert -1.4 < _slope(counts, 10, 300) < -0.6
    flat = _table(dataclasses.replace(cfg, user_zipf_exponent=0.0, item_zipf_exponent=0.0))
    u0 = np.sort(np.bincount(flat["user_id"].to_numpy(), minlength=cfg.num_users))[::-1]
    assert u0[:30].sum() / u0.sum() < 0.03


def _recent_ctr(group, ts, y, qgroup, qts, m):
    """Mean of the last ``m`` labels of group ``qgroup[i]`` strictly before ``qts[i]``, and how
    many there were (at most m)."""
    order = np.lexsort((ts, group))
    g, t = group[order], ts[order]
    csum = np.concatenate([[0.0], np.cumsum(y[order].astype(np.float64))])
    comp = g * (1 << 32) + t
    start = np.searchsorted(g, qgroup, side="left")
    pos = np.searchsorted(comp, qgroup * (1 << 32) + qts, side="left")
    k = np.minimum(pos - start, m)
    out = np.full(qgroup.size, np.nan)
    ok = k > 0
    out[ok] = (csum[pos[ok]] - csum[pos[ok] - k[ok]]) / k[ok]
    return out, k


def _context_correlations(cfg: SyntheticConfig, m: int = 5):
    """corr(label, user's recent CTR in the same context) and in the paired other context
    (same device, other part of the day), computed from the logged columns alone."""
    t = _table(cfg)
    u, ts, y = (t[c].to_numpy() for c in ("user_id", "ts", LABEL))
    hour, device = t["hour"].to_numpy(), t["device"].to_numpy()
    key = 2 * device + ((hour >= 18) | (hour < 6))
    grp = u * NUM_CONTEXT_KEYS + key
    same, ks = _recent_ctr(grp, ts, y, grp, ts, m)
    other, ko = _recent_ctr(grp, ts, y, u * NUM_CONTEXT_KEYS + (key ^ 1), ts, m)
    ok = (ks == m) & (ko == m)
    assert ok.sum() > 20_000
    return np.corrcoef(y[ok], same[ok])[0, 1], np.corrcoef(y[ok], other[ok])[0, 1]


def test_labels_depend_on_recent_same_context_history():
    cfg = _cfg(num_users=2_000, num_items=2_000, num_instances=200_000, days=60,
               num_sparse_fields=4, num_dense_fields=0)
    same, other = _context_correlations(cfg)
    assert same > other + 0.08, (same, other)
    # Without the user x context component the user's history is as informative in either context.
    same0, other0 = _context_correlations(dataclasses.replace(cfg, context_strength=0.0))
    assert abs(same0 - other0) < 0.03, (same0, other0)
    assert same > same0 + 0.05


def test_true_probability_is_calibrated_and_drift_matters():
    cfg = _cfg(num_users=2_000, num_items=2_000, num_instances=150_000, days=60,
               num_sparse_fields=2, num_dense_fields=0)
    p = true_click_probability(cfg)
    y = _table(cfg)[LABEL].to_numpy()
    assert p.shape == y.shape
    assert abs(p.mean() - cfg.target_ctr) < 0.02
    assert abs(y.mean() - p.mean()) < 0.01
    auc = oracle_auc(cfg)
    assert auc["bayes"] > auc["no_drift"] + 0.03 > auc["static"] + 0.03
    assert 0.2 <= auc["ctr"] <= 0.4
    # the truth's parts add up to the logit
    for _, truth in iter_tables_with_truth(_cfg(num_instances=1_000)):
        parts = sum(truth[k] for k in ("b0", "user_item", "item_popularity",
                                       "user_context_static", "user_context_drift",
                                       "global_context"))
        np.testing.assert_allclose(parts, truth["logit"], rtol=1e-6, atol=1e-6)


def test_item_popularity_drifts_and_drives_labels():
    base = _cfg(num_users=2_000, num_items=500, num_instances=150_000, days=56,
                num_categories=10, num_sparse_fields=2, num_dense_fields=2)

    def week_change_and_trend_corr(cfg):
        t = _table(cfg)
        item, ts, y = t["item_id"].to_numpy(), t["ts"].to_numpy(), t[LABEL].to_numpy()
        week = (ts - cfg.start_ts) // (7 * 86400)
        w1 = np.bincount(item[week == 0], minlength=cfg.num_items) + 1.0
        w3 = np.bincount(item[week == 3], minlength=cfg.num_items) + 1.0
        top = np.argsort(w1 + w3)[::-1][:100]
        change = np.abs(np.log(w1[top] / w1.sum()) - np.log(w3[top] / w3.sum())).mean()
        return change, np.corrcoef(y, t["item_trend"].to_numpy())[0, 1]

    change, corr = week_change_and_trend_corr(base)
    change0, corr0 = week_change_and_trend_corr(dataclasses.replace(base, popularity_drift=0.0))
    assert change > 2 * change0
    assert corr > 0.03 and abs(corr0) < 0.02
