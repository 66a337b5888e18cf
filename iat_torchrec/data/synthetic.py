"""The built-in default data: a synthetic instance-log generator with a documented process.

The generator writes an instance log (see :mod:`iat_torchrec.data.log`) whose labels depend on
things that only a model reading the user's earlier instances *with their full context and labels*
can recover, so that instance tokens (IAT, SIF) have something to find that item-id histories do
not. Everything below is deterministic given a :class:`SyntheticConfig`: the same config gives
byte-identical tables (``threads`` only changes speed, never data).

Generative process
==================
Notation: ``U`` users, ``I`` items, ``N`` instances over ``days`` days starting at ``start_ts``
(UTC, a whole hour), ``C`` categories, latent dimension 8 (+1 price dimension), ``sigmoid`` the
logistic function. ``Zipf(s)`` weights over ``n`` ranks are ``(r + 10) ** -s`` for rank
``r = 1..n`` (Zipf-Mandelbrot with offset 10), assigned to ids through a random permutation.

**Users** (static). Activity weight ``w_u ~ Zipf(user_zipf_exponent)``. Attributes: age bucket
(7 values), gender (3), region (50, Zipf-like sizes); every region lies in one of 12 time zones
(UTC offsets -8 -6 -5 -3 0 1 2 3 5 7 8 9 h, assigned to regions at random), which gives the
user's ``tz_u``. A device mix ``m_u ~ Dirichlet(0.6, 0.35,
0.45, 0.15)`` over 4 devices (0 app, 1 mobile web, 2 desktop, 3 tablet): most users mostly use one
or two. Three preferred categories ``c_u1..c_u3`` drawn in proportion to category popularity
(the summed base popularity of their items). A sign-up time ``Exp(mean 400 days)`` before the start.
Latent vector ``p_u = 0.5 E_age + 0.3 E_gender + 0.3 E_region + 0.8 mean(E_cat[c_u*]) +
0.5 eps`` (each ``E`` a table of N(0, 1/8) vectors), plus a price-sensitivity coordinate that
falls with age. Bias ``a_u ~ N(0, 0.4^2)``.

**User x context propensity** (the part history must recover). The *context key* of an instance
is ``k = 2 * device + evening`` with ``evening = 1`` when the local hour is in [18, 6): 8 keys.
Every user has a period ``P_u`` log-uniform in [10, 40] days; every (user, key) pair has a phase
``phi_uk ~ U[0, 2 pi)`` and a static offset ``o_uk ~ N(0, 0.3^2)``. The propensity at time t is
``g_uk(t) = context_strength * (o_uk + 1.2 sin(2 pi (t - start) / P_u + phi_uk))``, ``t -
start`` in days. The phases
of different keys are independent, so the user's clicks in *other* contexts say nothing about the
drifting part of this context, and a static user embedding averages it out to zero: only the
user's *recent labels in the same context* reveal it. (In a domain d >= 1 it is mixed with an
independent one: see Domains.)

**Items** (static part). Base popularity ``v_i ~ Zipf(item_zipf_exponent)``. Category ~ Zipf-like
over ``C`` categories (exponent 0.8), brand ``= category * 20 + floor(20 u^2)`` (20 brands per
category, skewed), log price ``~ N(mu_category, 0.4^2)`` with ``mu_c ~ N(3, 1)``, price bucket =
price decile (10 buckets), 0-4 tags (probabilities .1 .3 .3 .2 .1) from a vocabulary of 1000, 70%
of them from the category's 10 own tags, 30% global (skewed), kept sorted and unique. Latent
vector ``q_i = E_cat + 0.5 E_brand + 0.4 mean(E_tag) + 0.4 eps`` plus the coordinate
``-price_z``. Bias (quality) ``a_i ~ N(0, 0.4^2)``.

**Drifting popularity.** Every item has a period ``Q_i`` log-uniform in [7, 60] days and a phase;
on day ``e`` (UTC days since the start) its drift is ``d_i(e) = popularity_drift *
sin(2 pi (e + 0.5) / Q_i + psi_i)`` (constant within a day). Its current popularity is
``v_i exp(d_i(e))``.

**Arrivals.** Instances arrive as a Poisson process of rate ``lambda(t) = sum_z W_z h(local
weekday, local hour in zone z)``, ``W_z`` the zone's total user activity, ``h`` a fixed
diurnal profile (low at night, peaks at noon and 20-22 h, weekends x1.15). Arrival times are drawn
by inverting the cumulative rate on an hourly grid; rows are stratified: the ``j``-th chunk of
``2**18`` rows covers the ``j``-th equal share of the cumulative rate, sorted uniforms within.
``ts`` is whole seconds, non-decreasing: the log is written in time order. ``instance_id`` is the
row number (unique, in time order). Per instance, given ``ts``:

1. time zone ``z`` with probability ``W_z h(...)`` at that hour; user ``u`` within ``z`` with
   probability ``w_u``. So users are active in their own day time, and activity stays Zipf-like.
2. device ``~ m_u``; local hour and weekday from ``ts + tz_u``; slot (position on the page)
   ``s = min(9, Geometric(0.25) - 1)``.
3. item: with probability 0.3 from all items, otherwise from the user's preferred category
   ``c_u1, c_u2, c_u3`` (probabilities .6 .25 .15), in either case in proportion to the item's
   current popularity ``v_i exp(d_i(e))`` (per-day cumulative sums over category-sorted items and
   a guided search).
4. label ``click ~ Bernoulli(sigmoid(l))`` with logit

   ``l = b0 + a_u + a_i + f(p_u . q_i) + 0.5 d_i(e) + g_uk(ts) + dev[device] + eff[hour]
   - 0.1 s``

   where ``f`` rescales the affinity to standard deviation 0.8 over the traffic, ``dev = (0.1,
   -0.1, 0, 0.05)`` and ``eff[h] = 0.15 sin(2 pi (h - 15) / 24)`` are small fixed global effects
   of the device and the local hour, and ``b0`` is solved (bisection on a pilot sample of 65,536
   instances drawn by the same process) so that the mean click probability is ``target_ctr``.

So the label depends on user/item attributes (through ``p . q``, biases and price sensitivity), on
the item's drifting popularity (an item's recent click rate and traffic reveal ``d_i``), on fixed
context effects, and on the non-stationary user x context propensity: a model that sees the user's
past instances with their device, hour and label can estimate ``g_uk(t)`` from recent same-context
clicks; item ids alone (no context, no label) cannot. The dependence on earlier responses goes
through this shared hidden state, not through a feedback of the labels themselves.

**How much there is to learn** (``true_click_probability``; default config, 1M instances, CTR
0.30): the AUC of the true logit is 0.806 (the Bayes limit); without the drifting part of ``g`` it
is 0.739 (about the most a model blind to recent same-context history can reach), with the
user/item part ``a_u + a_i + f(p . q)`` alone 0.711. :func:`oracle_auc` computes these for any config. From
the logged columns alone, the click correlates 0.21 with the mean of the user's previous 5 labels
in the same context key and 0.07 with the previous 5 in the paired key (same device, other part of
the day); with ``context_strength=0`` both are 0.10 (``tests/test_synthetic.py`` checks this).
For ``cfg = SyntheticConfig(num_instances=25000, num_users=100, num_items=2000)`` (every row,
``oracle_auc(dataclasses.replace(cfg, domain=1, domain_correlation=rho))``) domain 1 has, at
rho = 0 / 0.5 / 1: ``transferable`` 0.723 / 0.739 / 0.797, ``bayes`` 0.805 / 0.802 / 0.797,
``no_drift`` 0.735 / 0.729 / 0.726 (domain 0: ``bayes`` 0.804, ``no_drift`` 0.738, ``static``
0.710). From the logged columns, the domain-1 click correlates 0.06 / 0.13 / 0.20 with the mean
of the user's previous 5 *domain-0* labels in the same context key, and 0.07 at every rho with
those in the paired key (1,000 users and items, 20 categories, 60,000 instances in 30 days;
``tests/test_synthetic_domains.py`` checks this).

**Domains** (``domain``, ``domain_correlation``). ``domain = 0`` (the default) is the log
described above. A domain ``d >= 1`` is another scenario of the *same users*: every user quantity
(activity ``w_u``, attributes, time zone, device mix, sign-up, the preferred category indices
``c_u*``, ``p_u``, ``a_u``, ``P_u``) comes from the same streams as in domain 0 and is identical,
and so are the category embeddings ``E_cat`` (a category index means the same in every domain).
Everything else is the domain's own, from streams keyed by ``d``: its items (popularity,
categories, brands, prices, tags, ``E_brand``, ``E_tag`` and the noise of ``q_i``, biases, drift
periods and phases; ``num_items`` and ``num_categories`` as configured), arrivals, devices, slots,
item choices, label noise and field noise, and the calibration (``f`` and ``b0`` solved on the
domain's own pilot). A preferred category with no items in domain d sends its traffic to the
nearest earlier non-empty category. The feature spec is domain 0's (same fields and
vocabularies), but an item id names a different item in each domain; a user id the same user.

The user x context propensity mixes domain 0's with an independent one of the same form: with the
domain's own phases ``phi'_uk ~ U[0, 2 pi)`` and offsets ``o'_uk ~ N(0, 0.3^2)``, ``rho =
domain_correlation`` and ``rho' = sqrt(1 - rho^2)``,

``g^d_uk(t) = rho g^0_uk(t) + rho' context_strength (o'_uk + 1.2 sin(2 pi (t - start) / P_u +
phi'_uk))``,

i.e. the offset ``rho o_uk + rho' o'_uk`` and the drift ``1.2 A_uk sin(2 pi (t - start) / P_u +
phi^d_uk)`` with ``A_uk exp(i phi^d_uk) = rho exp(i phi_uk) + rho' exp(i phi'_uk)``: a sinusoid of
the same period with ``E A_uk^2 = 1``, so offsets and drift keep domain 0's variance over (user,
key) pairs (one pair's amplitude varies when 0 < rho < 1) and correlate ``rho`` with domain 0's.
``rho = 1`` gives domain 0's propensity exactly, ``rho = 0`` an independent one (the control).
Given domain 0's propensity the best guess of domain d's is ``rho g^0_uk(t)`` (the truth's
``user_context_transferable``; ``oracle_auc``'s ``transferable``): a model in domain d that reads
the user's domain-0 history with its context and labels (e.g. instance tokens of a source model
trained on domain 0) can recover that part, and nothing of it at ``rho = 0``. The user's overall
domain-0 click rate says something in domain d at any rho (``a_u`` and ``p_u`` are shared); only
the same-context part transfers in proportion to rho.

**Fields.** ``num_sparse_fields`` sparse fields: the first are the meaningful ones in this order
(so a smaller count keeps the most important; at least ``user`` and ``item_id``):
``user, item_id, device, hour, category, slot, weekday, brand, age_bucket, gender, region,
price_bucket, tags (list<int64>), user_x_device, device_x_hour, category_x_device,
age_x_category, region_x_category, user_x_category`` (crosses are exact ids, or a multiplicative
hash into 2**20 buckets when the product is larger); further fields, ``j`` the field's index,
are ``extra_user_j`` (``j % 3 == 0``: a fixed hash of the user id into a small vocabulary, a
weakly informative coarse user id), ``extra_item_j`` (``j % 3 == 1``: likewise for the item) and
``noise_j`` (``j % 3 == 2``: per-instance noise ids ``floor(V u^3)``), with vocabulary sizes ``V``
cycling through 1000, 100, 10000, 300, 3000, 100000.
``num_dense_fields`` dense fields, likewise: ``price`` (standardised log price), ``item_trend``
(``d_i(e) + N(0, 0.5^2)``), ``affinity_score`` (an upstream score: standardised affinity plus
N(0, 1)), ``user_activity`` (standardised log ``w_u``), ``hour_sin``, ``hour_cos``,
``user_tenure`` (log1p days since sign-up), ``item_quality`` (``a_i / 0.4 + N(0, 1)``),
``latency`` (softplus of N(mu_device, 0.5^2); no effect on the label), then, ``j`` the field's
index, ``dense_weak_j`` for even ``j`` (the static logit ``a_u + a_i + f(p . q)``, standardised,
plus N(0, 2^2)) and ``dense_noise_j`` for odd ``j`` (N(0, 1)). No dense field carries the
user x context term.

**Randomness.** Every quantity comes from its own ``numpy`` stream, ``SeedSequence(seed,
spawn_key=...)`` keyed by (purpose, chunk, field): adding fields does not change the others, and
chunks can be generated in any order or in parallel. A domain d >= 1 appends ``d`` to the keys of
its own streams (items, pilot, chunks, its own propensity phases and offsets) and reads the users'
streams (and ``E_cat``) with domain 0's keys.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import threading
from dataclasses import field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa

from iat_torchrec.data.log import LogWriter
from iat_torchrec.data.spec import DenseField, FeatureGroup, FeatureSpec, SparseField

PathLike = Union[str, os.PathLike]

LABEL = "click"
CHUNK_ROWS = 1 << 18  # rows per generated chunk; part of the data's definition, not a knob

# Fixed structural constants of the process (documented in the module docstring).
NUM_DEVICES = 4
NUM_AGE = 7
NUM_GENDER = 3
NUM_REGIONS = 50
TZ_OFFSETS = np.array([-8, -6, -5, -3, 0, 1, 2, 3, 5, 7, 8, 9], dtype=np.int64)
NUM_SLOTS = 10
NUM_PRICE_BUCKETS = 10
NUM_TAGS = 1000
BRANDS_PER_CATEGORY = 20
NUM_CONTEXT_KEYS = 2 * NUM_DEVICES
LATENT_DIM = 8
ZIPF_OFFSET = 10.0
HASH_BUCKETS = 1 << 20
EXPLORE_PROB = 0.3
PREF_WEIGHTS = np.array([0.6, 0.25, 0.15])
AFFINITY_STD = 0.8
POP_LOGIT = 0.5
CONTEXT_AMPLITUDE = 1.2
SLOT_EFFECT = -0.1
PILOT_ROWS = 1 << 16
DEVICE_EFFECT = np.array([0.1, -0.1, 0.0, 0.05], dtype=np.float32)
HOUR_PROFILE = np.array([0.25, 0.15, 0.1, 0.08, 0.08, 0.12, 0.3, 0.55, 0.7, 0.75, 0.8, 0.85,
                         0.95, 0.9, 0.85, 0.85, 0.9, 1.0, 1.1, 1.25, 1.4, 1.4, 1.1, 0.6])
HOUR_EFFECT = (0.15 * np.sin(2 * np.pi * (np.arange(24) - 15) / 24)).astype(np.float32)

# Random-stream purposes (first element of the SeedSequence spawn key).
_S_WORLD, _S_PILOT, _S_CHUNK = 0, 1, 2
# Second-level purposes inside a chunk.
_P_TIME, _P_USER, _P_DEVICE, _P_SLOT, _P_ITEM, _P_LABEL = range(6)
_P_SPARSE, _P_DENSE = 1000, 2000


@dataclasses.dataclass
class SyntheticConfig:
    """Generate the default synthetic instance log (see iat_torchrec.data.synthetic)."""

    num_users: int = field(default=20_000, metadata={"help": "number of users"})
    num_items: int = field(default=10_000, metadata={"help": "number of items"})
    num_instances: int = field(default=1_000_000, metadata={"help": "number of instances (rows)"})
    num_sparse_fields: int = field(default=26, metadata={
        "help": "sparse fields (>= 2): the meaningful ones first, then weak/noise fields"})
    num_dense_fields: int = field(default=13, metadata={
        "help": "dense fields (>= 0): the meaningful ones first, then weak/noise fields"})
    days: int = field(default=60, metadata={"help": "time span of the log in days"})
    seed: int = field(default=0, metadata={"help": "random seed: same config, same data"})
    num_categories: int = field(default=100, metadata={"help": "number of item categories"})
    target_ctr: float = field(default=0.3, metadata={"help": "mean click probability"})
    user_zipf_exponent: float = field(default=1.0, metadata={
        "help": "Zipf exponent of user activity (0 = uniform)"})
    item_zipf_exponent: float = field(default=1.0, metadata={
        "help": "Zipf exponent of item base popularity (0 = uniform)"})
    context_strength: float = field(default=1.0, metadata={
        "help": "scale of the user x context propensity (static offsets and drift); 0 removes it"})
    popularity_drift: float = field(default=1.0, metadata={
        "help": "amplitude of the items' popularity drift (log scale); 0 removes it"})
    embedding_dim: int = field(default=16, metadata={
        "help": "embedding_dim of every sparse field in the spec (multiple of 4)"})
    label_delay_s: int = field(default=3600, metadata={
        "help": "seconds after ts at which a click label becomes known (spec label_delay_s)"})
    domain: int = field(default=0, metadata={
        "help": "which domain's log to write: 0 the source domain, d >= 1 another domain of the "
                "same users with its own items, arrivals and labels (see Domains)"})
    domain_correlation: float = field(default=0.0, metadata={
        "help": "rho in [0, 1]: correlation of a domain d >= 1's user x context propensity with "
                "domain 0's (unused in domain 0)"})
    start_ts: int = field(default=1_704_067_200, metadata={
        "help": "start of the log, UTC seconds, a whole hour (default 2024-01-01)"})
    rows_per_file: int = field(default=2_000_000, metadata={"help": "rows per Parquet file"})
    threads: int = field(default=2, metadata={
        "help": "generator threads working ahead of the consumer, 0 = generate in the calling "
                "thread (speed only; the data does not depend on it)"})

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError("SyntheticConfig.threads must be >= 0")
        for name in ("num_users", "num_items", "num_instances", "days", "num_categories",
                     "rows_per_file"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_sparse_fields < 2:
            raise ValueError("SyntheticConfig.num_sparse_fields must be >= 2 (user and item_id)")
        if self.num_dense_fields < 0:
            raise ValueError("SyntheticConfig.num_dense_fields must be >= 0")
        if not 0.0 < self.target_ctr < 1.0:
            raise ValueError(f"SyntheticConfig.target_ctr must be in (0, 1), got {self.target_ctr}")
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError("SyntheticConfig.embedding_dim must be a positive multiple of 4")
        if self.label_delay_s < 0:
            raise ValueError("SyntheticConfig.label_delay_s must be >= 0")
        if self.start_ts < 0 or self.start_ts % 3600:
            raise ValueError("SyntheticConfig.start_ts must be >= 0 and a whole hour (multiple "
                             "of 3600)")
        if self.seed < 0:
            raise ValueError("SyntheticConfig.seed must be >= 0")
        if self.domain < 0:
            raise ValueError(f"SyntheticConfig.domain must be >= 0, got {self.domain}")
        if not 0.0 <= self.domain_correlation <= 1.0:
            raise ValueError("SyntheticConfig.domain_correlation must be in [0, 1], got "
                             f"{self.domain_correlation}")


# =============================================================================== random streams
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Zipf-Mandelbrot weights (rank + 10) ** -exponent, ranks randomly assigned, summing to 1."""
    rank = rng.permutation(n).astype(np.float64) + 1.0
    w = (rank + ZIPF_OFFSET) ** -exponent
    return w / w.sum()


