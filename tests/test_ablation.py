"""The ablation: arms grouped into runs, each claim's gap and verdict, the written table."""

import json
from pathlib import Path

import pytest

from iat_torchrec.config import parse_config
from iat_torchrec.pipeline import ablation
from iat_torchrec.pipeline.ablation import (BLIND, CLAIMS, AblationConfig, Arm, Claim, arm_dir,
                                            claim_length, compare, plan_arms, plot_lengths,
                                            run_ablation)
from iat_torchrec.pipeline.plan import VARIANTS, PipelineConfig, pipeline_flag_exclusions


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
        runs.append((cfg.run_dir, list(cfg.variants), cfg.compress.model.sit_labels))
        table = [dict(_row(0.70 + 0.01 * cfg.compress.model.sit_labels, 0.001), variant=v)
                 for v in cfg.variants]
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(
            {"datasets": {"synthetic": {"table": table}}}))

    monkeypatch.setattr(ablation, "run_pipeline", fake_pipeline)
    cfg = AblationConfig(claims=["sit_labels", "user_order"], base_run_dir=str(tmp_path / "base"),
                         run_root=str(tmp_path / "abl"))
    rows = run_ablation(cfg, log=lambda s: None)
    assert len(runs) == 2  # the base arm (both claims' references, user_order) and sit_labels
    assert runs[0][0] == str(tmp_path / "base") and runs[0][1] == PipelineConfig().variants
    assert runs[1][1] == ["IAT user-order"] and runs[1][2] is True
    assert runs[1][0] == str(arm_dir(cfg, ("--compress.model.sit_labels", "true")))
    assert [r["claim"] for r in rows] == ["user_order", "sit_labels"]
    assert rows[1]["verdict"] == "gain" and rows[0]["verdict"] == "within spread"
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["base_config"]


def test_unknown_claims_are_refused():
    with pytest.raises(ValueError, match="unknown or no claims"):
        AblationConfig(claims=["nope"])


NEW_CLAIMS = {
    "post_sit": (("--compress.export_token", "post_sit"), "IAT user-order"),
    "no_side_labels": (("--downstream.model.iat.side_labels", "false"), "IAT user-order"),
    "iat_din": (("--downstream.model.iat.encoder", "din"), "IAT user-order"),
    "sif_flat": (("--downstream.model.mixer.structure", "flat"), "SIF"),
    "sif_pooled": (("--downstream.model.mixer.structure", "pooled"), "SIF"),
    "iat_side_init": (("--downstream.model.iat.side_init_std", "1.0"), "IAT user-order"),
    "sif_side_init": (("--downstream.model.mixer.side_init_std", "1.0"), "SIF"),
    "token_width32": (("--compress.model.token_dim", "32"), "IAT user-order"),
    "token_int8": (("--compress.token_dtype", "int8"), "IAT user-order"),
}


@pytest.mark.parametrize("name", sorted(NEW_CLAIMS))
def test_switch_claims_measure_one_flag_against_the_base_arm(name):
    flags, variant = NEW_CLAIMS[name]
    claim = next(c for c in CLAIMS if c.name == name)
    assert claim.measured == Arm(variant, flags) and claim.reference == Arm(variant)
    assert plan_arms([claim]) == {flags: [variant], (): []}


def test_the_blind_claims_share_one_arm():
    claims = [c for c in CLAIMS if c.name in ("iat_blind", "sif_blind")]
    assert plan_arms(claims) == {BLIND: ["IAT user-order", "SIF"], (): []}


def test_l256_runs_sif_and_bst_once_with_the_whole_history_for_bst():
    claim = next(c for c in CLAIMS if c.name == "sif_l256")
    flags = ("--assemble.max_len", "256", "--downstream.model.item_history_len", "256")
    assert plan_arms([claim]) == {flags: ["SIF", "DLRM+BST"]}
    assert [claim_length(c, 128) for c in CLAIMS if c.by_length] == [16, 64, 128, 256]
    assert claim_length(CLAIMS[0], 128) is None


