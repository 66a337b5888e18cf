"""Diagnostics for history models on the synthetic data: is there a signal, do tokens carry it?

    # How much of the drifting user x context term can history recover, for a synthetic config?
    python apps/diagnose_history.py signal --num_instances 100000 --num_users 2000 --num_items 2000

    # The same at the main job's size, written with date and machine
    python apps/diagnose_history.py signal --num_instances 25000 --num_users 100 \
        --num_items 2000 --max_len 128 --out results/signal_main_job.json

    # How much of domain 1's drift does domain 0's history reveal (transfer), per correlation?
    python apps/diagnose_history.py transfer --num_instances 25000 --num_users 100 \
        --num_items 2000 --correlations 0 0.5 1

    # Do a store's tokens (IAT floats or SIF codes) carry the context key of their instance?
    python apps/diagnose_history.py probe --log <data_dir>/synthetic-*/log --stores <work>/iat_temporal <work>/sif

``signal`` regenerates the log with its truth (:func:`iat_torchrec.data.synthetic.iter_tables_with_truth`)
and scores the test window (the last ``1 - test_quantile`` of ts) with logistic regressions fitted
on the first ``train_quantile``: the true logit without the drift (``no_drift``, the ceiling of a
model blind to history) plus history features computed from the log alone, each from the user's
*matured* (``ts_i + label_delay_s <= t``) earlier instances in the *same context key*
(``k = 2 * device + evening``): the mean of the last n labels, and time-decayed residuals
``sum (y_i - p0_i) exp(-dt / tau) / (1 + sum p0_i (1 - p0_i) exp(-dt / tau))`` (a near-ideal
estimate of the drift given the labels; ``p0`` the true no-drift probability), over the user's last
``max_len`` instances. ``bayes`` - ``no_drift`` is the drift's share of the Bayes AUC; the
feature rows show how much of it history can give back at this size.

``transfer`` does the same for domain 1 of the two-domain generator (one log per
``--correlations`` value) with the decayed residuals computed from the user's matured same-key
instances of *domain 0* (the other domain's history; every matured earlier row, no ``max_len``
window: the decay makes old rows negligible), beside those of domain 1's own history: how much
of the target's drift the other domain's history can give back, against the correlation.

``probe`` fits linear and small-MLP classifiers from the tokens of an instance to its context key
(8 classes; SIF codes one-hot encoded) on the first 80% of the log by ts and reports accuracy on
the last 10% (chance: the most frequent key).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from iat_torchrec.benchmark import benchmark_results
from iat_torchrec.data import synthetic as S
from iat_torchrec.data.synthetic import _auc as auc
from iat_torchrec.tokens.store import TokenStore


def context_key(device: np.ndarray, hour: np.ndarray) -> np.ndarray:
    """The generator's context key from the logged device and (local) hour."""
    return 2 * device.astype(np.int64) + ((hour >= 18) | (hour < 6)).astype(np.int64)


def _fit_auc(cols: List[np.ndarray], y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    x = np.stack(cols, 1)
    x = torch.tensor(np.where(np.isnan(x), 0.0, x), dtype=torch.float32)
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    yt = torch.tensor(y, dtype=torch.float32)
    ti = torch.from_numpy(np.flatnonzero(train))
    m = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(m.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x[ti]).squeeze(-1), yt[ti])
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        s = m(x).squeeze(-1).numpy()
    return auc(y[test], s[test])


