"""apps/compare.py end to end on tiny synthetic data: every variant x 2 seeds, the CSV / Markdown
/ PNG / JSON outputs, the zero gain of the baseline, and a re-run that does no work."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.distributed as dist

from iat_torchrec.config import parse_config
from iat_torchrec.stages import compare as compare_stage
from iat_torchrec.stages.compare import BASELINE, VARIANTS, CompareConfig, run_compare

TINY = ["--datasets", "synthetic", "--seeds", "0", "1", "--num_instances", "3000",
        "--num_users", "150", "--num_items", "100", "--num_sparse_fields", "8",
        "--source_epochs", "1", "--tokenizer_epochs", "1", "--epochs", "1",
        "--batch_size", "256", "--max_len", "16", "--item_history_len", "8",
        "--token_dim", "8", "--source_dense_layers", "16", "8", "--decompress_layers", "16",
        "--cross_rank", "4", "--sit_heads", "2", "--sit_context", "4", "--field_dim", "4",
        "--d0", "8", "--levels", "2", "--codebook_size", "16", "--embedding_dim", "8",
        "--dense_arch_layers", "16", "--over_arch_layers", "16", "8",
        "--din_attention_layers", "16", "--num_blocks", "1", "--num_heads", "2",
        "--iat_adapt_dim", "8", "--iat_side_dim", "8", "--iat_layers", "1",
        "--iat_heads", "2"]


@pytest.fixture(autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the test machine is shared
    yield
    torch.set_num_threads(threads)
    if dist.is_initialized():
        dist.destroy_process_group()


def test_compare_runs_every_variant_and_resumes(tmp_path, monkeypatch, capsys):
    args = TINY + ["--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out")]
    summary = run_compare(parse_config(CompareConfig, args))
    out = tmp_path / "out"
    runs = summary["datasets"]["synthetic"]["runs"]
    assert list(runs) == list(VARIANTS)
    for variant, seeds in runs.items():
        assert [r["seed"] for r in seeds] == [0, 1], variant
        for r in seeds:
            assert 0.0 <= r["test"]["auc"] <= 1.0 and r["test"]["logloss"] > 0, (variant, r)
    # CSV
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == list(VARIANTS)
    base = next(r for r in rows if r["variant"] == BASELINE)
    assert float(base["auc_gain_pct"]) == 0.0 and float(base["gauc_gain_pct"]) == 0.0
    assert all(int(r["seeds"]) == 2 for r in rows)
    # Markdown
    md = (out / "results.md").read_text()
    for variant in VARIANTS:
        assert f"| {variant} |" in md
    base_line = next(line for line in md.splitlines() if line.startswith(f"| {BASELINE} |"))
    assert base_line.rstrip().endswith("+0.00% | +0.00% |")
    assert md.strip() in capsys.readouterr().out
    # PNG and JSON
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["datasets"]["synthetic"]["table"][0]["variant"] == "DLRM"
    # A re-run does no training work and gives the same table.
    def no_work(*a, **k):
        raise AssertionError("a re-run repeated work")
    for module, name in ((compare_stage.train_stage, "run_train"),
                         (compare_stage.compress_stage, "run_compress"),
                         (compare_stage.tokenize_stage, "run_tokenize"),
                         (compare_stage.assembly_stage, "assemble_history")):
        monkeypatch.setattr(module, name, no_work)
    again = run_compare(parse_config(CompareConfig, args))
    assert again["datasets"]["synthetic"]["table"] == summary["datasets"]["synthetic"]["table"]


def test_resume_under_other_settings_is_refused(tmp_path):
    folder = tmp_path / "work" / "synthetic"
    cfg = parse_config(CompareConfig, TINY)
    compare_stage.check_work_config(cfg, folder)
    compare_stage.check_work_config(parse_config(CompareConfig, TINY + ["--seeds", "5"]), folder)
    with pytest.raises(ValueError, match="other settings.*max_len"):
        compare_stage.check_work_config(parse_config(CompareConfig, TINY + ["--max_len", "8"]),
                                        folder)