def _sorted_uniforms(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """n sorted uniforms in [lo, hi) in O(n) (normalised exponential spacings)."""
    e = rng.standard_exponential(n + 1)
    c = np.cumsum(e)
    return lo + (hi - lo) * (c[:-1] / c[-1])


class _Guide:
    """Inverse-CDF sampling from a non-decreasing ``cum`` (leading 0) with a guide table.

    ``find(v)`` equals ``np.searchsorted(cum, v, side="right") - 1`` for ``v`` in
    ``[0, cum[-1])`` but runs in a few vectorised passes instead of a binary search per value
    (3-5x faster); rows the guide does not settle in a few steps fall back to the binary search.
    """

    def __init__(self, cum: np.ndarray, per_value: int = 4) -> None:
        self.cum = cum
        self._cum = np.append(cum, np.inf)  # sentinel: the walk below never runs off the end
        self.last = cum.size - 2  # largest valid answer
        self.m = per_value * (cum.size - 1)
        self.scale = self.m / cum[-1]
        # guide[k] = (number of cum values <= k / scale) - 1, counted in one pass over cum
        # (rounding slips are harmless: find() checks and repairs every answer).
        bucket = np.clip(np.ceil(cum * self.scale), 0, self.m).astype(np.int64)
        self.guide = (np.cumsum(np.bincount(bucket, minlength=self.m + 1)[:self.m]) - 1
                      ).astype(np.int32)

    def find(self, v: np.ndarray, steps: int = 4) -> np.ndarray:
        cum = self._cum
        k = np.minimum((v * self.scale).astype(np.int64), self.m - 1)
        idx = self.guide[k]
        for _ in range(steps):
            adv = cum[idx + 1] <= v
            if not adv.any():
                break
            idx += adv
        else:
            adv = cum[idx + 1] <= v
        bad = adv | (cum[idx] > v)
        if bad.any():
            idx[bad] = np.searchsorted(self.cum, v[bad], side="right") - 1
        return np.clip(idx, 0, self.last)


def _categorical_rows(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row-wise categorical draw: ``cum`` (n, k) cumulative probabilities, ``u`` (n,) uniforms."""
    k = cum.shape[1]
    out = (cum[:, :-1] <= u[:, None]).sum(axis=1)
    return np.minimum(out, k - 1)


def _nonempty(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Map each segment index to itself if non-empty, else to the nearest earlier non-empty one
    (or the first non-empty one): guards draws against float rounding into empty segments."""
    idx = np.arange(lo.size)
    ok = hi > lo
    last = np.maximum.accumulate(np.where(ok, idx, -1))
    return np.where(last >= 0, last, int(np.flatnonzero(ok)[0]))


def _cross_vocab(na: int, nb: int) -> int:
    """Vocabulary of a cross: the exact product, capped at ``HASH_BUCKETS`` (then hashed)."""
    return min(na * nb, HASH_BUCKETS)


def _cross(a: np.ndarray, na: int, b: np.ndarray, nb: int) -> np.ndarray:
    key = a.astype(np.int64) * nb + b.astype(np.int64)
    if na * nb <= HASH_BUCKETS:
        return key
    h = key.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return (h >> np.uint64(44)).astype(np.int64)  # top 20 bits: [0, 2**20)


# =============================================================================== the world
class _World:
    """All static parameters of the process for one config (users, items, time grid)."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        self.domain_key = (cfg.domain,) if cfg.domain else ()
        U, I, C = cfg.num_users, cfg.num_items, cfg.num_categories
        r = lambda *k: _rng(cfg.seed, _S_WORLD, *k)  # noqa: E731  (shared by all domains)
        rd = lambda *k: self.rng(_S_WORLD, *k)  # noqa: E731  (the domain's own)

        # ---------------------------------------------------------------- items
        g = rd(1)
        self.item_w, self.item_cat = _popularity_and_category(g, cfg)
        self.item_brand = (self.item_cat * BRANDS_PER_CATEGORY
                           + np.floor(BRANDS_PER_CATEGORY * g.random(I) ** 2).astype(np.int64))
        cat_price = g.normal(3.0, 1.0, C)
        log_price = cat_price[self.item_cat] + g.normal(0.0, 0.4, I)
        self.item_price_z = ((log_price - log_price.mean()) / max(log_price.std(), 1e-9)
                             ).astype(np.float32)
        edges = np.quantile(log_price, np.linspace(0, 1, NUM_PRICE_BUCKETS + 1)[1:-1])
        self.item_price_bucket = np.searchsorted(edges, log_price, side="right").astype(np.int64)
        self.item_bias = g.normal(0.0, 0.4, I).astype(np.float32)
        self.item_period = np.exp(g.uniform(np.log(7.0), np.log(60.0), I))
        self.item_phase = g.uniform(0.0, 2 * np.pi, I)
        # tags: CSR, sorted and unique per item
        g = rd(2)
        ntag = g.choice(5, size=I, p=[0.1, 0.3, 0.3, 0.2, 0.1])
        owner = np.repeat(np.arange(I, dtype=np.int64), ntag)
        own = g.random(owner.size) < 0.7
        tag = np.where(own, (self.item_cat[owner] * 10 + g.integers(0, 10, owner.size)) % NUM_TAGS,
                       np.floor(NUM_TAGS * g.random(owner.size) ** 2).astype(np.int64))
        key = np.sort(owner * NUM_TAGS + tag)
        key = key[np.concatenate([[True], key[1:] != key[:-1]])] if key.size else key
        self.tag_values = (key % NUM_TAGS).astype(np.int64)
        counts = np.bincount(key // NUM_TAGS, minlength=I)
        self.tag_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.tag_counts = counts.astype(np.int64)
        # latent vectors (category embeddings shared by all domains, the rest the domain's own)
        g = r(3)
        sd = 1.0 / math.sqrt(LATENT_DIM)
        E_cat = g.normal(0, sd, (C, LATENT_DIM))
        if cfg.domain:
            g = rd(3)
        E_brand = g.normal(0, sd, (C * BRANDS_PER_CATEGORY, LATENT_DIM))
        E_tag = g.normal(0, sd, (NUM_TAGS, LATENT_DIM))
        tag_sum = np.stack([np.bincount(key // NUM_TAGS, weights=E_tag[self.tag_values, j],
                                        minlength=I) for j in range(LATENT_DIM)], axis=1)
        tag_mean = tag_sum / np.maximum(counts, 1)[:, None]
        q = (E_cat[self.item_cat] + 0.5 * E_brand[self.item_brand] + 0.4 * tag_mean
             + 0.4 * g.normal(0, sd, (I, LATENT_DIM)))
        self.item_q = np.concatenate([q, -self.item_price_z[:, None]], axis=1).astype(np.float32)
        # category-sorted order for per-category sampling
        self.item_order = np.argsort(self.item_cat, kind="stable").astype(np.int64)
        sorted_cat = self.item_cat[self.item_order]
        self.cat_lo = np.searchsorted(sorted_cat, np.arange(C), side="left").astype(np.int64)
        self.cat_hi = np.searchsorted(sorted_cat, np.arange(C), side="right").astype(np.int64)

        # ---------------------------------------------------------------- users (shared)
        # The preferred categories are drawn from domain 0's category popularity.
        src_w, src_cat = ((self.item_w, self.item_cat) if not cfg.domain else
                          _popularity_and_category(r(1), cfg))
        cat_pop = np.bincount(src_cat, weights=src_w, minlength=C)
        src_count = np.bincount(src_cat, minlength=C)
        src_hi = np.cumsum(src_count)
        g = r(4)
        self.user_w = _zipf_weights(g, U, cfg.user_zipf_exponent)
        self.user_age = g.choice(NUM_AGE, size=U, p=[.08, .2, .25, .2, .13, .09, .05])
        self.user_gender = g.choice(NUM_GENDER, size=U, p=[.48, .48, .04])
        reg_p = (np.arange(NUM_REGIONS) + 2.0) ** -1.0
        self.user_region = g.choice(NUM_REGIONS, size=U, p=reg_p / reg_p.sum())
        region_zone = g.integers(0, len(TZ_OFFSETS), NUM_REGIONS)
        self.user_zone = region_zone[self.user_region]
        self.user_tz_s = (TZ_OFFSETS[self.user_zone] * 3600).astype(np.int64)
        mix = g.dirichlet([0.6, 0.35, 0.45, 0.15], size=U)
        self.user_dev_cum = np.cumsum(mix, axis=1).astype(np.float32)
        cat_cum = np.cumsum(cat_pop)
        pref = np.minimum(np.searchsorted(cat_cum, g.random((U, 3)) * cat_cum[-1],
                                          side="right"), C - 1)
        pref = _nonempty(src_hi - src_count, src_hi)[pref]
        # the categories the user's traffic draws from in this domain (pref itself in domain 0)
        self.user_pref = _nonempty(self.cat_lo, self.cat_hi)[pref].astype(np.int64)
        self.user_signup = (cfg.start_ts - (g.exponential(400.0, U) * 86400)).astype(np.int64)
        self.user_bias = g.normal(0.0, 0.4, U).astype(np.float32)
        g = r(5)
        E_age = g.normal(0, sd, (NUM_AGE, LATENT_DIM))
        E_gender = g.normal(0, sd, (NUM_GENDER, LATENT_DIM))
        E_region = g.normal(0, sd, (NUM_REGIONS, LATENT_DIM))
        p = (0.5 * E_age[self.user_age] + 0.3 * E_gender[self.user_gender]
             + 0.3 * E_region[self.user_region] + 0.8 * E_cat[pref].mean(axis=1)
             + 0.5 * g.normal(0, sd, (U, LATENT_DIM)))
        sens = 0.8 - 0.1 * self.user_age + g.normal(0, 0.2, U)
        self.user_p = np.concatenate([p, 0.3 * sens[:, None]], axis=1).astype(np.float32)
        g = r(6)
        self.user_period = np.exp(g.uniform(np.log(10.0), np.log(40.0), U)).astype(np.float32)
        self.ctx_phase = g.uniform(0.0, 2 * np.pi, (U, NUM_CONTEXT_KEYS)).astype(np.float32)
        self.ctx_offset = g.normal(0.0, 0.3, (U, NUM_CONTEXT_KEYS)).astype(np.float32)
        if cfg.domain:  # the domain's own phases and offsets, mixed with domain 0's (Domains)
            g = rd(6)
            self.own_ctx_phase = g.uniform(0.0, 2 * np.pi, (U, NUM_CONTEXT_KEYS)
                                           ).astype(np.float32)
            self.own_ctx_offset = g.normal(0.0, 0.3, (U, NUM_CONTEXT_KEYS)).astype(np.float32)
        # users sorted by zone, for zone-then-user sampling
        Z = len(TZ_OFFSETS)
        self.user_order = np.argsort(self.user_zone, kind="stable").astype(np.int64)
        self.user_cum = np.concatenate([[0.0], np.cumsum(self.user_w[self.user_order])])
        self.user_guide = _Guide(self.user_cum)
        sz = self.user_zone[self.user_order]
        self.zone_lo = np.searchsorted(sz, np.arange(Z), side="left")
        self.zone_hi = np.searchsorted(sz, np.arange(Z), side="right")
        zone_w = np.bincount(self.user_zone, weights=self.user_w, minlength=Z)
        self.zone_map = _nonempty(self.zone_lo, self.zone_hi)

        # ---------------------------------------------------------------- time grid (hours)
        G = cfg.days * 24
        cell = cfg.start_ts + 3600 * np.arange(G, dtype=np.int64)
        local = cell[:, None] + 3600 * TZ_OFFSETS[None, :]
        hour = (local // 3600) % 24
        wday = (local // 86400 + 3) % 7
        lam = zone_w[None, :] * HOUR_PROFILE[hour] * np.where(wday >= 5, 1.15, 1.0)
        self.zone_cum = (np.cumsum(lam, axis=1) / lam.sum(axis=1, keepdims=True)
                         ).astype(np.float32)
        self.time_cum = np.concatenate([[0.0], np.cumsum(lam.sum(axis=1))])
        self.time_cum /= self.time_cum[-1]

        # per-day popularity cache
        self._epoch_lock = threading.Lock()
        self._epoch_cache: Dict[int, Tuple[np.ndarray, _Guide]] = {}
        self._epoch_cache_size = max(8, (256 << 20) // (36 * I + 64))  # about 256 MiB at most

        # ---------------------------------------------------------------- calibration
        self.aff_scale = 1.0
        self.b0 = 0.0
        pilot = self.draw(self.rng(_S_PILOT, 0), None, PILOT_ROWS)
        aff = pilot.affinity_raw
        self.aff_scale = AFFINITY_STD / max(float(aff.std()), 1e-9)
        rest = pilot.logit_without_b0(self)
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if _sigmoid(rest + mid).mean() < cfg.target_ctr:
                lo = mid
            else:
                hi = mid
        self.b0 = 0.5 * (lo + hi)
        static = self.static_logit_parts(pilot)
        self.static_mean = float(static.mean())
        self.static_std = max(float(static.std()), 1e-9)
        act = np.log(self.user_w)
        self.user_activity_z = ((act - act.mean()) / max(act.std(), 1e-9)).astype(np.float32)

    def rng(self, *key: int) -> np.random.Generator:
        """The stream of ``key`` in this domain: domain d >= 1 appends d to the spawn key."""
        return _rng(self.cfg.seed, *key, *self.domain_key)

    def propensity(self, user: np.ndarray, key: np.ndarray, t_days: np.ndarray
                   ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """The user x context propensity ``g_uk(t)`` of this domain as (static offset part,
        drifting part), and ``rho g^0_uk(t)``, the part predictable from domain 0's (None in
        domain 0); ``t_days`` float32 days since the start."""
        cfg = self.cfg
        flat = user * NUM_CONTEXT_KEYS + key
        angle = 2 * np.pi * t_days / self.user_period[user]
        static = cfg.context_strength * self.ctx_offset.reshape(-1)[flat]
        drift = (cfg.context_strength * CONTEXT_AMPLITUDE
                 * np.sin(angle + self.ctx_phase.reshape(-1)[flat]))
        if not cfg.domain:
            return static, drift, None
        rho = cfg.domain_correlation
        own_weight = math.sqrt(1.0 - rho * rho)  # rho'
        own_static = cfg.context_strength * self.own_ctx_offset.reshape(-1)[flat]
        own_drift = (cfg.context_strength * CONTEXT_AMPLITUDE
                     * np.sin(angle + self.own_ctx_phase.reshape(-1)[flat]))
        return (rho * static + own_weight * own_static, rho * drift + own_weight * own_drift,
                rho * (static + drift))

    # ------------------------------------------------------------------ popularity per day
    def epoch(self, e: int) -> Tuple[np.ndarray, "_Guide"]:
        """(drift d_i(e) float32 per item, sampler over category-sorted items' popularity)."""
        with self._epoch_lock:
            hit = self._epoch_cache.get(e)
        if hit is not None:
            return hit
        drift = (self.cfg.popularity_drift
                 * np.sin(2 * np.pi * (e + 0.5) / self.item_period + self.item_phase))
        w = self.item_w * np.exp(drift)
        cum = np.concatenate([[0.0], np.cumsum(w[self.item_order])])
        out = (drift.astype(np.float32), _Guide(cum))
        with self._epoch_lock:
            if len(self._epoch_cache) >= self._epoch_cache_size:
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[e] = out
        return out

    # ------------------------------------------------------------------ one chunk of rows
    def draw(self, rng_time: np.random.Generator, chunk: Optional[int], n: int,
             lo: float = 0.0, hi: float = 1.0) -> "_Rows":
        """Draw ``n`` instances whose cumulative-rate positions lie in [lo, hi)."""
        cfg = self.cfg
        key = (_S_CHUNK, chunk) if chunk is not None else (_S_PILOT, 1)
        sub = lambda p: self.rng(*key, p)  # noqa: E731
        # time
        u = _sorted_uniforms(rng_time, n, lo, hi)
        t_hours = np.interp(u, self.time_cum, np.arange(self.time_cum.size, dtype=np.float64))
        ts = cfg.start_ts + np.floor(t_hours * 3600.0).astype(np.int64)
        ts = np.minimum(ts, cfg.start_ts + cfg.days * 86400 - 1)
        rel = ts - cfg.start_ts
        cell = rel // 3600
        # zone, then user
        g = sub(_P_USER)
        zone = self.zone_map[_categorical_rows(self.zone_cum[cell],
                                               g.random(n, dtype=np.float32))]
        zlo, zhi = self.zone_lo[zone], self.zone_hi[zone]
        clo, chi = self.user_cum[zlo], self.user_cum[zhi]
        pos = self.user_guide.find(clo + g.random(n) * (chi - clo))
        user = self.user_order[np.clip(pos, zlo, zhi - 1)]
        # device, local time, slot
        g = sub(_P_DEVICE)
        device = _categorical_rows(self.user_dev_cum[user], g.random(n, dtype=np.float32))
        local = ts + self.user_tz_s[user]
        hour = (local // 3600) % 24
        weekday = (local // 86400 + 3) % 7
        g = sub(_P_SLOT)
        slot = np.minimum(np.floor(np.log1p(-g.random(n)) / math.log(0.75)), NUM_SLOTS - 1
                          ).astype(np.int64)
        # item, per day (rows are time-sorted, so each day is one contiguous segment)
        g = sub(_P_ITEM)
        u_explore = g.random(n)
        u_pref = g.random(n)
        u_item = g.random(n)
        epoch = rel // 86400
        pref_rank = np.searchsorted(np.cumsum(PREF_WEIGHTS)[:-1], u_pref, side="right")
        cat = self.user_pref[user, pref_rank]
        explore = u_explore < EXPLORE_PROB
        ilo = np.where(explore, 0, self.cat_lo[cat])
        ihi = np.where(explore, self.item_w.size, self.cat_hi[cat])
        item = np.empty(n, dtype=np.int64)
        drift = np.empty(n, dtype=np.float32)
        bounds = np.flatnonzero(np.diff(epoch)) + 1
        for a, b in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [n]])):
            d, guide = self.epoch(int(epoch[a]))
            clo, chi = guide.cum[ilo[a:b]], guide.cum[ihi[a:b]]
            p = guide.find(clo + u_item[a:b] * (chi - clo))
            it = self.item_order[np.clip(p, ilo[a:b], ihi[a:b] - 1)]
            item[a:b] = it
            drift[a:b] = d[it]
        return _Rows(chunk=chunk, ts=ts, user=user, item=item, device=device, hour=hour,
                     weekday=weekday, slot=slot, drift=drift, world=self,
                     label_rng=sub(_P_LABEL))

    def static_logit_parts(self, rows: "_Rows") -> np.ndarray:
        return (self.user_bias[rows.user] + self.item_bias[rows.item]
                + self.aff_scale * rows.affinity_raw)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _days(cfg: SyntheticConfig, ts: np.ndarray) -> np.ndarray:
    """Days since the start of the log (float32) of UTC seconds ``ts``."""
    return ((np.asarray(ts) - cfg.start_ts) / 86400.0).astype(np.float32)


def _popularity_and_category(g: np.random.Generator, cfg: SyntheticConfig
                             ) -> Tuple[np.ndarray, np.ndarray]:
    """Items' base popularity and category: the first draws of a domain's item stream."""
    C = cfg.num_categories
    item_w = _zipf_weights(g, cfg.num_items, cfg.item_zipf_exponent)
    cat_p = (np.arange(C) + 1.0) ** -0.8
    return item_w, g.choice(C, size=cfg.num_items, p=cat_p / cat_p.sum()).astype(np.int64)


class _Rows:
    """The core per-instance draws of one chunk, and the label built from them."""

    def __init__(self, chunk, ts, user, item, device, hour, weekday, slot, drift, world,
                 label_rng) -> None:
        self.chunk, self.ts, self.user, self.item = chunk, ts, user, item
        self.device, self.hour, self.weekday, self.slot = device, hour, weekday, slot
        self.drift = drift
        self.n = ts.size
        self.label_rng = label_rng
        self.affinity_raw = np.einsum("ij,ij->i", world.user_p[user], world.item_q[item])
        self.ctx_key = 2 * device + ((hour >= 18) | (hour < 6))
        self.ctx_static, self.ctx_drift, self.ctx_transferable = world.propensity(
            user, self.ctx_key, _days(world.cfg, ts))
        self.global_ctx = DEVICE_EFFECT[device] + HOUR_EFFECT[hour] + SLOT_EFFECT * slot
        self.pop = POP_LOGIT * drift

    def logit_without_b0(self, w: _World) -> np.ndarray:
        return (w.static_logit_parts(self) + self.pop + self.ctx_static + self.ctx_drift
                + self.global_ctx)

    def truth(self, w: _World) -> Dict[str, np.ndarray]:
        """The true logit, its parts and the click probability (float64)."""
        static = w.static_logit_parts(self).astype(np.float64)
        logit = (w.b0 + static + self.pop + self.ctx_static + self.ctx_drift + self.global_ctx
                 ).astype(np.float64)
        out = {"p": _sigmoid(logit), "logit": logit, "b0": np.full(self.n, w.b0),
               "user_item": static, "item_popularity": self.pop.astype(np.float64),
               "user_context_static": self.ctx_static.astype(np.float64),
               "user_context_drift": self.ctx_drift.astype(np.float64),
               "global_context": self.global_ctx.astype(np.float64)}
        if self.ctx_transferable is not None:
            out["user_context_transferable"] = self.ctx_transferable.astype(np.float64)
        return out


# =============================================================================== fields
_FieldFn = Callable[[_World, _Rows, np.random.Generator], Union[np.ndarray, pa.Array]]


def _tags(w: _World, r: _Rows, g: np.random.Generator) -> pa.Array:
    lens = w.tag_counts[r.item]
    offsets = np.zeros(r.n + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    total = int(offsets[-1])
    start = np.repeat(w.tag_offsets[r.item] - offsets[:-1], lens)
    values = w.tag_values[start + np.arange(total, dtype=np.int64)]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int64()))