def signal(cfg: S.SyntheticConfig, max_len: int = 50, train_quantile: float = 0.8,
           test_quantile: float = 0.9) -> Dict[str, object]:
    d = _log_with_truth(cfg)
    ts, user, key, logit, no_drift = (d[k] for k in ("ts", "user", "key", "logit", "no_drift"))
    y = d["click"].astype(np.float64)
    n = y.size
    p0 = 1.0 / (1.0 + np.exp(-no_drift))
    # Position of each row in its user's time order (the history window is the last max_len).
    o = np.lexsort((np.arange(n), ts, user))
    first = np.r_[True, user[o][1:] != user[o][:-1]]
    urank = np.empty(n, np.int64)
    urank[o] = np.arange(n) - np.maximum.accumulate(np.where(first, np.arange(n), 0))
    # (user, key) groups in time order; matured earlier rows of a group form a prefix.
    g = user.astype(np.int64) * 8 + key
    o2 = np.lexsort((np.arange(n), ts, g))
    gs, t2, r2 = g[o2], ts[o2] - ts.min(), urank[o2]
    start = np.maximum.accumulate(np.where(np.r_[True, gs[1:] != gs[:-1]], np.arange(n), 0))
    span = float(t2.max() + cfg.label_delay_s + 1)
    comp_t = gs * span + t2
    end = np.searchsorted(comp_t, comp_t - cfg.label_delay_s, side="right")
    comp_r = gs * float(n + max_len + 1) + r2
    lo = np.maximum(np.searchsorted(comp_r, comp_r - max_len, side="left"), start)
    feats: Dict[str, np.ndarray] = {}
    cs = np.r_[0.0, np.cumsum(y[o2])]
    for m in (5, 10):
        a = np.maximum(np.maximum(end - m, start), lo)
        feats[f"mean{m}"] = np.where(end > a, (cs[end] - cs[a]) / np.maximum(end - a, 1), np.nan)
    res, w, days = (y - p0)[o2], (p0 * (1 - p0))[o2], t2 / 86400.0
    for tau in (1.0, 3.0, 7.0):
        e = np.exp((days - days.max()) / tau)
        cr, cw = np.r_[0.0, np.cumsum(res * e)], np.r_[0.0, np.cumsum(w * e)]
        valid = end > lo
        r_sum = np.where(valid, (cr[end] - cr[lo]) / e, 0.0)
        w_sum = np.where(valid, np.maximum((cw[end] - cw[lo]) / e, 0.0), 0.0)
        feats[f"res{tau:g}"], feats[f"w{tau:g}"] = r_sum / (w_sum + 1.0), np.log1p(w_sum)
    inv = np.empty(n, np.int64)
    inv[o2] = np.arange(n)
    feats = {k: v[inv] for k, v in feats.items()}
    same_in_window = np.maximum(end - lo, 0)[inv]
    c1, c2 = np.quantile(ts, [train_quantile, test_quantile])
    train, test = ts < c1, ts >= c2
    miss = np.isnan(feats["mean5"]).astype(float)
    ideal = [feats[f"{p}{t:g}"] for t in (1.0, 3.0, 7.0) for p in ("res", "w")]
    return {
        "instances_per_user": round(n / cfg.num_users, 1),
        "test_rows": int(test.sum()),
        "auc_bayes": round(auc(y[test], logit[test]), 4),
        "auc_no_drift": round(auc(y[test], no_drift[test]), 4),
        "same_key_matured_in_window": round(float(same_in_window[test].mean()), 2),
        "auc_no_drift+mean5": round(_fit_auc([no_drift, feats["mean5"], miss], y, train, test), 4),
        "auc_no_drift+mean10": round(_fit_auc([no_drift, feats["mean10"], miss], y, train, test),
                                     4),
        "auc_no_drift+decayed_residuals": round(_fit_auc([no_drift, *ideal], y, train, test), 4),
    }


def _log_with_truth(cfg: S.SyntheticConfig) -> Dict[str, np.ndarray]:
    """The columns the signals read, and the true logit without the drift."""
    cols: Dict[str, list] = {k: [] for k in ("ts", "user", "device", "hour", "click", "logit",
                                             "drift")}
    for table, truth in S.iter_tables_with_truth(cfg):
        for k in ("ts", "user", "device", "hour", "click"):
            cols[k].append(table[k].to_numpy())
        cols["logit"].append(truth["logit"])
        cols["drift"].append(truth["user_context_drift"])
    out = {k: np.concatenate(v) for k, v in cols.items()}
    out["no_drift"] = out["logit"] - out["drift"]
    out["key"] = context_key(out["device"], out["hour"])
    return out


