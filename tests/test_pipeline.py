"""The pipeline: its plan, the TorchX runner (skip, re-make, failure), and apps/pipeline.py end
to end on a tiny synthetic log, including a run killed during a stage and re-run."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pytest
from torchx import specs

from conftest import REPO_ROOT, tiny_columns, tiny_spec
from iat_torchrec.data.log import write_log
from iat_torchrec.config import parse_config, to_dict
from iat_torchrec.pipeline.plan import (TRANSFER_VARIANTS, VARIANTS, PipelineConfig, Step,
                                        build_plan)
from iat_torchrec.stages.evaluate import (CompareConfig, EvaluateConfig, ResultsError,
                                          run_compare, run_evaluate)
from iat_torchrec.pipeline.runner import PipelineRunner, StageFailed, fingerprints, run_pipeline
from iat_torchrec.train.loop import prediction_metrics
from iat_torchrec.train.predictions import read_predictions, write_predictions

# The main job's settings, at a tiny size.
TINY = ["--config", str(REPO_ROOT / "experiments" / "main.json"), "--seeds", "0",
        "--data.synthetic.num_instances", "3000", "--data.synthetic.num_users", "150",
        "--data.synthetic.num_items", "100", "--data.synthetic.num_sparse_fields", "8",
        "--compress.train.batch_size", "256", "--tokenize.train.batch_size", "256",
        "--downstream.train.batch_size", "256", "--assemble.max_len", "16",
        "--downstream.model.item_history_len", "8", "--compress.model.token_dim", "8",
        "--compress.model.dense_arch_layers", "16", "8", "--compress.model.decompress_layers",
        "16", "--compress.model.cross_rank", "4", "--compress.model.sit_heads", "2",
        "--compress.model.sit_context", "4", "--tokenize.model.field_dim", "4",
        "--tokenize.model.d0", "8", "--downstream.model.mixer.d0", "8",
        "--tokenize.model.levels", "2", "--tokenize.model.codebook_size", "16",
        "--downstream.model.embedding_dim", "8", "--downstream.model.dense_arch_layers", "16",
        "--downstream.model.over_arch_layers", "16", "8",
        "--downstream.model.din.attention_layers", "16", "--downstream.model.mixer.num_blocks",
        "1", "--downstream.model.iat.adapt_dim", "8", "--downstream.model.iat.side_dim", "8",
        "--downstream.model.iat.num_layers", "1", "--downstream.model.iat.num_heads", "2",
        "--nproc", "1"]
# One variant per kind of stage: no history, the user-order IAT store, SIF codes over it.
E2E_VARIANTS = ["--variants", "DLRM", "IAT user-order", "SIF over IAT tokens"]


# ---------------------------------------------------------------------------- the plan
def test_plan_has_every_stage_once_in_input_order():
    steps = build_plan(parse_config(PipelineConfig, TINY + ["--seeds", "0", "1"]))
    names = [s.name for s in steps]
    assert len(names) == len(set(names))
    seen = set()
    for s in steps:
        assert set(s.after) <= seen, s.name  # inputs are planned first
        seen.add(s.name)
    per_seed = [n for n in names if n.startswith("synthetic/seed0/")]
    assert sum(n.endswith(("/iat_temporal", "/iat_user", "/sif")) for n in per_seed) == 3
    assert sum("/hist_" in n for n in per_seed) == 9  # three stores x three splits
    default = len(VARIANTS) - len(TRANSFER_VARIANTS)  # those need --transfer_data
    assert sum("/train_" in n for n in per_seed) == default
    assert names[0] == "synthetic/data" and names[-1] == "evaluate"
    assert len(steps[-1].after) == 2 * default
    train = next(s for s in steps if s.name == "synthetic/seed1/train_SIF")
    assert train.args["model.history_source"] == "sif_codes"
    assert train.args["model.interaction"] == "mixer"
    assert train.args["train.seed"] == 1 and train.args["j"] == "1x1"
    dcn = next(s for s in steps if s.name == "synthetic/seed0/train_DCNv2")
    assert dcn.args["model.history_source"] == "pooled"
    assert dcn.args["model.interaction"] == "dcn"  # its own, not baseline_interaction


def test_plan_holds_only_what_the_variants_need():
    steps = build_plan(parse_config(PipelineConfig, TINY + ["--variants", "DLRM"]))
    assert [s.component for s in steps] == ["prepare_data", "train", "evaluate"]
    steps = build_plan(parse_config(PipelineConfig, TINY + ["--variants", "SIF"]))
    assert [s.name.rsplit("/", 1)[-1] for s in steps if s.component != "assemble"] == [
        "data", "sif", "train_SIF", "evaluate"]


def test_transfer_plan_reads_the_other_domains_store():
    """The transfer variants: the other domain's data and IAT user-order store once per seed,
    the target splits' histories assembled on it (unknown users allowed), the item branch of
    "DLRM+BST + other-domain IAT" on the target's own store."""
    steps = build_plan(parse_config(PipelineConfig, TINY + [
        "--variants", "DLRM+BST", *TRANSFER_VARIANTS, "--data.synthetic.domain", "1",
        "--transfer_data.synthetic.num_instances", "3000"]))
    by_name = {s.name: s for s in steps}
    assert [n for n in by_name if n.endswith("/data")] == ["synthetic-domain1/data",
                                                          "synthetic/data"]
    source = by_name["synthetic/seed0/iat_user"]
    hist = by_name["synthetic-domain1/seed0/hist_transfer_iat_user_test"]
    assert source.args["scheme"] == "user"
    assert source.args["train_log"] == by_name["synthetic/data"].outputs[0]
    assert hist.args["target_log"] == by_name["synthetic-domain1/data"].outputs[2]
    assert hist.args["store"] == source.args["store"] and hist.args["allow_unknown_users"]
    both = by_name["synthetic-domain1/seed0/train_DLRM_BST___other-domain_IAT"]
    assert both.args["iat_store"] == source.args["store"]
    assert both.args["item_store"].endswith("synthetic-domain1/seed0/iat_temporal")
    assert both.args["test_item_history"].endswith("hist_iat_temporal_test")
    assert both.args["model.iat_item_branch"] == "bst"
    alone = by_name["synthetic-domain1/seed0/train_Other-domain_IAT"]
    assert alone.args["model.iat_item_branch"] == "none" and not alone.args["item_store"]
    own = by_name["synthetic-domain1/seed0/train_IAT_user-order___other-domain_IAT"]
    assert own.args["iat_store"] == source.args["store"] and own.args["model.item_store_iat"]
    assert own.args["item_store"].endswith("synthetic-domain1/seed0/iat_user")
    assert own.args["test_item_history"].endswith("hist_iat_user_test")
    assert not both.args["model.item_store_iat"]
    with pytest.raises(ValueError, match="--transfer_data is the dataset 'synthetic'"):
        build_plan(parse_config(PipelineConfig, TINY + ["--variants", *TRANSFER_VARIANTS]))