def _core_sparse(cfg: SyntheticConfig) -> List[Tuple[SparseField, _FieldFn]]:
    U, I, C = cfg.num_users, cfg.num_items, cfg.num_categories
    G = FeatureGroup
    D = NUM_DEVICES

    def sf(name, vocab, group, multi=False):
        return SparseField(name=name, num_embeddings=int(vocab), embedding_dim=cfg.embedding_dim,
                           group=group, multi_valued=multi)

    return [
        (sf("user", U, G.USER), lambda w, r, g: r.user),
        (sf("item_id", I, G.ITEM), lambda w, r, g: r.item),
        (sf("device", D, G.CONTEXT), lambda w, r, g: r.device.astype(np.int64)),
        (sf("hour", 24, G.CONTEXT), lambda w, r, g: r.hour),
        (sf("category", C, G.ITEM), lambda w, r, g: w.item_cat[r.item]),
        (sf("slot", NUM_SLOTS, G.CONTEXT), lambda w, r, g: r.slot),
        (sf("weekday", 7, G.CONTEXT), lambda w, r, g: r.weekday),
        (sf("brand", C * BRANDS_PER_CATEGORY, G.ITEM), lambda w, r, g: w.item_brand[r.item]),
        (sf("age_bucket", NUM_AGE, G.USER), lambda w, r, g: w.user_age[r.user]),
        (sf("gender", NUM_GENDER, G.USER), lambda w, r, g: w.user_gender[r.user]),
        (sf("region", NUM_REGIONS, G.USER), lambda w, r, g: w.user_region[r.user]),
        (sf("price_bucket", NUM_PRICE_BUCKETS, G.ITEM),
         lambda w, r, g: w.item_price_bucket[r.item]),
        (sf("tags", NUM_TAGS, G.ITEM, multi=True), _tags),
        (sf("user_x_device", _cross_vocab(U, D), G.CROSS),
         lambda w, r, g: _cross(r.user, U, r.device, D)),
        (sf("device_x_hour", D * 24, G.CROSS), lambda w, r, g: _cross(r.device, D, r.hour, 24)),
        (sf("category_x_device", _cross_vocab(C, D), G.CROSS),
         lambda w, r, g: _cross(w.item_cat[r.item], C, r.device, D)),
        (sf("age_x_category", _cross_vocab(NUM_AGE, C), G.CROSS),
         lambda w, r, g: _cross(w.user_age[r.user], NUM_AGE, w.item_cat[r.item], C)),
        (sf("region_x_category", _cross_vocab(NUM_REGIONS, C), G.CROSS),
         lambda w, r, g: _cross(w.user_region[r.user], NUM_REGIONS, w.item_cat[r.item], C)),
        (sf("user_x_category", _cross_vocab(U, C), G.CROSS),
         lambda w, r, g: _cross(r.user, U, w.item_cat[r.item], C)),
    ]


