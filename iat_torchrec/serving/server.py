"""The scoring server: a bundle behind HTTP (FastAPI on uvicorn).

Endpoints::

    POST /score    {"user_id": 7, "ts": 1700000000, "candidates": [{field: value, ...}, ...]}
                   -> {"scores": {label: [p, ...]}, "history_len": n, "store_versions": {...}}
    POST /ingest   {"instances": [{"instance_id", "user_id", "ts", labels..., fields...}]}
                   -> {"ingested": n, "store_versions": {...}}   (acknowledged when durable)
    POST /labels   {"labels": [{"instance_id": 5, "<label>": 1}]} -> {"updated": n, ...}
    GET  /healthz  the process is up          GET /readyz  the model is loaded (503 before)
    GET  /metrics  Prometheus text: requests, errors, candidates, latency quantiles, batches

One worker thread owns the model and the stores: requests that arrive while it is busy are
scored together in one forward (up to ``max_batch_candidates``), ingests and label updates run
between batches, so a score never sees half an ingest. Every request gets one JSON log line
(``event``, ``status``, ``ms``, sizes) on stderr. A bad request gets a 4xx whose ``detail``
names the field (``candidates[3].price: missing dense field``); the server keeps serving.

Example::

    python apps/serve.py --bundle bundle --port 8000
    curl -s localhost:8000/score -d '{"user_id": 3, "ts": 1700000000, "candidates": [...]}'
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from iat_torchrec.serving.bundle import Bundle
from iat_torchrec.serving.features import RequestError, check_int
from iat_torchrec.serving.ingest import Ingestor
from iat_torchrec.serving.scorer import Scorer, ScoreRequest

LOG = logging.getLogger("iat_torchrec.serving")


@dataclasses.dataclass
class ServeConfig:
    """Serve a bundle over HTTP."""

    bundle: str = dataclasses.field(default="", metadata={
        "help": "the serving bundle (apps/export_bundle.py --output) (required)"})
    host: str = dataclasses.field(default="127.0.0.1", metadata={
        "help": "address to listen on (0.0.0.0: every interface)"})
    port: int = dataclasses.field(default=8000, metadata={"help": "TCP port (0: any free one)"})
    max_len: int = dataclasses.field(default=0, metadata={
        "help": "L of served histories (0: the L the model was trained with)"})
    max_candidates: int = dataclasses.field(default=1000, metadata={
        "help": "most candidates one request may carry (more: 413)"})
    max_batch_candidates: int = dataclasses.field(default=2048, metadata={
        "help": "most candidates scored in one forward when requests arrive together"})
    max_ingest: int = dataclasses.field(default=10000, metadata={
        "help": "most instances one ingest request may carry (more: 413)"})
    threads: int = dataclasses.field(default=0, metadata={
        "help": "torch intra-op threads of the scoring worker (0: torch's default)"})
    verify: bool = dataclasses.field(default=True, metadata={
        "help": "check every store file's CRC32 at start-up"})


class _Metrics:
    """Counters and recent latencies, printed in Prometheus' text format."""

    def __init__(self, window: int = 10000) -> None:
        self.counts: Dict[Tuple[str, int], int] = {}
        self.latency: Dict[str, Deque[float]] = {}
        self.candidates = 0
        self.batches = 0
        self.batched_requests = 0
        self.window = window
        self.lock = threading.Lock()

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.counts[(endpoint, status)] = self.counts.get((endpoint, status), 0) + 1
            self.latency.setdefault(endpoint, deque(maxlen=self.window)).append(seconds)

    def text(self) -> str:
        with self.lock:
            lines = ["# TYPE iat_requests_total counter"]
            lines += [f'iat_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.counts.items())]
            lines.append("# TYPE iat_request_seconds summary")
            for e, d in sorted(self.latency.items()):
                if d:
                    q = np.quantile(np.fromiter(d, float), [0.5, 0.95, 0.99])
                    lines += [f'iat_request_seconds{{endpoint="{e}",quantile="{k}"}} {v:.6f}'
                              for k, v in zip(("0.5", "0.95", "0.99"), q)]
            lines += ["# TYPE iat_candidates_total counter",
                      f"iat_candidates_total {self.candidates}",
                      "# TYPE iat_batches_total counter", f"iat_batches_total {self.batches}",
                      "# TYPE iat_batched_requests_total counter",
                      f"iat_batched_requests_total {self.batched_requests}"]
        return "\n".join(lines) + "\n"


class ScoringWorker:
    """The thread that owns the scorer and the stores (see the module docstring)."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.queue: "queue.Queue[Tuple[str, Any, Callable[[Any, Optional[BaseException]], None]]]"
        self.queue = queue.Queue()
        self.metrics = _Metrics()
        self.ready = threading.Event()
        self.failed: Optional[BaseException] = None
        self.scorer: Optional[Scorer] = None
        self.ingestor: Optional[Ingestor] = None
        self.thread = threading.Thread(target=self._run, name="scoring", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _load(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        bundle = Bundle.load(self.cfg.bundle)
        self.ingestor = Ingestor(bundle)
        stores = {n: bundle.open_store(n, verify=self.cfg.verify)
                  for n in self.ingestor.store_names}
        recovered = self.ingestor.recover(stores)
        hs = bundle.manifest["history_store"]
        items = self.ingestor.items(stores[hs]) if hs and self.ingestor.item_field else None
        self.scorer = Scorer(bundle, max_len=self.cfg.max_len, verify=False, new_items=items)
        _log("ready", bundle=str(bundle.path), variant=bundle.manifest["variant"],
             store_versions=self.scorer.store_versions, recovered_ingests=recovered,
             ingest=self.ingestor.enabled)

    def _refresh(self) -> None:
        s, ing = self.scorer, self.ingestor
        hs = s.bundle.manifest["history_store"]
        items = ing.items(s.bundle.open_store(hs, verify=False)) if s.item_len and hs else None
        s.refresh(new_items=items)

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as e:  # reported by /readyz and the log; the process stays up
            self.failed = e
            _log("load_failed", error=str(e))
            return
        self.ready.set()
        while True:
            jobs = [self.queue.get()]
            while not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            scores = [j for j in jobs if j[0] == "score"]
            self._score(scores)
            for kind, payload, done in jobs:
                if kind != "score":
                    self._write(kind, payload, done)

    def _score(self, jobs: List[Tuple[str, Any, Callable]]) -> None:
        i = 0
        while i < len(jobs):  # consecutive requests up to max_batch_candidates in one forward
            group, n = [jobs[i]], len(jobs[i][1].candidates)
            i += 1
            while i < len(jobs) and n + len(jobs[i][1].candidates) <= \
                    self.cfg.max_batch_candidates:
                n += len(jobs[i][1].candidates)
                group.append(jobs[i])
                i += 1
            try:
                out = self.scorer.score([j[1] for j in group])
                lengths = self._history_lengths([j[1] for j in group])
            except RequestError:  # one bad request in the group: score each alone
                if len(group) == 1:
                    group[0][2](None, sys.exc_info()[1])
                    continue
                for j in group:
                    self._score([j])
                continue
            except Exception as e:  # noqa: BLE001  (answered as a 500, the server goes on)
                for j in group:
                    j[2](None, e)
                continue
            with self.metrics.lock:
                self.metrics.batches += 1
                self.metrics.batched_requests += len(group)
                self.metrics.candidates += n
            for j, o, h in zip(group, out, lengths):
                j[2]({"scores": o, "history_len": h,
                      "store_versions": self.scorer.store_versions}, None)

    def _history_lengths(self, requests: List[ScoreRequest]) -> List[int]:
        s = self.scorer
        if s.history_store is None:
            return [0] * len(requests)
        _, length, _ = s.history_store.time_index.query(
            np.array([r.user_id for r in requests], np.int64),
            np.array([r.ts for r in requests], np.int64), s.layout.max_len,
            allow_unknown_users=True)
        return [int(x) for x in length]

    def _write(self, kind: str, payload: Any, done: Callable) -> None:
        ing, s = self.ingestor, self.scorer
        stores = {n: s.stores[n] for n in ing.store_names}
        try:
            if kind == "ingest":
                out = ing.ingest(payload, stores)
            else:
                out = ing.update_labels(payload, stores)
        except Exception as e:  # noqa: BLE001
            self._refresh()  # a failed write may have published part (one store): reopen
            done(None, e)
            return
        self._refresh()
        done(out, None)

    def submit(self, kind: str, payload: Any) -> "asyncio.Future":
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(result: Any, error: Optional[BaseException]) -> None:
            def settle() -> None:
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)
            loop.call_soon_threadsafe(settle)

        self.queue.put((kind, payload, done))
        return fut


def _log(event: str, **fields: Any) -> None:
    LOG.info(json.dumps({"event": event, "time": round(time.time(), 3), **fields},
                        default=str))


def parse_score_request(body: Any, max_candidates: int) -> ScoreRequest:
    """A :class:`ScoreRequest` from a JSON body, or :class:`RequestError` naming the field."""
    if not isinstance(body, dict):
        raise RequestError("body", "expected a JSON object with user_id, ts and candidates")
    for k in ("user_id", "ts", "candidates"):
        if body.get(k) is None:
            raise RequestError(k, "missing")
    unknown = [k for k in body if k not in ("user_id", "ts", "candidates")]
    if unknown:
        raise RequestError(unknown[0], "not a field of a score request (user_id, ts, "
                                       "candidates)")
    cands = body["candidates"]
    if not isinstance(cands, list) or not cands:
        raise RequestError("candidates", "expected a non-empty list of candidates")
    if len(cands) > max_candidates:
        raise RequestError("candidates", f"{len(cands)} candidates, at most {max_candidates} "
                                         "per request", status=413)
    return ScoreRequest(user_id=check_int(body["user_id"], "user_id"),
                        ts=check_int(body["ts"], "ts", minimum=0), candidates=cands)


def create_app(cfg: ServeConfig):
    """The FastAPI application of ``cfg`` (its worker starts with the app)."""
    worker = ScoringWorker(cfg)
    app = FastAPI(title="iat-torchrec scoring server")
    app.state.worker = worker

    @app.on_event("startup")
    async def _start() -> None:
        worker.start()

    async def body_of(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError("body", f"not valid JSON ({e})", status=400) from None

    async def handle(endpoint: str, request: Request, parse: Callable[[Any], Tuple[str, Any]],
                     sizes: Callable[[Any], Dict[str, Any]]) -> JSONResponse:
        t0 = time.perf_counter()
        status, info = 200, {}
        try:
            if not worker.ready.is_set():
                raise RequestError("server", "not ready: the bundle is still loading"
                                   if worker.failed is None else
                                   f"the bundle failed to load: {worker.failed}", status=503)
            kind, payload = parse(await body_of(request))
            info = sizes(payload)
            result = await worker.submit(kind, payload)
            response = JSONResponse(result)
        except RequestError as e:
            status = e.status
            response = JSONResponse({"detail": str(e), "field": e.field}, status_code=status)
        except Exception as e:  # noqa: BLE001
            status = 500
            response = JSONResponse({"detail": f"internal error: {e}"}, status_code=500)
        seconds = time.perf_counter() - t0
        worker.metrics.observe(endpoint, status, seconds)
        _log(endpoint, status=status, ms=round(seconds * 1e3, 3), **info,
             **({"detail": json.loads(response.body)["detail"]} if status != 200 else {}))
        return response

    def list_body(key: str, limit: int) -> Callable[[Any], Tuple[str, Any]]:
        def parse(body: Any) -> Tuple[str, Any]:
            if not isinstance(body, dict) or not isinstance(body.get(key), list):
                raise RequestError(key, f"expected a JSON object with a list {key!r}")
            if len(body[key]) > limit:
                raise RequestError(key, f"{len(body[key])} entries, at most {limit} per "
                                        "request", status=413)
            return ("ingest" if key == "instances" else "labels"), body[key]
        return parse

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        return await handle("score", request,
                            lambda b: ("score", parse_score_request(b, cfg.max_candidates)),
                            lambda r: {"user_id": r.user_id, "candidates": len(r.candidates)})

    @app.post("/ingest")
    async def ingest(request: Request) -> JSONResponse:
        return await handle("ingest", request, list_body("instances", cfg.max_ingest),
                            lambda p: {"instances": len(p)})

    @app.post("/labels")
    async def labels(request: Request) -> JSONResponse:
        return await handle("labels", request, list_body("labels", cfg.max_ingest),
                            lambda p: {"labels": len(p)})

    @app.get("/healthz")
    async def healthz() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if worker.ready.is_set():
            s = worker.scorer
            return JSONResponse({"status": "ready", "store_versions": s.store_versions,
                                 "variant": s.bundle.manifest["variant"],
                                 "labels": s.labels, "ingest": worker.ingestor.enabled})
        detail = "loading" if worker.failed is None else f"failed: {worker.failed}"
        return JSONResponse({"status": detail}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(worker.metrics.text())

    return app


def serve(cfg: ServeConfig, on_started: Optional[Callable[[int], None]] = None) -> None:
    """Run the server until interrupted; prints ``listening on http://host:port`` (the port
    chosen when ``cfg.port`` is 0) once the socket is bound."""
    import socket

    import uvicorn

    if not cfg.bundle:
        raise RequestError("--bundle", "required: the bundle directory to serve")
    Bundle.load(cfg.bundle)  # refuse a bad bundle before binding the port
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    # proto IPPROTO_TCP, not 0: asyncio then turns Nagle's algorithm off on every accepted
    # connection (a response's header and body writes would otherwise wait on delayed ACKs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    port = sock.getsockname()[1]
    print(f"listening on http://{cfg.host}:{port}", flush=True)
    if on_started is not None:
        on_started(port)
    server = uvicorn.Server(uvicorn.Config(create_app(cfg), log_level="warning",
                                           access_log=False, log_config=None))
    server.run(sockets=[sock])