def test_fingerprints_follow_inputs_not_resources():
    base = build_plan(parse_config(PipelineConfig, TINY))
    fp = fingerprints(base)
    more_cpus = fingerprints(build_plan(parse_config(PipelineConfig, TINY + ["--cpu", "4"])))
    assert more_cpus == fp
    other = fingerprints(build_plan(parse_config(PipelineConfig, TINY + ["--compress.model.token_dim", "12"])))
    changed = {n for n in fp if fp[n] != other[n]}
    # the IAT stores change, and everything downstream of them, nothing else
    assert "synthetic/seed0/iat_user" in changed and "synthetic/data" not in changed
    assert "synthetic/seed0/sif" not in changed and "synthetic/seed0/train_DLRM" not in changed
    assert {"synthetic/seed0/hist_iat_user_train", "synthetic/seed0/train_IAT_user-order",
            "evaluate"} <= changed


def test_bad_pipeline_config_is_refused():
    with pytest.raises(ValueError, match="unknown variants"):
        build_plan(parse_config(PipelineConfig, TINY + ["--variants", "GRU4Rec"]))
    with pytest.raises(ValueError, match="key=value"):
        build_plan(parse_config(PipelineConfig, TINY + ["--scheduler_args", "partition"]))


# ---------------------------------------------------------------------------- the runner
def _python_job(code: str) -> specs.AppDef:
    return specs.AppDef(name="job", roles=[specs.Role(
        name="job", image=str(REPO_ROOT), entrypoint=sys.executable, args=["-c", code])])