_EXTRA_VOCABS = (1_000, 100, 10_000, 300, 3_000, 100_000)


def _extra_sparse(cfg: SyntheticConfig, j: int) -> Tuple[SparseField, _FieldFn]:
    """Field number ``j`` beyond the core ones: weakly informative or noise ids."""
    vocab = _EXTRA_VOCABS[j % len(_EXTRA_VOCABS)]
    kind = j % 3
    # multiplier and offset of a fixed random-looking map id -> coarse id (per field)
    mult = np.int64(2 * ((j * 7919 + 104729) % 1_000_003) + 1)

    if kind == 0:
        f = SparseField(f"extra_user_{j}", vocab, cfg.embedding_dim, FeatureGroup.USER)
        return f, lambda w, r, g: (r.user * mult + j) % vocab
    if kind == 1:
        f = SparseField(f"extra_item_{j}", vocab, cfg.embedding_dim, FeatureGroup.ITEM)
        return f, lambda w, r, g: (r.item * mult + j) % vocab
    f = SparseField(f"noise_{j}", vocab, cfg.embedding_dim, FeatureGroup.CONTEXT)
    return f, lambda w, r, g: np.floor(vocab * g.random(r.n, dtype=np.float32) ** 3
                                       ).astype(np.int64).clip(0, vocab - 1)


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _core_dense() -> List[Tuple[DenseField, _FieldFn]]:
    G = FeatureGroup
    f32 = np.float32
    hour_angle = (2 * np.pi * np.arange(24) / 24)
    hs, hc = np.sin(hour_angle).astype(f32), np.cos(hour_angle).astype(f32)
    latency_mu = np.array([4.0, 4.5, 3.5, 4.2], dtype=f32)
    return [
        (DenseField("price", G.ITEM), lambda w, r, g: w.item_price_z[r.item]),
        (DenseField("item_trend", G.ITEM),
         lambda w, r, g: r.drift + 0.5 * g.standard_normal(r.n, dtype=f32)),
        (DenseField("affinity_score", G.CROSS),
         lambda w, r, g: _f32(r.affinity_raw * (w.aff_scale / AFFINITY_STD))
         + g.standard_normal(r.n, dtype=f32)),
        (DenseField("user_activity", G.USER), lambda w, r, g: w.user_activity_z[r.user]),
        (DenseField("hour_sin", G.CONTEXT), lambda w, r, g: hs[r.hour]),
        (DenseField("hour_cos", G.CONTEXT), lambda w, r, g: hc[r.hour]),
        (DenseField("user_tenure", G.USER),
         lambda w, r, g: _f32(np.log1p((r.ts - w.user_signup[r.user]) / 86400.0))),
        (DenseField("item_quality", G.ITEM),
         lambda w, r, g: w.item_bias[r.item] / f32(0.4) + g.standard_normal(r.n, dtype=f32)),
        (DenseField("latency", G.CONTEXT),
         lambda w, r, g: _f32(np.log(1.0 + np.exp(latency_mu[r.device]
                                                  + 0.5 * g.standard_normal(r.n, dtype=f32))))),
    ]