def cross_residuals(hist: Dict[str, np.ndarray], query: Dict[str, np.ndarray], delay: int,
                    taus=(1.0, 3.0, 7.0)) -> List[np.ndarray]:
    """Per query row: the decayed residuals ``res`` and log weights ``w`` (as in ``signal``)
    of the same user's matured (``ts_i + delay <= t``) same-key rows of ``hist``, another log."""
    y = hist["click"].astype(np.float64)
    p0 = 1.0 / (1.0 + np.exp(-hist["no_drift"]))
    g = hist["user"].astype(np.int64) * 8 + hist["key"]
    t0 = min(hist["ts"].min(), query["ts"].min())
    o = np.lexsort((hist["ts"], g))
    span = float(max(hist["ts"].max(), query["ts"].max()) - t0 + delay + 2)
    comp = g[o] * span + (hist["ts"][o] - t0)
    gq = query["user"].astype(np.int64) * 8 + query["key"]
    start = np.searchsorted(comp, gq * span, side="left")
    end = np.searchsorted(comp, gq * span + (query["ts"] - t0 - delay), side="right")
    days_h, days_q = (hist["ts"][o] - t0) / 86400.0, (query["ts"] - t0) / 86400.0
    top = max(days_h.max(), days_q.max())
    out = []
    for tau in taus:
        e = np.exp((days_h - top) / tau)
        cr = np.r_[0.0, np.cumsum((y - p0)[o] * e)]
        cw = np.r_[0.0, np.cumsum((p0 * (1 - p0))[o] * e)]
        eq = np.exp((days_q - top) / tau)
        r_sum, w_sum = (cr[end] - cr[start]) / eq, np.maximum((cw[end] - cw[start]) / eq, 0.0)
        out += [r_sum / (w_sum + 1.0), np.log1p(w_sum)]
    return out


def transfer(cfg: S.SyntheticConfig, correlations: List[float], train_quantile: float = 0.8,
             test_quantile: float = 0.9) -> Dict[str, object]:
    """Per correlation: domain 1's test AUC of its no-drift logit alone, plus the decayed
    residuals of its own history, of domain 0's, and of both."""
    source = _log_with_truth(cfg)
    out: Dict[str, object] = {}
    for rho in correlations:
        target = _log_with_truth(dataclasses.replace(cfg, domain=1, domain_correlation=rho))
        y = target["click"].astype(np.float64)
        c1, c2 = np.quantile(target["ts"], [train_quantile, test_quantile])
        train, test = target["ts"] < c1, target["ts"] >= c2
        own = cross_residuals(target, target, cfg.label_delay_s)
        other = cross_residuals(source, target, cfg.label_delay_s)
        base = [target["no_drift"]]
        out[f"rho{rho:g}"] = {
            "test_rows": int(test.sum()),
            "auc_bayes": round(auc(y[test], target["logit"][test]), 4),
            "auc_no_drift": round(auc(y[test], target["no_drift"][test]), 4),
            "auc_no_drift+own_history": round(_fit_auc(base + own, y, train, test), 4),
            "auc_no_drift+other_domain_history": round(_fit_auc(base + other, y, train, test),
                                                       4),
            "auc_no_drift+both": round(_fit_auc(base + own + other, y, train, test), 4),
        }
    return out


def _tokens(store: TokenStore, n: int) -> np.ndarray:
    rows = store.rows_of(np.arange(n))
    if store.kind == "iat":
        return np.asarray(store.tokens_fp32(rows), dtype=np.float32).reshape(n, -1)
    codes = np.asarray(store.tokens(rows)).reshape(n, -1).astype(np.int64)
    width = int(codes.max()) + 1
    onehot = np.zeros((n, codes.shape[1] * width), dtype=np.float32)
    for j in range(codes.shape[1]):
        onehot[np.arange(n), j * width + codes[:, j]] = 1.0
    return onehot


