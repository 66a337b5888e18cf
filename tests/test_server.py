"""Serving end to end on a tiny pipeline run: bundles of DLRM, IAT user-order and SIF over IAT
tokens (and the last two with the history blind to the candidate, from a second run); scores served by the real server process (apps/serve.py on a loopback port) equal the
offline model's on the test split; candidates of one request share its history exactly; a
server killed during an ingest loses no acknowledged instance and shows nothing half-written;
bad requests get 4xx naming the field; a tampered bundle is refused; late labels."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from test_pipeline import E2E_VARIANTS, TINY
from iat_torchrec.config import from_dict, parse_config
from iat_torchrec.data.reader import ReaderConfig, ReadOrder
from iat_torchrec.pipeline.plan import PipelineConfig
from iat_torchrec.pipeline.runner import run_pipeline
from iat_torchrec.serving.bundle import Bundle, BundleError, ExportConfig, export_bundle
from iat_torchrec.serving.ingest import Ingestor
from iat_torchrec.serving.scorer import Scorer, ScoreRequest, log_requests
from iat_torchrec.stages.train import TrainDownstreamConfig, check_train_inputs
from iat_torchrec.tokens.downstream import DownstreamReader
from iat_torchrec.tokens.lookup import InstanceTokenLookup, SampleCodeLookup
from iat_torchrec.tokens.store import TokenStore, TokenStoreError

VARIANTS = {"DLRM": {}, "IAT_user-order": {"source_checkpoint": "iat_user"},
            "SIF_over_IAT_tokens": {"source_checkpoint": "iat_user",
                                    "tokenizer_checkpoint": "sif"}}
# The same two history variants with the history blind to the candidate (encoded once per
# request), trained in a run of their own: bundle name -> (variant, checkpoints).
BLIND = ["--downstream.model.iat.history_sees_query", "false",
         "--downstream.model.mixer.history_sees_target", "false",
         "--variants", "IAT user-order", "SIF over IAT tokens"]
BLIND_VARIANTS = {f"{name}_blind": name for name in ("IAT_user-order", "SIF_over_IAT_tokens")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny pipeline runs (the paper's forms; the history blind to the candidate) and an fp32
    bundle of each variant."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("serving")
    cwd = os.getcwd()
    try:
        for run, flags in (("run", E2E_VARIANTS), ("run_blind", BLIND)):
            run_pipeline(parse_config(PipelineConfig, TINY + flags + [
                "--data.data_dir", str(root / "data"), "--run_dir", str(root / run)]),
                log=lambda s: None)
    finally:
        os.chdir(cwd)
    seed = root / "run" / "work" / "synthetic" / "seed0"
    bundles = {}
    names = [(name, name, seed) for name in VARIANTS] + [
        (blind, name, root / "run_blind" / "work" / "synthetic" / "seed0")
        for blind, name in BLIND_VARIANTS.items()]
    for bundle, name, work in names:
        bundles[bundle] = export_bundle(ExportConfig(
            train_results=str(work / f"results_{name}.json"), output=str(root / bundle),
            **{k: str(work / "checkpoints" / v) for k, v in VARIANTS[name].items()}))
    yield {"root": root, "seed": seed, "bundles": bundles}
    torch.set_num_threads(threads)


def _train_config(bundle: Bundle) -> TrainDownstreamConfig:
    saved = json.loads(Path(bundle.manifest["exported_from"]["train_results"]).read_text())
    return from_dict(TrainDownstreamConfig, saved["config"])


def offline_logits(bundle: Bundle) -> Dict[int, float]:
    """instance id -> the float model's logit over the test split, read the offline way
    (assembled history shards, DownstreamReader)."""
    cfg = _train_config(bundle)
    inp = check_train_inputs(cfg)
    m, v = cfg.model, cfg.model.variant
    tl = InstanceTokenLookup(inp.iat_store) if v.uses_tokens else None
    cl = (SampleCodeLookup.from_store(inp.sif_store, rows_like=inp.iat_store)
          if v.uses_codes else None)
    model = bundle.float_model(token_lookup=tl, code_lookup=cl)
    k = m.item_history_len if m.item_branch != "none" else 0
    shards = inp.shards["test"]
    reader = DownstreamReader(cfg.test_log, inp.spec,
                              ReaderConfig(batch_size=128, order=ReadOrder.TEMPORAL),
                              history=shards, store=inp.history_store if shards else None,
                              item_feature=m.item_feature if k else "", item_history_len=k,
                              item_logs=inp.item_logs)
    out: Dict[int, float] = {}
    with torch.no_grad():
        for b in reader:
            logits = model(b.dense_features, b.sparse_features, b.history)[:, 0]
            out.update(zip(b.instance_id.tolist(), logits.tolist()))
    return out


class Server:
    """apps/serve.py in its own process on a free loopback port."""

    def __init__(self, bundle: Path, *flags: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "apps" / "serve.py"), "--bundle", str(bundle),
             "--port", "0", "--threads", "1", *flags], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO_ROOT)
        line = self.proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        self.port = int(line.rsplit(":", 1)[1])
        deadline = time.time() + 120
        while True:
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            assert time.time() < deadline and self.proc.poll() is None, "server never ready"
            time.sleep(0.2)

    def call(self, method: str, path: str, body: Any = None, raw: bytes = b""
             ) -> Tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = raw or (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data)
        resp = conn.getresponse()
        text = resp.read()
        conn.close()
        return resp.status, (json.loads(text) if text[:1] in (b"{", b"[") else text.decode())

    def get(self, path: str) -> Tuple[int, Any]:
        return self.call("GET", path)

    def post(self, path: str, body: Any) -> Tuple[int, Any]:
        return self.call("POST", path, body)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _body(r: ScoreRequest, candidates: List[Dict[str, Any]] = None) -> Dict[str, Any]:
    return {"user_id": r.user_id, "ts": r.ts, "candidates": candidates or list(r.candidates)}


@pytest.mark.parametrize("variant", [*VARIANTS, *BLIND_VARIANTS])
def test_served_scores_equal_the_offline_evaluation(world, variant):
    bundle = Bundle.load(world["bundles"][variant])
    offline = offline_logits(bundle)
    requests = log_requests(_train_config(bundle).test_log, bundle.spec)
    assert len(requests) == len(offline) > 100
    server = Server(bundle.path)
    served: Dict[int, float] = {}
    errors: List[Any] = []

    def client(part: List[ScoreRequest]) -> None:  # concurrent: batched by the server
        for r in part:
            status, out = server.post("/score", _body(r))
            if status != 200:
                errors.append(out)
                return
            served[r.instance_id] = out["scores"]["click"][0]

    try:
        threads = [threading.Thread(target=client, args=(requests[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _, metrics = server.get("/metrics")
    finally:
        server.close()
    assert not errors
    ids = sorted(offline)
    want = torch.sigmoid(torch.tensor([offline[i] for i in ids], dtype=torch.float64)).numpy()
    got = np.array([served[i] for i in ids])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert f'iat_requests_total{{endpoint="score",status="200"}} {len(ids)}' in metrics


@pytest.mark.parametrize("dtype, atol", [("fp16", 1e-2), ("int8", 3e-2)])
def test_quantised_tables_score_within_tolerance(world, tmp_path, dtype, atol):
    seed = world["seed"]
    path = export_bundle(ExportConfig(train_results=str(seed / "results_IAT_user-order.json"),
                                      output=str(tmp_path / dtype), table_dtype=dtype))
    bundle = Bundle.load(path)
    offline = offline_logits(bundle)
    requests = log_requests(_train_config(bundle).test_log, bundle.spec)
    scorer = Scorer(bundle)
    got = np.array([p for out in scorer.score(requests) for p in out["click"]])
    want = torch.sigmoid(torch.tensor([offline[r.instance_id] for r in requests])).numpy()
    assert np.abs(got - want).max() < atol
    assert scorer.model.state_dict()  # the quantised model: fbgemm tables of that dtype
    assert bundle.manifest["table_dtype"] == dtype


@pytest.mark.parametrize("variant", ["IAT_user-order", "SIF_over_IAT_tokens", *BLIND_VARIANTS])
def test_candidates_of_one_request_share_its_history_exactly(world, variant):
    bundle = Bundle.load(world["bundles"][variant])
    requests = log_requests(_train_config(bundle).test_log, bundle.spec, limit=40)
    scorer = Scorer(bundle)
    base = requests[-1]
    together = scorer.logits([ScoreRequest(base.user_id, base.ts,
                                           [r.candidates[0] for r in requests])])[0]
    alone = torch.cat([scorer.logits([ScoreRequest(base.user_id, base.ts, r.candidates)])[0]
                       for r in requests])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    # and requests of several users in one forward equal each alone
    mixed = scorer.logits(requests[:10])
    for r, got in zip(requests[:10], mixed):
        torch.testing.assert_close(got, scorer.logits([r])[0], rtol=0, atol=1e-6)


def _instance(r: ScoreRequest, instance_id: int, ts: int, click: int = 1) -> Dict[str, Any]:
    return dict(r.candidates[0], instance_id=instance_id, user_id=r.user_id, ts=ts, click=click)


def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_goes_on(world):
    bundle = Bundle.load(world["bundles"]["IAT_user-order"])
    r = log_requests(_train_config(bundle).test_log, bundle.spec, limit=1)[0]
    good = _body(r)
    server = Server(bundle.path, "--max_candidates", "5")
    try:
        cand = dict(r.candidates[0])
        missing = {k: v for k, v in cand.items() if k != "price"}
        plain = next(f.name for f in bundle.spec.sparse if not f.hashed and not f.vocabulary)
        cases = [
            (dict(good, candidates=[missing]), 422, "candidates[0].price"),
            (dict(good, candidates=[dict(cand, price="cheap")]), 422, "candidates[0].price"),
            (dict(good, candidates=[dict(cand, item_id=1.5)]), 422, "candidates[0].item_id"),
            (dict(good, candidates=[dict(cand, **{plain: 10 ** 9})]), 422,
             f"candidates[0].{plain}"),
            (dict(good, candidates=[cand] * 6), 413, "candidates"),
            (dict(good, ts=1), 422, "ts"),
            (dict(good, ts="now"), 422, "ts"),
            ({"ts": r.ts, "candidates": [cand]}, 422, "user_id"),
            (dict(good, colour=1), 422, "colour"),
        ]
        for body, status, field in cases:
            got, out = server.post("/score", body)
            assert (got, out["field"]) == (status, field), (body, out)
            assert out["detail"].startswith(field)
        assert server.call("POST", "/score", raw=b"{nope")[0] == 400
        status, out = server.post("/score", dict(good, user_id=987654321))  # unknown user
        assert status == 200 and out["history_len"] == 0
        status, out = server.post("/labels", {"labels": [{"instance_id": 10 ** 12,
                                                           "click": 1}]})
        assert status == 404 and out["field"] == "labels[0].instance_id"
        status, out = server.post("/score", good)
        assert status == 200 and out["history_len"] > 0
    finally:
        server.close()


def test_a_tampered_bundle_is_refused_naming_the_file(world, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(world["bundles"]["IAT_user-order"], bad)
    with open(bad / "model.pt", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match=r"model\.pt: SHA-256 differs"):
        Bundle.load(bad)
    done = subprocess.run([sys.executable, str(REPO_ROOT / "apps" / "serve.py"), "--bundle",
                           str(bad), "--port", "0"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "model.pt: SHA-256 differs" in done.stderr and len(done.stderr.splitlines()) == 1


def _store_ids(bundle: Path, name: str) -> np.ndarray:
    return np.sort(TokenStore.open(bundle / "stores" / name, verify=True).column("instance_id"))


def test_ingest_survives_a_kill_and_the_next_request_sees_it(world, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(world["bundles"]["SIF_over_IAT_tokens"], path)
    bundle = Bundle.load(path)
    requests = log_requests(_train_config(bundle).test_log, bundle.spec)
    users = sorted({r.user_id for r in requests})
    probe = [r for r in requests if r.user_id == users[0]][-1]
    later = probe.ts + 1
    other = [r for r in requests if r.user_id == users[1]][-1]  # never ingested for
    server = Server(path)
    try:
        before = server.post("/score", _body(other))[1]["scores"]
        n0 = server.post("/score", _body(probe))[1]["history_len"]
        ack = server.post("/ingest", {"instances": [_instance(probe, 10 ** 9, probe.ts - 1)]})
        assert ack[0] == 200 and ack[1]["ingested"] == 1
        assert ack[1]["store_versions"] == {"iat": 2, "sif": 2}
        now = server.post("/score", dict(_body(probe), ts=later))[1]
        assert now["history_len"] == min(n0 + 1, bundle.layout.max_len)
        assert server.post("/ingest", {"instances": [_instance(probe, 10 ** 9, 5)]})[0] == 409
        big = {"instances": [_instance(probe, 2 * 10 ** 9 + i, probe.ts - 1)
                             for i in range(3000)]}
        sent = threading.Thread(target=lambda: _swallow(server.post, "/ingest", big))
        sent.start()
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        sent.join(30)
    finally:
        server.close()
    server = Server(path)  # recovers what the killed server logged
    try:
        iat, sif = _store_ids(path, "iat"), _store_ids(path, "sif")
        np.testing.assert_array_equal(iat, sif)  # both stores hold the same instances
        assert 10 ** 9 in iat  # acknowledged before the kill
        killed = np.isin(np.arange(2 * 10 ** 9, 2 * 10 ** 9 + 3000), iat)
        assert killed.all() or not killed.any()  # the killed batch: all or nothing
        assert not list((path / "ingest").glob("pending-*"))
        assert server.post("/score", _body(other))[1]["scores"] == before
    finally:
        server.close()


def _swallow(call, *args) -> None:
    try:
        call(*args)
    except (OSError, http.client.HTTPException):
        pass  # the server was killed mid-request


def test_a_pending_batch_is_finished_at_start_up(world, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(world["bundles"]["SIF_over_IAT_tokens"], path)
    bundle = Bundle.load(path)
    r = log_requests(_train_config(bundle).test_log, bundle.spec, limit=1)[0]
    ingestor = Ingestor(bundle)
    stores = {n: bundle.open_store(n) for n in ("iat", "sif")}
    batch = ingestor.encode([_instance(r, 7 * 10 ** 9, r.ts - 1)])
    # a server killed after the IAT append, before the SIF one
    ingestor.dir.mkdir(exist_ok=True)
    np.savez(ingestor.dir / "pending-test.npz", **batch)
    with stores["iat"].appender() as w:
        w.append(batch["instance_id"], batch["user_id"], batch["ts"], batch["click"],
                 batch["tokens"])
    assert 7 * 10 ** 9 not in _store_ids(path, "sif")
    server = Server(path)
    server.close()
    np.testing.assert_array_equal(_store_ids(path, "iat"), _store_ids(path, "sif"))
    assert 7 * 10 ** 9 in _store_ids(path, "sif")
    assert TokenStore.open(path / "stores" / "iat").version == 2  # not appended twice


def test_late_labels_update_the_store_and_the_histories(tmp_path):
    w = TokenStore.create(tmp_path / "s", kind="iat", token_shape=(4,), dtype="fp16")
    w.append(np.arange(10), np.arange(10) % 2, np.arange(10) * 10, np.zeros(10, int),
             np.ones((10, 4), np.float32))
    store = w.close()
    new = store.update_labels([3, 4], [1, 1])
    assert new.version == 2
    np.testing.assert_array_equal(new.column("label"), [0, 0, 0, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(new.column("label", np.array([4, 2])), [1, 0])
    idx = new.time_index
    assert sorted(np.asarray(idx.label)[np.isin(np.asarray(idx.rows), [3, 4])]) == [1, 1]
    a = new.appender()
    a.append(np.array([20]), np.array([0]), np.array([5]), np.array([1]),
             np.ones((1, 4), np.float32))
    appended = a.close()
    reopened = TokenStore.open(tmp_path / "s", verify=True)
    for s in (appended, reopened):
        np.testing.assert_array_equal(s.column("label"), [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1])
    again = reopened.update_labels([4, 4, 20], [1, 0, 0])  # the last given wins
    np.testing.assert_array_equal(again.column("label"), [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(TokenStoreError, match="not in the store: 99"):
        again.update_labels([99], [1])
    assert TokenStore.open(tmp_path / "s").version == again.version == 4
    assert not (tmp_path / "s" / ".append.lock").exists()