def _touch(path: str, fail: bool = False, note: int = 0) -> specs.AppDef:
    return _python_job(f"import pathlib, sys; print('making {Path(path).name}'); "
                       + ("sys.exit('it broke: exit 3')" if fail else
                          f"pathlib.Path({path!r}).write_text(open({path!r} + '.in').read() "
                          f"if pathlib.Path({path!r} + '.in').exists() else 'x')"))


def test_runner_skips_done_steps_remakes_changed_ones_and_stops_at_a_failure(tmp_path):
    work = tmp_path / "run" / "work"
    work.mkdir(parents=True)
    a, b = str(work / "a"), str(work / "b")
    steps = [Step("a", "touch", {"path": a}, [a]),
             Step("b", "touch", {"path": b}, [b], after=["a"])]
    lines: List[str] = []
    runner = PipelineRunner(str(tmp_path / "run"), {"touch": _touch}, log=lines.append)
    ran = runner.run(steps)
    assert set(ran) == {"a", "b"} and Path(b).read_text() == "x"
    assert "making b" in (tmp_path / "run" / "logs" / "b.log").read_text()
    assert runner.record(steps[1])["state"] == "done"
    # Nothing changed: nothing runs.
    lines.clear()
    assert runner.run(steps) == {} and all(line.startswith("skip") for line in lines)
    # An output removed by hand is made again, and only that.
    os.remove(b)
    assert set(runner.run(steps)) == {"b"}
    # A changed step is re-made, and so is every step after it.
    steps[0] = Step("a", "touch", {"path": a, "fail": False, "note": 1}, [a])
    assert set(runner.run(steps)) == {"a", "b"}
    # A failing step stops the run with its log; nothing after it runs.
    c = str(work / "c")
    steps = [Step("c", "touch", {"path": c, "fail": True}, [c])] + steps
    steps[1].after = ["c"]
    with pytest.raises(StageFailed, match="(?s)stage c FAILED.*it broke: exit 3") as e:
        runner.run(steps)
    assert e.value.log == tmp_path / "run" / "logs" / "c.log"
    assert runner.record(steps[0])["state"] == "running"
    assert runner.record(steps[1])["state"] == "done"  # untouched: c failed first


@dataclasses.dataclass
class _TouchConfig:
    """A stage config of the fake stage below."""

    path: str = ""
    fail: bool = False


# A stage app running a task file of _TouchConfig tasks (iat_torchrec.stages.tasks).
_TOUCH_TASKS = """
import dataclasses, pathlib, sys
from iat_torchrec.stages.tasks import run_tasks

@dataclasses.dataclass
class C:
    path: str = ""
    fail: bool = False

def run(c):
    print("making", pathlib.Path(c.path).name, flush=True)
    if c.fail:
        sys.exit("it broke: exit 3")
    pathlib.Path(c.path).write_text("x")

run_tasks(C, run, sys.argv[1])
"""


def _touch_tasks(tasks: str = "") -> specs.AppDef:
    app = _python_job(_TOUCH_TASKS)
    app.roles[0].args.append(tasks)
    return app


