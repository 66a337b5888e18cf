"""Run a plan's steps one after another as TorchX jobs, skipping those already made.

Each step is launched through TorchX's runner API (``torchx.runner.get_runner``) on the
configured scheduler and waited for. Its combined log is saved as ``<run_dir>/logs/<step>.log``
(local schedulers); the first step that does not succeed stops the run, with the tail of its log
printed and :class:`StageFailed` raised.

**Skipping.** A step's *fingerprint* hashes its component, its arguments (resources that do not
change what it makes aside) and the fingerprints of the steps it reads from. After a step
succeeds, ``<run_dir>/steps/<step>.json`` records that fingerprint. On a re-run a step is skipped
when that record says *done* with the same fingerprint and every output exists; otherwise its
outputs are removed and it runs again, so anything downstream of a changed step is re-made too.
A step that was interrupted (its record says *running* with the same fingerprint) keeps its
checkpoint folder and resumes from it; one whose fingerprint changed starts afresh.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from iat_torchrec.config import save_config
from iat_torchrec.data.atomic import atomic_output
from iat_torchrec.pipeline.plan import RUNS_INDEX, PipelineConfig, Step, build_plan, runs_index
from torchx_components import components

# Arguments that do not change what a step makes.
NOT_IN_FINGERPRINT = ("image", "cpu", "memMB", "train.log_every")
LOCAL_SCHEDULERS = ("local_cwd", "local_docker")
TAIL_LINES = 60


class StageFailed(RuntimeError):
    """A pipeline stage that did not succeed; ``log`` is its saved log (if any)."""

    def __init__(self, step: str, state: str, log: Optional[Path], tail: str) -> None:
        where = f"; its log: {log}" if log else ""
        super().__init__(f"stage {step} {state}{where}\n{tail}")
        self.step, self.state, self.log = step, state, log


def fingerprints(steps: List[Step]) -> Dict[str, str]:
    """Each step's fingerprint (see the module docstring)."""
    out: Dict[str, str] = {}
    for step in steps:
        missing = [a for a in step.after if a not in out]
        if missing:
            raise ValueError(f"step {step.name} reads {missing}, which are not planned before it")
        args = {k: v for k, v in step.args.items() if k not in NOT_IN_FINGERPRINT}
        payload = json.dumps({"component": step.component, "args": args,
                              "after": [out[a] for a in step.after]}, sort_keys=True, default=str)
        out[step.name] = hashlib.sha1(payload.encode()).hexdigest()
    return out