def probe(log: Path, stores: List[Path], steps: int = 1500, seed: int = 0) -> Dict[str, object]:
    files = sorted(Path(log).glob("*.parquet"))
    t = pa.concat_tables([pq.read_table(f, columns=["instance_id", "ts", "device", "hour"])
                          for f in files])
    iid = t["instance_id"].to_numpy()
    if not np.array_equal(iid, np.arange(iid.size)):
        raise ValueError(f"{log}: expected instance ids 0..n-1 in row order (a synthetic log)")
    ts, key = t["ts"].to_numpy(), context_key(t["device"].to_numpy(), t["hour"].to_numpy())
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(ts < np.quantile(ts, 0.8))
    train = rng.choice(train, min(200_000, train.size), replace=False)
    test = np.flatnonzero(ts >= np.quantile(ts, 0.9))[:50_000]
    out: Dict[str, object] = {"chance_key_acc": round(
        float(np.bincount(key[test]).max() / test.size), 3)}
    torch.manual_seed(seed)
    for path in stores:
        x = torch.from_numpy(_tokens(TokenStore.open(path), iid.size))
        x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
        target = torch.from_numpy(key)
        accs = {}
        for kind in ("linear", "mlp"):
            m = (torch.nn.Linear(x.shape[1], 8) if kind == "linear" else torch.nn.Sequential(
                torch.nn.Linear(x.shape[1], 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)))
            opt = torch.optim.Adam(m.parameters(), lr=3e-3)
            for _ in range(steps):
                ix = torch.from_numpy(train[rng.integers(0, train.size, 2048)])
                loss = torch.nn.functional.cross_entropy(m(x[ix]), target[ix])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                accs[kind] = round(float((m(x[test]).argmax(1).numpy() == key[test]).mean()), 3)
        out[str(path)] = {"key_acc": accs}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("signal", help="recoverable history signal of a synthetic config")
    for f in ("num_instances", "num_users", "num_items", "seed", "label_delay_s"):
        s.add_argument(f"--{f}", type=int, default=getattr(S.SyntheticConfig, f))
    for f in ("context_strength", "user_zipf_exponent"):
        s.add_argument(f"--{f}", type=float, default=getattr(S.SyntheticConfig, f))
    s.add_argument("--max_len", type=int, default=50)
    s.add_argument("--out", default="", help="JSON file for the result (with date and machine)")
    tr = sub.add_parser("transfer", help="how much of domain 1's drift domain 0's history "
                                         "reveals, per correlation")
    for f in ("num_instances", "num_users", "num_items", "seed", "label_delay_s"):
        tr.add_argument(f"--{f}", type=int, default=getattr(S.SyntheticConfig, f))
    tr.add_argument("--correlations", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    tr.add_argument("--out", default="", help="JSON file for the result (with date and machine)")
    q = sub.add_parser("probe", help="do token stores carry the context key?")
    q.add_argument("--log", required=True, help="the synthetic instance log the stores cover")
    q.add_argument("--stores", nargs="+", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if a.cmd == "signal":
        kw = {f: getattr(a, f) for f in ("num_instances", "num_users", "num_items", "seed",
                                         "label_delay_s", "context_strength",
                                         "user_zipf_exponent")}
        measured = signal(S.SyntheticConfig(**kw), max_len=a.max_len)
    elif a.cmd == "transfer":
        kw = {f: getattr(a, f) for f in ("num_instances", "num_users", "num_items", "seed",
                                         "label_delay_s")}
        measured = transfer(S.SyntheticConfig(**kw), a.correlations)
    if a.cmd in ("signal", "transfer"):
        result = {"config": kw, **measured}
        if a.out:
            benchmark_results(S.SyntheticConfig(**kw), a.out, command=" ".join(
                ["python apps/diagnose_history.py", *(argv if argv is not None else
                                                      sys.argv[1:])]), **measured)
    else:
        result = probe(Path(a.log), [Path(x) for x in a.stores])
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