def test_ready_steps_of_one_kind_run_in_one_launch_with_their_own_records(tmp_path):
    work = tmp_path / "run" / "work"
    work.mkdir(parents=True)
    a, b, c, d = (str(work / n) for n in "abcd")
    steps = [Step("a", "touch", _TouchConfig(a), [a]), Step("b", "touch", _TouchConfig(b), [b]),
             Step("c", "single", {"path": c}, [c]),
             Step("d", "touch", _TouchConfig(d), [d], after=["a"])]
    lines: List[str] = []
    runner = PipelineRunner(str(tmp_path / "run"), {"touch": _touch_tasks, "single": _touch},
                            log=lines.append)
    assert [[s.name for s in g] for g in runner.launch_groups(steps)] == [
        ["a", "b"], ["c"], ["d"]]
    ungrouped = PipelineRunner(str(tmp_path / "run"), {"touch": _touch_tasks}, log=print,
                               group_launches=False)
    assert [len(g) for g in ungrouped.launch_groups(steps)] == [1, 1, 1, 1]
    assert set(runner.run(steps)) == {"a", "b", "c", "d"}
    assert all(Path(p).read_text() == "x" for p in (a, b, c, d))
    logs = tmp_path / "run" / "logs"
    assert "making b" in (logs / "b.log").read_text()
    assert "making a" not in (logs / "b.log").read_text()  # each step's part of the log
    assert "making a" in (logs / "launch__a.log").read_text()
    for step in steps[:2]:
        rec = runner.record(step)
        assert rec["state"] == "done" and rec["seconds"] >= 0 and rec["launch"] == "a"
    assert sum(line.startswith("run    a (1/4) in one launch of 2") for line in lines) == 1
    # A task that fails stops its launch: the tasks before it stay done, it is named.
    os.remove(a)
    os.remove(b)
    steps[1] = Step("b", "touch", _TouchConfig(b, fail=True), [b])
    with pytest.raises(StageFailed, match="(?s)stage b FAILED.*it broke: exit 3") as e:
        runner.run(steps)
    assert e.value.log == logs / "b.log"
    assert runner.record(steps[0])["state"] == "done" and Path(a).exists()
    assert runner.record(steps[1])["state"] == "running"
    # Mended: only b runs again (a and d were kept).
    steps[1] = Step("b", "touch", _TouchConfig(b), [b])
    assert set(runner.run(steps)) == {"b"}


# ---------------------------------------------------------------------------- evaluation
def test_evaluate_names_a_missing_or_broken_results_file(tmp_path):
    log = write_log(pa.table(tiny_columns()), tmp_path / "log", tiny_spec())
    results = tmp_path / "seed0" / "results_DLRM.json"
    index = {"datasets": {"tiny": {"train_log": str(log), "log": str(log), "runs": {
        "DLRM": [{"seed": 0, "results": str(results)}]}}}}
    (tmp_path / "runs.json").write_text(json.dumps(index))
    cfg = EvaluateConfig(runs=str(tmp_path / "runs.json"))
    with pytest.raises(ResultsError, match="results_DLRM.json: no results for tiny seed 0 DLRM"):
        run_evaluate(cfg)
    results.parent.mkdir()
    results.write_text(json.dumps({"valid": {"buy": {}}, "test": {"buy": {}}}))
    with pytest.raises(ResultsError, match="results_DLRM.json: not a results file.*'click'"):
        run_evaluate(cfg)
    metrics = {"auc": 0.7, "gauc": 0.6, "logloss": 0.5}
    epochs = [{"epoch": e, "valid": {"click": {**metrics, "auc": auc}}}
              for e, auc in enumerate([0.69, 0.72, 0.715])]
    results.write_text(json.dumps({"valid": {"click": metrics}, "test": {"click": metrics},
                                   "epochs": epochs, "steps": 300}))
    summary = run_evaluate(cfg)
    row = summary["datasets"]["tiny"]["table"][0]
    assert row["auc_mean"] == 0.7 and row["steps"] == 300
    assert row["last_epoch_gain"] == pytest.approx(0.0)  # the third epoch did not help
    epochs[2]["valid"]["click"]["auc"] = 0.725
    results.write_text(json.dumps({"valid": {"click": metrics}, "test": {"click": metrics},
                                   "epochs": epochs, "steps": 300}))
    run_evaluate(cfg)
    assert "raised the best valid AUC by at most +0.0050" in (tmp_path / "results.md").read_text()
    # Two runs compared: the change of valid AUC per variant.
    other = tmp_path / "other"
    other.mkdir()
    epochs[2]["valid"]["click"]["auc"] = 0.74
    results.write_text(json.dumps({"valid": {"click": {**metrics, "auc": 0.74}},
                                   "test": {"click": metrics}, "epochs": epochs}))
    run_evaluate(dataclasses.replace(cfg, out_dir=str(other)))
    rows = run_compare(CompareConfig(base=str(tmp_path), other=str(other),
                                     out=str(tmp_path / "compare.json")))
    assert rows[0]["variant"] == "DLRM"
    assert rows[0]["valid_auc_change"] == pytest.approx(0.04)
    assert json.loads((tmp_path / "compare.json").read_text())["rows"] == rows
    assert (tmp_path / "results.md").read_text().startswith("### tiny (500 instances)")


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """apps/pipeline.py's run_pipeline on a tiny log, uninterrupted; returns (args, run dir,
    summary, log lines)."""
    root = tmp_path_factory.mktemp("pipeline")
    args = TINY + E2E_VARIANTS + ["--data.data_dir", str(root / "data")]
    lines: List[str] = []
    cwd = os.getcwd()
    try:
        summary = run_pipeline(parse_config(PipelineConfig,
                                            args + ["--run_dir", str(root / "run")]),
                               log=lines.append)
    finally:
        os.chdir(cwd)
    return args, root / "run", summary, lines


