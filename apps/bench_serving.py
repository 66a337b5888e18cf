"""Load test of the scoring server: a real client over loopback against ``apps/serve.py``.

    python apps/bench_serving.py [--run_dir outputs/pipeline] [--lengths 64 256] \
        [--candidates 1 10 100] [--clients 1 8 32] [--out results/serving.json]

For each variant (DLRM, IAT user-order, SIF by default) it exports a bundle from the pipeline
run (the main job's by default: its seed-0 models and stores), and likewise for the variants
trained with the history blind to the candidate (``--blind_variants`` from ``--blind_run_dir``,
by default the ablation's arm of the claims ``iat_blind`` / ``sif_blind``: ``python
apps/ablate.py --claims iat_blind sif_blind``), whose history is encoded once per request
rather than once per candidate. For each served history
length L starts the server (``apps/serve.py --max_len L``) as its own process. For each number
of candidates C and of concurrent clients K, K client threads (one keep-alive HTTP connection
each) replay requests of test-split users at test timestamps, each with C candidates, for at
most ``requests`` requests or ``seconds`` seconds; it reports p50 / p95 / p99 latency (client
side: send to last byte) and requests/s.

The reference, measured in the same run: the same model's offline forward (``model(dense,
sparse, history)``, inputs prepared beforehand) over the same request's C candidates and
history, in this process with the server's thread count, best of ``repeats``. The table's
``overhead`` is the server's p50 at one client over that forward time: what HTTP, JSON,
feature checks, the history query and batching cost on top of the model.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from iat_torchrec.benchmark import benchmark_results, best_time, markdown_table
from iat_torchrec.config import parse_config
from iat_torchrec.pipeline.ablation import BLIND, AblationConfig, arm_dir
from iat_torchrec.serving.bundle import Bundle, ExportConfig, export_bundle
from iat_torchrec.serving.scorer import Scorer, ScoreRequest, log_requests

REPO = Path(__file__).resolve().parents[1]
# variant name in the pipeline -> (results file stem, checkpoints of its frozen models)
CHECKPOINTS = {"iat": "iat_user", "sif": "sif"}


@dataclasses.dataclass
class BenchServingConfig:
    """Scoring-server load test."""

    run_dir: str = dataclasses.field(default="outputs/pipeline", metadata={
        "help": "a pipeline run (apps/pipeline.py --run_dir) whose seed-0 models are served"})
    dataset: str = dataclasses.field(default="synthetic", metadata={"help": "its dataset"})
    variants: List[str] = dataclasses.field(
        default_factory=lambda: ["DLRM", "IAT user-order", "SIF"],
        metadata={"help": "variants to serve (pipeline variant names)"})
    blind_run_dir: str = dataclasses.field(
        default_factory=lambda: str(arm_dir(AblationConfig(), BLIND)), metadata={
            "help": "a pipeline run trained with the history blind to the candidate "
                    "(--downstream.model.iat.history_sees_query false "
                    "--downstream.model.mixer.history_sees_target false)"})
    blind_variants: List[str] = dataclasses.field(
        default_factory=lambda: ["IAT user-order", "SIF"],
        metadata={"help": "variants of --blind_run_dir to serve (none: [])"})
    lengths: List[int] = dataclasses.field(default_factory=lambda: [64, 256], metadata={
        "help": "served history lengths L"})
    candidates: List[int] = dataclasses.field(default_factory=lambda: [1, 10, 100], metadata={
        "help": "candidates per request"})
    clients: List[int] = dataclasses.field(default_factory=lambda: [1, 8, 32], metadata={
        "help": "concurrent clients"})
    requests: int = dataclasses.field(default=300, metadata={
        "help": "most requests per cell"})
    seconds: float = dataclasses.field(default=8.0, metadata={
        "help": "most seconds per cell (after warm-up)"})
    threads: int = dataclasses.field(default=1, metadata={
        "help": "torch threads of the server's scoring worker (and of the offline forward)"})
    table_dtype: str = dataclasses.field(default="fp32", metadata={
        "help": "bundle tables: fp32 | fp16 | int8"})
    repeats: int = dataclasses.field(default=20, metadata={
        "help": "offline forward: timed runs (best kept)"})
    work_dir: str = dataclasses.field(default="", metadata={
        "help": "where bundles are written (default: a temporary directory)"})
    out: str = dataclasses.field(default="", metadata={
        "help": "JSON file for the table (date, machine, settings, every cell)"})


def export_variant(cfg: BenchServingConfig, run_dir: str, variant: str, out: Path) -> Path:
    """A bundle of ``run_dir``'s seed-0 ``variant`` with the frozen models its stores need."""
    seed = Path(run_dir) / "work" / cfg.dataset / "seed0"
    stem = variant.replace(" ", "_")
    results = seed / f"results_{stem}.json"
    if not results.is_file():
        raise FileNotFoundError(f"{results}: no results of variant {variant!r} in this run "
                                "(run the main job first: python3 apps/bootstrap.py main)")
    saved = json.loads(results.read_text())["config"]
    ck = {}
    if saved.get("iat_store"):
        ck["source_checkpoint"] = str(seed / "checkpoints" / Path(saved["iat_store"]).name)
    if saved.get("sif_store"):
        ck["tokenizer_checkpoint"] = str(seed / "checkpoints" / Path(saved["sif_store"]).name)
    name = stem if run_dir == cfg.run_dir else f"{stem}_blind"
    return export_bundle(ExportConfig(train_results=str(results), output=str(out / name),
                                      table_dtype=cfg.table_dtype, overwrite=True, **ck))


