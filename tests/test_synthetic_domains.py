"""The synthetic generator's domains: domain 0 unchanged, shared users, and a user x context
propensity that correlates rho with domain 0's."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pyarrow as pa
import pytest

from iat_torchrec.data.synthetic import (
    LABEL,
    NUM_CONTEXT_KEYS,
    SyntheticConfig,
    context_propensity,
    feature_spec,
    iter_tables,
    iter_tables_with_truth,
    oracle_auc,
    provenance,
)
from test_synthetic import _recent_ctr

SMALL = SyntheticConfig(num_users=500, num_items=400, num_instances=20_000, num_categories=20,
                        days=14, num_sparse_fields=26, num_dense_fields=13)

# Fingerprint of the log of TINY written by the generator before domains existed: a sha1 of its
# integer columns and the sums of its float columns (compared to 3 decimals, so that last-bit
# differences of platform float math do not matter).
TINY = SyntheticConfig(num_users=300, num_items=200, num_instances=5_000, num_categories=10,
                       days=14)
TINY_INT_SHA1 = "af2fbd0d28c170237cc3d98984e99f6f93bda6d3"
TINY_FLOAT_SUMS = {
    "price": 284.524, "item_trend": 2246.174, "affinity_score": 3391.124,
    "user_activity": 5339.685, "hour_sin": -1619.414, "hour_cos": -609.216,
    "user_tenure": 27128.592, "item_quality": -61.919, "latency": 20168.126,
    "dense_noise_9": 42.81, "dense_weak_10": 178.861, "dense_noise_11": -74.406,
    "dense_weak_12": 107.498}


def _table(config: SyntheticConfig) -> pa.Table:
    return pa.concat_tables(list(iter_tables(config)))


def _domain(config: SyntheticConfig, rho: float, domain: int = 1) -> SyntheticConfig:
    return dataclasses.replace(config, domain=domain, domain_correlation=rho)


def _fingerprint(table: pa.Table):
    h = hashlib.sha1()
    sums = {}
    for name in table.column_names:
        col = table[name].combine_chunks()
        if pa.types.is_floating(col.type):
            sums[name] = float(col.to_numpy().astype(np.float64).sum())
            continue
        h.update(name.encode())
        if pa.types.is_list(col.type):
            h.update(col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            col = col.flatten()
        h.update(col.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return h.hexdigest(), sums


def _context_group(t: pa.Table) -> np.ndarray:
    key = 2 * t["device"].to_numpy() + ((t["hour"].to_numpy() >= 18) | (t["hour"].to_numpy() < 6))
    return t["user_id"].to_numpy() * NUM_CONTEXT_KEYS + key


# ----------------------------------------------------------------------------- domain 0
def test_domain_0_is_the_log_from_before_domains():
    for cfg in (TINY, dataclasses.replace(TINY, domain_correlation=0.7)):  # rho unused there
        sha, sums = _fingerprint(_table(cfg))
        assert sha == TINY_INT_SHA1
        assert sums == pytest.approx(TINY_FLOAT_SUMS, abs=0.01)
    # Domain 0's provenance is what it was (cached logs stay valid); other domains differ.
    assert "domain" not in provenance(TINY)["config"]
    assert provenance(dataclasses.replace(TINY, domain_correlation=0.7)) == provenance(TINY)
    p1, p2 = provenance(_domain(TINY, 0.5)), provenance(_domain(TINY, 0.6))
    assert p1["config"]["domain"] == 1 and p1["config"]["domain_correlation"] == 0.5
    assert len({str(p) for p in (provenance(TINY), p1, p2)}) == 3


# ----------------------------------------------------------------------------- shared users
def test_domains_share_users_not_items():
    a, b = _table(SMALL), _table(_domain(SMALL, 0.5))
    assert feature_spec(_domain(SMALL, 0.5)) == feature_spec(SMALL)
    ua, ub = a["user_id"].to_numpy(), b["user_id"].to_numpy()
    assert set(ua) == set(ub)
    for name in ("age_bucket", "gender", "region", "user_activity", "extra_user_21"):
        va, vb = a[name].to_numpy(), b[name].to_numpy()
        per_user_a = dict(zip(ua, va))
        assert all(per_user_a[u] == v for u, v in zip(ub, vb)), name
    # Activity: the same users are the heavy ones.
    ca = np.bincount(ua, minlength=SMALL.num_users)
    cb = np.bincount(ub, minlength=SMALL.num_users)
    assert np.corrcoef(ca, cb)[0, 1] > 0.9
    # Own items, arrivals and labels.
    assert not np.array_equal(a["ts"].to_numpy(), b["ts"].to_numpy())
    assert (a["item_id"].to_numpy() == b["item_id"].to_numpy()).mean() < 0.05
    cat_a = dict(zip(a["item_id"].to_numpy(), a["category"].to_numpy()))
    cat_b = dict(zip(b["item_id"].to_numpy(), b["category"].to_numpy()))
    both = set(cat_a) & set(cat_b)
    assert np.mean([cat_a[i] == cat_b[i] for i in both]) < 0.5
    assert 0.25 <= b[LABEL].to_numpy().mean() <= 0.35
    # Another domain is another world again.
    c = _table(_domain(SMALL, 0.5, domain=2))
    assert set(c["user_id"].to_numpy()) == set(ua)
    assert (c["item_id"].to_numpy() == b["item_id"].to_numpy()).mean() < 0.05


# ----------------------------------------------------------------------------- propensity
def test_propensity_correlates_rho_with_domain_0():
    rng = np.random.default_rng(0)
    n = 200_000
    user = rng.integers(0, SMALL.num_users, n)
    key = rng.integers(0, NUM_CONTEXT_KEYS, n)
    ts = rng.integers(SMALL.start_ts, SMALL.start_ts + SMALL.days * 86400, n)
    g0 = context_propensity(SMALL, user, key, ts)
    np.testing.assert_array_equal(context_propensity(_domain(SMALL, 1.0), user, key, ts), g0)
    for rho in (0.0, 0.5):
        g = context_propensity(_domain(SMALL, rho), user, key, ts)
        assert abs(np.corrcoef(g0, g)[0, 1] - rho) < 0.1, rho
        assert abs(g.std() / g0.std() - 1.0) < 0.1, rho


def test_truth_and_oracle_of_a_domain():
    cfg = dataclasses.replace(SMALL, num_sparse_fields=2, num_dense_fields=0)
    assert "transferable" not in oracle_auc(cfg)
    _, truth = next(iter_tables_with_truth(_domain(cfg, 1.0)))
    np.testing.assert_allclose(truth["user_context_transferable"],
                               truth["user_context_static"] + truth["user_context_drift"],
                               rtol=1e-6, atol=1e-6)
    auc = {rho: oracle_auc(_domain(cfg, rho)) for rho in (0.0, 1.0)}
    assert auc[1.0]["transferable"] == pytest.approx(auc[1.0]["bayes"], abs=1e-9)
    # At rho = 0 nothing transfers: the score lacks the whole user x context term.
    assert auc[0.0]["transferable"] < auc[0.0]["no_drift"] < auc[0.0]["bayes"] - 0.03


def test_labels_follow_the_same_context_history_of_domain_0():
    base = SyntheticConfig(num_users=1_000, num_items=1_000, num_instances=60_000,
                           num_categories=20, days=30, num_sparse_fields=4, num_dense_fields=0)
    t0 = _table(base)
    g0, ts0, y0 = _context_group(t0), t0["ts"].to_numpy(), t0[LABEL].to_numpy()

    def correlations(rho):
        """corr(domain-1 label, the user's last 5 domain-0 labels in the same context key) and
        in the paired key (same device, other part of the day)."""
        t = _table(_domain(base, rho))
        g, ts, y = _context_group(t), t["ts"].to_numpy(), t[LABEL].to_numpy()
        same, ks = _recent_ctr(g0, ts0, y0, g, ts, 5)
        other, ko = _recent_ctr(g0, ts0, y0, g ^ 1, ts, 5)
        ok = (ks == 5) & (ko == 5)
        assert ok.sum() > 20_000
        return np.corrcoef(y[ok], same[ok])[0, 1], np.corrcoef(y[ok], other[ok])[0, 1]

    same0, other0 = correlations(0.0)
    same1, other1 = correlations(1.0)
    assert abs(same0 - other0) < 0.03, (same0, other0)  # the control: no context transfer
    assert same1 > other1 + 0.08, (same1, other1)
    assert same1 > same0 + 0.08, (same0, same1)


# ----------------------------------------------------------------------------- checks
@pytest.mark.parametrize("bad", [{"domain_correlation": -0.1}, {"domain_correlation": 1.5},
                                 {"domain_correlation": float("nan")}, {"domain": -1}])
def test_invalid_domain_settings(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"SyntheticConfig.{name} "):
        SyntheticConfig(**bad)