def _test_metrics(summary: Dict) -> Dict[str, Dict[str, float]]:
    return {r["variant"]: {m: r[f"{m}_mean"] for m in ("auc", "gauc", "logloss")}
            for r in summary["datasets"]["synthetic"]["table"]}


def test_pipeline_end_to_end_writes_a_table_a_person_can_read(e2e):
    args, run, summary, lines = e2e
    assert sum(line.startswith("done") for line in lines) == 10  # every stage ran
    table = summary["datasets"]["synthetic"]["table"]
    assert [r["variant"] for r in table] == ["DLRM", "IAT user-order", "SIF over IAT tokens"]
    for r in table:
        assert 0.0 < r["auc_mean"] < 1.0 and r["logloss_mean"] > 0 and r["seeds"] == 1
        assert r["auc_gain_pct"] != r["auc_gain_pct"]  # no DLRM+BST in this run: NaN gain
    with open(run / "results.csv") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == [r["variant"] for r in table]
    md = (run / "results.md").read_text()
    assert "| IAT user-order |" in md and "3,000 instances" in md
    # The built-in synthetic data: the oracle AUCs of the same test samples, under the table.
    oracle = summary["datasets"]["synthetic"]["oracle"]
    assert 0.5 < oracle["static"] < oracle["bayes"] < 1.0
    assert f"Bayes (true logit) {oracle['bayes']:.4f}" in md
    assert (run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logs = {p.name for p in (run / "logs").glob("*.log")}
    assert {"synthetic__data.log", "synthetic__seed0__iat_user.log", "synthetic__seed0__sif.log",
            "synthetic__seed0__train_DLRM.log", "evaluate.log"} <= logs
    assert "[train] best epoch 0 test click" in (
        run / "logs" / "synthetic__seed0__train_DLRM.log").read_text()
    # Each run keeps its best epoch's test predictions (for the paired bootstrap), only those.
    work = run / "work" / "synthetic" / "seed0"
    saved = json.loads((work / "results_DLRM.json").read_text())
    pred = read_predictions(saved["test_predictions"], "click")
    assert pred["instance_id"].size == saved["test"]["click"]["count"]
    assert not list(work.glob("*.test_epoch*.parquet"))


def _write_run(root: Path, variant: str, seed: int, pred: Dict[str, np.ndarray]) -> Dict:
    """A results file and test predictions of one run, as the train stage writes them."""
    results = root / f"seed{seed}" / f"results_{variant}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    path = results.with_suffix(".test.parquet")
    write_predictions(path, pred, ["click"])
    metrics = prediction_metrics(pred, ["click"])
    results.write_text(json.dumps({"valid": metrics, "test": metrics, "steps": 10,
                                   "test_predictions": str(path)}))
    return {"seed": seed, "results": str(results)}


def test_gains_carry_their_uncertainty_and_noise_is_marked(tmp_path):
    """3,000 test rows with random labels: a variant of random scores shows no gain beyond its
    bootstrap interval (n.s. in the table, the CSV and the plot), a variant that knows the
    labels does."""
    log = write_log(pa.table(tiny_columns()), tmp_path / "log", tiny_spec())
    rng = np.random.default_rng(0)
    n = 3000
    labels = rng.integers(0, 2, (n, 1))
    base = {"instance_id": np.arange(n), "users": rng.integers(0, 300, n), "labels": labels}
    runs: Dict[str, List] = {"DLRM+BST": [], "noise": [], "informed": []}
    for seed in range(2):
        for variant in runs:
            logits = rng.normal(size=(n, 1)) + (1.0 * labels if variant == "informed" else 0)
            runs[variant].append(_write_run(tmp_path, variant, seed, {**base, "logits": logits}))
    index = {"baseline": "DLRM+BST", "datasets": {"tiny": {
        "train_log": str(log), "log": str(log), "runs": runs}}}
    (tmp_path / "runs.json").write_text(json.dumps(index))
    summary = run_evaluate(EvaluateConfig(runs=str(tmp_path / "runs.json"), bootstrap_draws=200))
    rows = {r["variant"]: r for r in summary["datasets"]["tiny"]["table"]}
    noise, informed = rows["noise"], rows["informed"]
    assert noise["auc_gain_low"] < 0 < noise["auc_gain_high"]
    assert noise["auc_gain_significant"] is False and informed["auc_gain_significant"] is True
    assert informed["auc_gain_low"] > 0 and informed["auc_gain_std"] >= 0
    assert rows["DLRM+BST"]["auc_gain_significant"] is None  # the baseline itself
    md = (tmp_path / "results.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| noise |"))
    assert "n.s." in line and f"[{noise['auc_gain_low']:+.2f}, " in line
    assert "n.s." not in next(x for x in md.splitlines() if x.startswith("| informed |"))
    with open(tmp_path / "results.csv") as f:
        csv_rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert csv_rows["noise"]["auc_gain_significant"] == "False"
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_skips_every_stage(e2e):
    args, run, summary, _ = e2e
    lines: List[str] = []
    cwd = os.getcwd()
    try:
        again = run_pipeline(parse_config(PipelineConfig, args + ["--run_dir", str(run)]),
                             log=lines.append)
    finally:
        os.chdir(cwd)
    assert not [line for line in lines if line.startswith(("run", "done"))]
    assert again == summary