class Server:
    """``apps/serve.py`` in its own process on a free loopback port."""

    def __init__(self, bundle: Path, max_len: int, threads: int, max_candidates: int) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "apps" / "serve.py"), "--bundle", str(bundle),
             "--port", "0", "--max_len", str(max_len), "--threads", str(threads),
             "--max_candidates", str(max_candidates), "--verify", "false"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on http://"):
            self.proc.kill()
            raise RuntimeError(f"the server did not start ({line!r})")
        self.port = int(line.rsplit(":", 1)[1])
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                status, _ = request(connect(self.port), "GET", "/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError("the server did not become ready in 300 s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def connect(port: int) -> http.client.HTTPConnection:
    """A keep-alive loopback connection with Nagle's algorithm off (a request is one write)."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes = b""):
    conn.request(method, path, body=body or None,
                 headers={"Content-Type": "application/json"} if body else {})
    resp = conn.getresponse()
    return resp.status, resp.read()


def make_bodies(pool: Sequence[ScoreRequest], candidates: int, count: int,
                seed: int = 0) -> List[bytes]:
    """``count`` request bodies: a test row's user and time, with ``candidates`` candidates
    drawn from other test rows."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        r = pool[int(rng.integers(len(pool)))]
        cands = [pool[int(i)].candidates[0] for i in rng.integers(len(pool), size=candidates)]
        out.append(json.dumps({"user_id": r.user_id, "ts": r.ts, "candidates": cands}).encode())
    return out


def load(port: int, bodies: Sequence[bytes], clients: int, seconds: float) -> Dict[str, float]:
    """K threads send ``bodies`` round-robin until they are used up or ``seconds`` pass."""
    lat: List[float] = []
    lock = threading.Lock()
    nxt = [0]
    stop = time.perf_counter() + seconds

    def client() -> None:
        conn = connect(port)
        mine = []
        while time.perf_counter() < stop:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(bodies):
                break
            t0 = time.perf_counter()
            status, data = request(conn, "POST", "/score", bodies[i])
            mine.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"status {status}: {data[:200]!r}")
        conn.close()
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        for f in [ex.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    q = np.quantile(np.array(lat), [0.5, 0.95, 0.99]) * 1e3
    return {"requests": len(lat), "p50_ms": float(q[0]), "p95_ms": float(q[1]),
            "p99_ms": float(q[2]), "requests_per_s": len(lat) / wall}


def offline_forward_seconds(scorer: Scorer, body: bytes, repeats: int) -> float:
    """Best time of the model's own forward over one request's candidates and history (the
    inputs prepared beforehand, as the server prepares them)."""
    b = json.loads(body)
    x = scorer.prepare([ScoreRequest(user_id=b["user_id"], ts=b["ts"],
                                     candidates=b["candidates"])])
    return best_time(lambda: scorer.forward(x), repeats, warmup=True)


def run(cfg: BenchServingConfig) -> Dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="bench_serving"))
    rows: List[Dict[str, Any]] = []
    most = max(cfg.candidates)
    served = [(cfg.run_dir, v, v) for v in cfg.variants] + [
        (cfg.blind_run_dir, v, f"{v} (blind)") for v in cfg.blind_variants]
    for run_dir, name, variant in served:
        bundle_path = export_variant(cfg, run_dir, name, work)
        bundle = Bundle.load(bundle_path)
        test_log = json.loads(Path(bundle.manifest["exported_from"]["train_results"])
                              .read_text())["config"]["test_log"]
        pool = log_requests(test_log, bundle.spec, limit=5000)
        for L in cfg.lengths:
            scorer = Scorer(bundle, max_len=L, verify=False)
            server = Server(bundle_path, L, cfg.threads, most)
            try:
                for C in cfg.candidates:
                    bodies = make_bodies(pool, C, cfg.requests + 20, seed=C)
                    forward = offline_forward_seconds(scorer, bodies[0], cfg.repeats)
                    for K in cfg.clients:
                        load(server.port, bodies[:20], min(K, 4), 30.0)  # warm-up
                        cell = load(server.port, bodies[20:], K, cfg.seconds)
                        cell.update(variant=variant, L=L, candidates=C, clients=K,
                                    offline_forward_ms=forward * 1e3,
                                    overhead=cell["p50_ms"] / (forward * 1e3))
                        rows.append(cell)
                        print(f"{variant:>24} L={L:<4} C={C:<4} K={K:<3} "
                              f"p50 {cell['p50_ms']:7.2f} ms  p99 {cell['p99_ms']:7.2f} ms  "
                              f"{cell['requests_per_s']:7.1f} req/s  forward "
                              f"{forward * 1e3:6.2f} ms  x{cell['overhead']:.2f}", flush=True)
            finally:
                server.close()
    table = markdown_table(
        [("variant", "<24"), ("L", ">4d"), ("candidates", ">10d"), ("clients", ">7d"),
         ("p50 ms", ">7.2f"), ("p95 ms", ">7.2f"), ("p99 ms", ">7.2f"), ("req/s", ">7.1f"),
         ("forward ms", ">10.2f"), ("p50 / forward", ">13.2f")],
        [[r["variant"], r["L"], r["candidates"], r["clients"], r["p50_ms"], r["p95_ms"],
          r["p99_ms"], r["requests_per_s"], r["offline_forward_ms"], r["overhead"]]
         for r in rows])
    print(table)
    return benchmark_results(cfg, cfg.out, rows=rows)


def main(argv: Sequence[str] = ()) -> int:
    run(parse_config(BenchServingConfig, list(argv) or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
