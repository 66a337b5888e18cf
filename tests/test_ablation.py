"""The ablation: arms grouped into runs, each claim's gap and verdict, the written table."""

import json
from pathlib import Path

import pytest

from iat_torchrec.pipeline import ablation
from iat_torchrec.pipeline.ablation import (CLAIMS, AblationConfig, Arm, Claim, arm_dir, compare,
                                            plan_arms, run_ablation)
from iat_torchrec.pipeline.plan import VARIANTS


def test_every_claim_names_known_variants_and_arms_share_runs():
    for c in CLAIMS:
        assert c.measured.variant in VARIANTS and c.reference.variant in VARIANTS
    arms = plan_arms(CLAIMS)
    assert arms[()] == []  # the base experiment, every variant
    assert arms[("--assemble.max_len", "16")] == ["SIF", "DLRM+BST"]  # one run for both
    assert len(arms) == len({flags for c in CLAIMS for flags in
                             (c.measured.flags, c.reference.flags)})


def _row(auc, std, gauc=0.65):
    return {"auc_mean": auc, "auc_std": std, "gauc_mean": gauc, "gauc_std": std, "seeds": 3}


@pytest.mark.parametrize("auc, verdict", [(0.7100, "gain"), (0.7030, "within spread"),
                                          (0.6900, "loss")])
def test_a_gap_counts_only_beyond_twice_the_larger_std(auc, verdict):
    claim = Claim("x", "x over y", "-", Arm("SIF", ("--f", "1")), Arm("DLRM+BST"))
    rows = {("--f", "1"): {"SIF": _row(auc, 0.002)}, (): {"DLRM+BST": _row(0.7000, 0.0015)}}
    got = compare(claim, rows)
    assert got["auc_gap"] == pytest.approx(auc - 0.7)
    assert got["auc_gap_pct"] == pytest.approx(100 * (auc - 0.7) / 0.7)
    assert got["auc_two_std"] == pytest.approx(0.004)
    assert got["verdict"] == verdict


def test_run_ablation_runs_each_arm_once_and_writes_the_table(tmp_path, monkeypatch):
    runs = []

    def fake_pipeline(cfg, log=print):
        runs.append((cfg.run_dir, list(cfg.variants), cfg.compress.two_pass))
        table = [dict(_row(0.70 + 0.01 * cfg.compress.two_pass, 0.001), variant=v)
                 for v in cfg.variants]
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(
            {"datasets": {"synthetic": {"table": table}}}))

    monkeypatch.setattr(ablation, "run_pipeline", fake_pipeline)
    cfg = AblationConfig(claims=["two_pass", "user_order"], base_run_dir=str(tmp_path / "base"),
                         run_root=str(tmp_path / "abl"))
    rows = run_ablation(cfg, log=lambda s: None)
    assert len(runs) == 2  # the base arm (both claims' references, user_order) and two_pass
    assert runs[0][0] == str(tmp_path / "base") and len(runs[0][1]) == len(VARIANTS)
    assert runs[1][1] == ["IAT user-order"] and runs[1][2] is True
    assert runs[1][0] == str(arm_dir(cfg, ("--compress.two_pass", "true")))
    assert [r["claim"] for r in rows] == ["user_order", "two_pass"]
    assert rows[1]["verdict"] == "gain" and rows[0]["verdict"] == "within spread"
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["base_config"]


def test_unknown_claims_are_refused():
    with pytest.raises(ValueError, match="unknown or no claims"):
        AblationConfig(claims=["nope"])