def _file_name(step: str) -> str:
    return step.replace("/", "__").replace(" ", "_")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class PipelineRunner:
    """Launches steps through TorchX (``scheduler``, run options ``scheduler_cfg``) and keeps
    their records and logs under ``run_dir``. ``components`` maps a step's component name to
    the function that makes its AppDef; ``owned`` is the folder whose contents the runner may
    delete to re-make a step (outputs elsewhere, e.g. shared prepared data, are never
    removed: their stage reuses or re-makes them itself)."""

    def __init__(self, run_dir: str, components: Mapping[str, Callable[..., Any]],
                 scheduler: str = "local_cwd", scheduler_cfg: Optional[Dict[str, Any]] = None,
                 owned: Optional[str] = None, log: Callable[[str], None] = print) -> None:
        self.run_dir = Path(run_dir)
        self.components = components
        self.scheduler = scheduler
        self.scheduler_cfg = dict(scheduler_cfg or {})
        self.owned = Path(owned) if owned else self.run_dir / "work"
        self.log = log
        self.records = self.run_dir / "steps"
        self.logs = self.run_dir / "logs"
        if scheduler in LOCAL_SCHEDULERS:
            self.scheduler_cfg.setdefault("log_dir", str(self.logs / "torchx"))

    # ------------------------------------------------------------------ records
    def _record_path(self, step: Step) -> Path:
        return self.records / f"{_file_name(step.name)}.json"

    def record(self, step: Step) -> Optional[Dict[str, Any]]:
        path = self._record_path(step)
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write_record(self, step: Step, **fields: Any) -> None:
        self.records.mkdir(parents=True, exist_ok=True)
        with atomic_output(self._record_path(step), overwrite=True) as t:
            t.write_text(json.dumps({"step": step.name, **fields}, indent=2) + "\n")

    def is_done(self, step: Step, fingerprint: str) -> bool:
        rec = self.record(step)
        return (rec is not None and rec.get("state") == "done"
                and rec.get("fingerprint") == fingerprint
                and all(Path(p).exists() for p in step.outputs))

    def _owned(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.owned.resolve())
            return True
        except ValueError:
            return False

    def _clear(self, step: Step, fingerprint: str) -> None:
        """Remove what a previous attempt left: its outputs, and its checkpoints unless that
        attempt ran with this very fingerprint (then the stage resumes from them)."""
        rec = self.record(step)
        for p in map(Path, step.outputs):
            if self._owned(p):
                _remove(p)
        if step.checkpoint_dir and (rec is None or rec.get("fingerprint") != fingerprint):
            ckpt = Path(step.checkpoint_dir)
            if self._owned(ckpt):
                _remove(ckpt)

    # ------------------------------------------------------------------ running
    def run(self, steps: List[Step]) -> Dict[str, float]:
        """Run (or skip) every step in order; returns the seconds each step that ran took.
        Raises :class:`StageFailed` at the first stage that does not succeed."""
        from torchx.runner import get_runner

        prints = fingerprints(steps)
        todo = [s for s in steps if not self.is_done(s, prints[s.name])]
        for s in steps:
            if s not in todo:
                self.log(f"skip   {s.name} (done, inputs unchanged)")
        seconds: Dict[str, float] = {}
        if not todo:
            return seconds
        # local_cwd runs torchrun / python from PATH: make them this environment's.
        bin_dir = str(Path(sys.executable).parent)
        if not os.environ.get("PATH", "").startswith(bin_dir + os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            with get_runner() as runner:
                for i, step in enumerate(todo, 1):
                    seconds[step.name] = self._run_one(runner, step, prints[step.name],
                                                       f"{i}/{len(todo)}")
        finally:
            signal.signal(signal.SIGTERM, previous)
        return seconds

    def _run_one(self, runner: Any, step: Step, fingerprint: str, counter: str) -> float:
        from torchx.specs import AppState

        self._clear(step, fingerprint)
        app = self.components[step.component](**step.args)
        started = time.perf_counter()
        handle = runner.run(app, scheduler=self.scheduler, cfg=self.scheduler_cfg)
        self._write_record(step, state="running", fingerprint=fingerprint, handle=handle,
                           started_at=_now())
        self.log(f"run    {step.name} ({counter}) as {handle}")
        status = runner.wait(handle, wait_interval=0.5)
        elapsed = time.perf_counter() - started
        log_path = self._save_log(runner, handle, app.roles[0].name, step)
        state = status.state if status is not None else AppState.UNKNOWN
        if state != AppState.SUCCEEDED:
            tail = ""
            if log_path is not None:
                lines = log_path.read_text(errors="replace").splitlines()
                tail = "\n".join(lines[-TAIL_LINES:])
            self.log(f"FAILED {step.name} after {elapsed:.0f} s ({state.name})")
            raise StageFailed(step.name, state.name, log_path, tail)
        missing = [p for p in step.outputs if not Path(p).exists()]
        if missing:
            raise StageFailed(step.name, "SUCCEEDED without its outputs", log_path,
                              f"missing: {missing}")
        self._write_record(step, state="done", fingerprint=fingerprint, handle=handle,
                           seconds=round(elapsed, 2), finished_at=_now(),
                           log=str(log_path) if log_path else None)
        self.log(f"done   {step.name} in {elapsed:.1f} s")
        return elapsed

    def _save_log(self, runner: Any, handle: str, role: str, step: Step) -> Optional[Path]:
        if self.scheduler not in LOCAL_SCHEDULERS:
            return None  # the scheduler keeps the logs: torchx log <handle>
        from torchx.schedulers.api import Stream

        try:
            lines = list(runner.log_lines(handle, role, k=0, streams=Stream.COMBINED))
        except Exception as e:  # noqa: BLE001 - a missing log must not hide the stage's state
            lines = [f"(no log: {e})"]
        self.logs.mkdir(parents=True, exist_ok=True)
        path = self.logs / f"{_file_name(step.name)}.log"
        with atomic_output(path, overwrite=True) as t:
            t.write_text("".join(line if line.endswith("\n") else line + "\n"
                                 for line in lines))
        return path


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _absolute(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with every path absolute (the stages run with the repository as their working
    directory, the caller may be elsewhere)."""
    named = ("synthetic", "movielens")
    data = dataclasses.replace(cfg.data, data_dir=str(Path(cfg.data.data_dir).resolve()),
                               movielens_source=str(Path(cfg.data.movielens_source).resolve()))
    return dataclasses.replace(
        cfg, run_dir=str(Path(cfg.run_dir).resolve()), data=data,
        datasets=[d if d in named else str(Path(d).resolve()) for d in cfg.datasets])


def run_pipeline(cfg: PipelineConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Plan, run (or resume) and evaluate the whole pipeline of ``cfg`` through TorchX; returns
    the evaluation's ``summary.json`` content. Raises :class:`StageFailed` at the first stage
    that fails (its log is printed)."""
    cfg = _absolute(cfg)
    cfg.check()
    repo = Path(components.__file__).resolve().parents[1]
    os.chdir(repo)  # components name their apps relative to the repository (local_cwd's image)
    steps = build_plan(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(run_dir / RUNS_INDEX, overwrite=True) as t:
        t.write_text(json.dumps(runs_index(cfg), indent=2) + "\n")
    save_config(cfg, run_dir / "config.json")
    options = dict(a.split("=", 1) for a in cfg.scheduler_args)
    runner = PipelineRunner(str(run_dir), {s.component: getattr(components, s.component)
                                           for s in steps},
                            scheduler=cfg.scheduler, scheduler_cfg=options, log=log)
    log(f"{len(steps)} stages on {cfg.scheduler} ({cfg.nnodes}x{cfg.nproc} processes per "
        f"training stage), run directory {run_dir}")
    runner.run(steps)
    return json.loads((run_dir / "summary.json").read_text())