def _descendants(pid: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def test_killed_during_a_stage_a_rerun_finishes_with_the_same_results(e2e, tmp_path):
    args, _, summary, _ = e2e
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO_ROOT / "apps" / "pipeline.py"), *args, "--run_dir", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    record = run / "steps" / "synthetic__seed0__train_IAT_user-order.json"

    def state() -> str:
        try:
            return json.loads(record.read_text())["state"]
        except (FileNotFoundError, json.JSONDecodeError):
            return ""

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and state() != "running":
        time.sleep(0.02)
    assert proc.poll() is None, "the pipeline ended before the stage to kill it in"
    time.sleep(0.05)  # inside the stage: its task has started in its launch
    for pid in _descendants(proc.pid):  # the driver and every stage process: a power cut
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert state() == "running", "the stage ended before it was killed"
    assert not (run / "summary.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "skip   synthetic/seed0/iat_user" in done.stdout  # stages done before are kept
    assert "run    synthetic/seed0/train_IAT_user-order" in done.stdout
    assert "| SIF over IAT tokens |" in done.stdout  # the table is printed
    again = json.loads((run / "summary.json").read_text())
    expected = _test_metrics(summary)
    for variant, metrics in _test_metrics(again).items():
        for m, v in metrics.items():
            assert v == pytest.approx(expected[variant][m], abs=1e-6), (variant, m)


def test_a_failing_stage_stops_the_pipeline_with_its_log(e2e, tmp_path, capsys):
    args, _, _, _ = e2e
    bad = tmp_path / "own-log"
    bad.mkdir()  # a log folder without any data
    sys.path.insert(0, str(REPO_ROOT / "apps"))
    try:
        import pipeline as app
        cwd = os.getcwd()
        try:
            code = app.main(args + ["--datasets", str(bad), "--run_dir", str(tmp_path / "run")])
        finally:
            os.chdir(cwd)
    finally:
        sys.path.remove(str(REPO_ROOT / "apps"))
    err = capsys.readouterr().err
    assert code == 1
    assert "stage own-log/data FAILED" in err and "no .parquet files" in err
    assert (tmp_path / "run" / "logs" / "own-log__data.log").is_file()


def test_transfer_end_to_end_reads_the_other_domains_tokens(tmp_path):
    """apps/transfer.py's run on two tiny synthetic domains (rho 1): the target's model reads the
    source domain's IAT tokens beside its own item history; the results name both stores and
    the gains table carries the transfer gain with its interval."""
    from iat_torchrec.pipeline.transfer import TransferConfig, run_transfer

    config = json.loads((REPO_ROOT / "experiments" / "transfer_synthetic.json").read_text())
    tiny = parse_config(PipelineConfig, TINY)  # the tiny sizes, as a config file
    base = to_dict(tiny)
    base.update(variants=["DLRM+BST", "DLRM+BST + other-domain IAT",
                          "IAT user-order + other-domain IAT"], seeds=[0],
                run_dir=str(tmp_path / "unused"))
    base["data"]["data_dir"] = str(tmp_path / "data")
    base["data"]["synthetic"]["domain"] = 1
    base["transfer_data"] = dict(base["data"], synthetic=dict(base["data"]["synthetic"],
                                                               domain=0))
    assert config["data"]["synthetic"]["domain"] == 1  # the experiment's layout, at a tiny size
    (tmp_path / "transfer.json").write_text(json.dumps(base))
    lines: List[str] = []
    cwd = os.getcwd()
    try:
        rows = run_transfer(TransferConfig(base_config=str(tmp_path / "transfer.json"),
                                           correlations=[1.0], run_root=str(tmp_path / "runs"),
                                           out=str(tmp_path / "out.json")), log=lines.append)
    finally:
        os.chdir(cwd)
    (row,) = rows
    gain = row["gains"]["DLRM+BST + other-domain IAT"]
    assert gain["reference"] == "DLRM+BST" and gain["auc_gain_low"] <= gain["auc_gain_high"]
    assert row["correlation"] == 1.0 and row["dataset"] == "synthetic-domain1"
    assert set(row["oracle_auc_test"]) >= {"bayes", "transferable"}
    work = tmp_path / "runs" / "rho1" / "work"
    saved = json.loads((work / "synthetic-domain1" / "seed0" /
                        "results_DLRM_BST___other-domain_IAT.json").read_text())
    assert saved["stores"]["iat"] == str((work / "synthetic" / "seed0" / "iat_user").resolve())
    assert saved["stores"]["item"].endswith("synthetic-domain1/seed0/iat_temporal")
    both = json.loads((work / "synthetic-domain1" / "seed0" /
                       "results_IAT_user-order___other-domain_IAT.json").read_text())
    assert both["stores"]["item"].endswith("synthetic-domain1/seed0/iat_user")
    assert both["lookups"]["item tokens"]["table_rows"] > 0  # the own tokens' second branch
    assert "| DLRM+BST + other-domain IAT | DLRM+BST |" in "\n".join(lines)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["rows"][0]["gains"] and (tmp_path / "out.png").is_file()