def test_every_claims_flags_are_pipeline_settings():
    """Parsed as run_ablation parses them, each flag lands on its declared setting."""
    settings = {
        "--compress.export_token": lambda c: c.compress.export_token,
        "--downstream.model.iat.side_labels": lambda c: c.downstream.model.iat.side_labels,
        "--downstream.model.iat.encoder": lambda c: c.downstream.model.iat.encoder,
        "--downstream.model.mixer.structure": lambda c: c.downstream.model.mixer.structure,
        "--assemble.max_len": lambda c: c.assemble.max_len,
        "--downstream.model.item_history_len": lambda c: c.downstream.model.item_history_len,
        "--downstream.model.iat.history_sees_query":
            lambda c: c.downstream.model.iat.history_sees_query,
        "--downstream.model.mixer.history_sees_target":
            lambda c: c.downstream.model.mixer.history_sees_target,
        "--downstream.model.iat.side_init_std": lambda c: c.downstream.model.iat.side_init_std,
        "--downstream.model.mixer.side_init_std":
            lambda c: c.downstream.model.mixer.side_init_std,
        "--compress.model.token_dim": lambda c: c.compress.model.token_dim,
        "--compress.token_dtype": lambda c: c.compress.token_dtype,
    }
    base = parse_config(PipelineConfig, ["--config", "experiments/main.json"],
                        exclude=pipeline_flag_exclusions())
    assert (base.compress.export_token, base.downstream.model.iat.side_labels,
            base.downstream.model.iat.encoder, base.downstream.model.mixer.structure) == \
        ("pre_sit", True, "transformer", "mixer")
    for flags, variants in plan_arms(CLAIMS).items():
        argv = ["--config", "experiments/main.json", *flags, "--run_dir", "x"]
        if variants:
            argv += ["--variants", *variants]
        cfg = parse_config(PipelineConfig, argv, exclude=pipeline_flag_exclusions())
        for flag, value in zip(flags[::2], flags[1::2]):
            if flag in settings:
                got = settings[flag](cfg)
                assert str(got).lower() == value, (flag, got)


def _length_row(length, sif, bst, std=0.002):
    gap = sif - bst
    return {"claim": f"sif_l{length}", "length": length, "auc": [sif, bst],
            "auc_std": [std, std], "auc_gap_pct": 100 * gap / bst,
            "gauc_gap_pct": 50 * gap / bst, "measured": {"variant": "SIF", "flags": []},
            "reference": {"variant": "DLRM+BST", "flags": []}}


def test_the_plot_over_l_is_written_from_summary_rows(tmp_path):
    rows = [_length_row(256, 0.74, 0.72), _length_row(16, 0.71, 0.705),
            _length_row(64, 0.725, 0.71), {"claim": "two_pass"}]
    out = tmp_path / "ablation.png"
    assert plot_lengths(rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ablation.png"]  # no temporary left
    assert not plot_lengths([{"claim": "two_pass"}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_run_ablation_writes_the_plot_beside_the_json(tmp_path, monkeypatch):
    def fake_pipeline(cfg, log=print):
        table = [dict(_row(0.70 + (0.01 if v == "SIF" else 0.0), 0.001), variant=v)
                 for v in cfg.variants]
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(
            {"datasets": {"synthetic": {"table": table}}}))

    monkeypatch.setattr(ablation, "run_pipeline", fake_pipeline)
    out = tmp_path / "res" / "abl.json"
    cfg = AblationConfig(claims=["sif_l16", "sif_l256", "sif_base_l", "sif_flat"],
                         base_run_dir=str(tmp_path / "base"), run_root=str(tmp_path / "abl"),
                         out=str(out))
    rows = run_ablation(cfg, log=lambda s: None)
    assert [r.get("length") for r in rows] == [16, 128, 256, None]
    assert (tmp_path / "res" / "abl.png").stat().st_size > 0
    saved = json.loads(out.read_text())
    assert [r.get("length") for r in saved["rows"]] == [16, 128, 256, None]

def test_the_app_parses_its_flags():
    cfg = parse_config(AblationConfig, ["--base_config", "experiments/movielens_p1.json",
                                        "--claims", "two_pass", "sif_l16", "--out", "a.json"])
    assert (cfg.base_config, cfg.claims, cfg.out) == (
        "experiments/movielens_p1.json", ["two_pass", "sif_l16"], "a.json")