def _extra_dense(j: int) -> Tuple[DenseField, _FieldFn]:
    if j % 2 == 0:
        def weak(w: _World, r: _Rows, g: np.random.Generator) -> np.ndarray:
            s = (w.static_logit_parts(r) - w.static_mean) / w.static_std
            return _f32(s) + 2.0 * g.standard_normal(r.n, dtype=np.float32)
        return DenseField(f"dense_weak_{j}", FeatureGroup.CROSS), weak
    return (DenseField(f"dense_noise_{j}", FeatureGroup.CONTEXT),
            lambda w, r, g: g.standard_normal(r.n, dtype=np.float32))


def _fields(cfg: SyntheticConfig) -> Tuple[List[Tuple[SparseField, _FieldFn]],
                                           List[Tuple[DenseField, _FieldFn]]]:
    core = _core_sparse(cfg)
    sparse = core[:cfg.num_sparse_fields]
    sparse += [_extra_sparse(cfg, j) for j in range(len(core), cfg.num_sparse_fields)]
    dcore = _core_dense()
    dense = dcore[:cfg.num_dense_fields]
    dense += [_extra_dense(j) for j in range(len(dcore), cfg.num_dense_fields)]
    return sparse, dense


def feature_spec(config: SyntheticConfig) -> FeatureSpec:
    """The feature spec of the log :func:`generate` writes for ``config``."""
    sparse, dense = _fields(config)
    return FeatureSpec(sparse=[f for f, _ in sparse], dense=[f for f, _ in dense],
                       labels=[LABEL], label_delay_s=config.label_delay_s)


