"""A log as it really comes (text ids, ISO-8601 times, empty cells, tags), imported with an
inferred spec, then the tiny pipeline on it; a later file keeps the rows of the raw ids."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import REPO_ROOT, read_log
from test_pipeline import TINY

from iat_torchrec.data.spec import FeatureGroup, FeatureSpec, Missing
from iat_torchrec.data.vocab import load_vocabularies

IMPORT = [sys.executable, str(REPO_ROOT / "datasets" / "import_log.py")]


def raw_log(n: int, seed: int, start: str = "2024-05-01") -> str:
    rng = np.random.default_rng(seed)
    users = [f"u_{u:04d}" for u in rng.integers(0, 60, n)]
    products = rng.integers(0, 40, n)
    ts = np.datetime64(start) + np.sort(rng.integers(0, 30 * 86400, n)).astype("timedelta64[s]")
    lines = ["user,time,click,product,category,price,tags"]
    for i in range(n):
        p = int(products[i])
        price = "" if rng.random() < 0.1 else f"{p * 1.5 + rng.random():.2f}"
        tags = "|".join(f"t{t}" for t in rng.choice(8, rng.integers(0, 3), replace=False))
        click = int(rng.random() < (0.7 if p % 3 == 0 else 0.2))
        lines.append(f"{users[i]},{ts[i]},{click},P-{p},cat_{p % 5},{price},{tags}")
    return "\n".join(lines) + "\n"


def run(cmd, **kwargs):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_inferred_spec(tmp_path):
    (tmp_path / "log.csv").write_text(raw_log(300, 0))
    done = run(IMPORT + ["--infer", "--source", str(tmp_path / "log.csv"), "--spec",
                         str(tmp_path / "spec.json"), "--user_column", "user", "--ts_column",
                         "time", "--groups", "category=cross"])
    assert "time: timestamp, timestamp[s] values" in done.stdout
    spec = FeatureSpec.load(tmp_path / "spec.json")
    assert spec.labels == ("click",) and spec.dense_names == ["price"]
    assert spec.field("price").missing is Missing.MEAN and spec.field("price").missing_indicator
    product, category, tags = spec.sparse
    assert (product.name, product.vocabulary, product.num_embeddings) == ("product", True, 41)
    assert product.group is FeatureGroup.ITEM and category.group is FeatureGroup.CROSS
    assert tags.multi_valued and tags.num_embeddings == 9
    done = run(IMPORT + ["--source", str(tmp_path / "log.csv"), "--spec",
                         str(tmp_path / "spec.json"), "--output", str(tmp_path / "out"),
                         "--user_column", "user", "--ts_column", "time", "--dry_run"])
    assert "missing values filled: price=" in done.stdout and not (tmp_path / "out").exists()


def test_real_log_through_the_pipeline_and_a_later_import(tmp_path):
    (tmp_path / "log.csv").write_text(raw_log(2500, 1))
    common = ["--user_column", "user", "--ts_column", "time"]
    run(IMPORT + ["--infer", "--source", str(tmp_path / "log.csv"), "--spec",
                  str(tmp_path / "spec.json"), *common])
    run(IMPORT + ["--source", str(tmp_path / "log.csv"), "--spec", str(tmp_path / "spec.json"),
                  "--output", str(tmp_path / "mine"), "--vocab_fraction", "0.8", *common])
    args = [*TINY, "--datasets", str(tmp_path / "mine"), "--variants", "DLRM", "IAT user-order",
            "--seeds", "0", "--downstream.model.item_feature", "product",
            "--data.data_dir", str(tmp_path / "data"), "--run_dir", str(tmp_path / "run")]
    run([sys.executable, str(REPO_ROOT / "apps" / "pipeline.py"), *args],
        cwd=str(REPO_ROOT), env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (table,) = [d["table"] for d in summary["datasets"].values()]
    assert [r["variant"] for r in table] == ["DLRM", "IAT user-order"]
    assert all(0.0 < r["auc_mean"] < 1.0 for r in table)

    # a later file, imported with the saved vocabularies: the same raw ids, the same rows
    (tmp_path / "later.csv").write_text(raw_log(400, 2, start="2024-06-01"))
    run(IMPORT + ["--source", str(tmp_path / "later.csv"), "--spec", str(tmp_path / "spec.json"),
                  "--output", str(tmp_path / "later"), "--vocab_from", str(tmp_path / "mine"),
                  *common])
    first, later = load_vocabularies(tmp_path / "mine")[0], load_vocabularies(tmp_path / "later")[0]
    for name in ("product", "category", "tags"):
        assert later[name].keys.equals(first[name].keys)
    known = first["user_id"].keys.to_pylist()
    assert later["user_id"].keys.to_pylist()[:len(known)] == known
    rows = read_log(tmp_path / "later").to_pylist()
    raw = {line.split(",")[1].replace(" ", "T"): line.split(",")
           for line in (tmp_path / "later.csv").read_text().splitlines()[1:]}
    product_row = {k: i for i, k in enumerate(first["product"].keys.to_pylist())}
    assert sum(r["product"] > 0 for r in rows) > 0
    for r in rows[:50]:
        stamp = np.datetime64(r["ts"], "s").astype(str)
        assert r["product"] == product_row.get(raw[stamp][3], 0)