# =============================================================================== generation
def num_chunks(config: SyntheticConfig) -> int:
    return -(-config.num_instances // CHUNK_ROWS)


def _make_chunk(world: _World, sparse, dense, c: int, truth: bool
                ) -> Tuple[pa.Table, Optional[Dict[str, np.ndarray]]]:
    cfg = world.cfg
    N = cfg.num_instances
    a, b = c * CHUNK_ROWS, min(N, (c + 1) * CHUNK_ROWS)
    rows = world.draw(world.rng(_S_CHUNK, c, _P_TIME), c, b - a, a / N, b / N)
    logit = world.b0 + rows.logit_without_b0(world)
    click = (rows.label_rng.random(rows.n) < _sigmoid(logit)).astype(np.int8)
    cols: Dict[str, object] = {
        "instance_id": np.arange(a, b, dtype=np.int64),
        "user_id": rows.user,
        "ts": rows.ts,
        LABEL: click,
    }
    for j, (f, fn) in enumerate(sparse):
        cols[f.name] = fn(world, rows, world.rng(_S_CHUNK, c, _P_SPARSE + j))
    for j, (f, fn) in enumerate(dense):
        cols[f.name] = fn(world, rows, world.rng(_S_CHUNK, c, _P_DENSE + j))
    table = pa.table(cols)
    return table, (rows.truth(world) if truth else None)


def _iter(config: SyntheticConfig, truth: bool, threads: Optional[int]
          ) -> Iterator[Tuple[pa.Table, Optional[Dict[str, np.ndarray]]]]:
    world = _World(config)
    sparse, dense = _fields(config)
    n = num_chunks(config)
    threads = config.threads if threads is None else threads
    if threads <= 0 or n == 1:
        for c in range(n):
            yield _make_chunk(world, sparse, dense, c, truth)
        return
    # Worker threads generate the next chunks while the consumer (e.g. the Parquet writer) works.
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        pending = [pool.submit(_make_chunk, world, sparse, dense, c, truth)
                   for c in range(min(n, threads + 1))]
        nxt = len(pending)
        while pending:
            out = pending.pop(0).result()
            if nxt < n:
                pending.append(pool.submit(_make_chunk, world, sparse, dense, nxt, truth))
                nxt += 1
            yield out


def iter_tables(config: SyntheticConfig, threads: Optional[int] = None) -> Iterator[pa.Table]:
    """The log as a stream of Arrow tables (chunks of up to ``CHUNK_ROWS`` rows, time order)."""
    for table, _ in _iter(config, False, threads):
        yield table


def iter_tables_with_truth(config: SyntheticConfig, threads: Optional[int] = None
                           ) -> Iterator[Tuple[pa.Table, Dict[str, np.ndarray]]]:
    """Like :func:`iter_tables`, with the true click probability ``"p"``, the true ``"logit"``
    and its additive parts per row (``b0``, ``user_item``, ``item_popularity``,
    ``user_context_static``, ``user_context_drift``, ``global_context``); in a domain d >= 1
    also ``user_context_transferable``, ``rho g^0_uk(t)``: the part of the two user x context
    parts predictable from domain 0's propensity. For tests and analysis: none of these is
    written to the log."""
    for table, truth in _iter(config, True, threads):
        assert truth is not None
        yield table, truth


def true_click_probability(config: SyntheticConfig) -> np.ndarray:
    """The true click probability of every row of the log of ``config``, in row order."""
    return np.concatenate([t["p"] for _, t in iter_tables_with_truth(config)])


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks for ties
    _, first, counts = np.unique(s_sorted, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    pos = y.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def oracle_auc(config: SyntheticConfig, instance_ids: Optional[np.ndarray] = None
               ) -> Dict[str, float]:
    """AUCs of oracle scores on the generated labels: ``bayes`` (the true logit), ``no_drift``
    (the true logit without the drifting user x context term: the best a model blind to recent
    same-context history can hope for), ``static`` (user/item biases and affinity only), and the
    data's ``ctr``; in a domain d >= 1 also ``transferable`` (the true logit with the user x
    context propensity replaced by ``rho g^0_uk(t)``, its part predictable from domain 0's: the
    most a model that knows domain 0's propensity but not this domain's own part can reach);
    over every row, or over the rows of ``instance_ids`` (e.g. a test split)."""
    scores: Dict[str, List[np.ndarray]] = {"bayes": [], "no_drift": [], "static": []}
    if config.domain:
        scores["transferable"] = []
    ys = []
    for table, t in iter_tables_with_truth(config):
        keep = (np.ones(table.num_rows, dtype=bool) if instance_ids is None else
                np.isin(table.column("instance_id").to_numpy(), instance_ids))
        ys.append(table.column(LABEL).to_numpy()[keep])
        logit = t["logit"][keep]
        scores["bayes"].append(logit)
        scores["no_drift"].append(logit - t["user_context_drift"][keep])
        scores["static"].append(t["user_item"][keep])
        if config.domain:
            scores["transferable"].append(
                logit - t["user_context_static"][keep] - t["user_context_drift"][keep]
                + t["user_context_transferable"][keep])
    y = np.concatenate(ys)
    out = {k: _auc(y, np.concatenate(v)) for k, v in scores.items()}
    out["ctr"] = float(y.mean())
    return out


def context_propensity(config: SyntheticConfig, user: np.ndarray, key: np.ndarray,
                       ts: np.ndarray) -> np.ndarray:
    """The true user x context propensity ``g_uk(t)`` of ``config``'s domain (static offset plus
    drift, float32) of users ``user`` in context keys ``key`` at UTC seconds ``ts`` (integer
    arrays of one shape). For tests and analysis."""
    world = _World(config)
    user, key = np.asarray(user, dtype=np.int64), np.asarray(key, dtype=np.int64)
    static, drift, _ = world.propensity(user, key, _days(config, ts))
    return static + drift


def provenance(config: SyntheticConfig) -> Dict[str, object]:
    """What identifies the data of ``config`` (``threads`` changes only speed; domain 0's log
    does not depend on ``domain_correlation``, and is identified as before domains existed)."""
    fields = dataclasses.asdict(config)
    fields.pop("threads")
    if not config.domain:
        fields.pop("domain")
        fields.pop("domain_correlation")
    return {"source": "synthetic", "config": fields}


def generate(config: SyntheticConfig, out_path: PathLike, overwrite: bool = False) -> Path:
    """Generate the log of ``config`` into a new directory ``out_path`` (Parquet files and
    ``feature_spec.json``), written atomically. An existing ``out_path`` raises
    :class:`~iat_torchrec.atomic.OutputExistsError` unless ``overwrite``, before any work."""
    spec = feature_spec(config)
    with LogWriter(out_path, spec, overwrite=overwrite, rows_per_file=config.rows_per_file,
                   provenance=provenance(config)) as writer:
        for table in iter_tables(config):
            writer.write(table)
    return Path(out_path)
