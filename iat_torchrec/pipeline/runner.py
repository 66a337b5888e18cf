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
A step that was interrupted (its record says *running* or *queued* with the same fingerprint)
keeps its checkpoint folder and resumes from it; one whose fingerprint changed starts afresh.

**One launch, many steps.** Starting a stage process costs seconds, so steps of one component
and the same resources whose inputs are all made are launched together (``group_launches``):
their configs go into one task file (:mod:`iat_torchrec.stages.tasks`, under
``<run_dir>/launches/``) that the stage app runs in order in one launch, the app itself
recording each step as running and then done. A launch killed half-way thus leaves its finished
steps done and the one in progress resumable. The launch's combined log is
``logs/launch__<first step>.log``, and each step's part of it ``logs/<step>.log``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from iat_torchrec.config import save_config, to_dict
from iat_torchrec.atomic import atomic_output
from iat_torchrec.pipeline.plan import RUNS_INDEX, PipelineConfig, Step, build_plan, runs_index
from iat_torchrec.stages.tasks import TASK_MARK, Task, now_utc, write_tasks
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
    removed: their stage reuses or re-makes them itself); ``group_launches``: launch the ready
    steps of one component together where the component takes a task file."""

    def __init__(self, run_dir: str, components: Mapping[str, Callable[..., Any]],
                 scheduler: str = "local_cwd", scheduler_cfg: Optional[Dict[str, Any]] = None,
                 owned: Optional[str] = None, log: Callable[[str], None] = print,
                 group_launches: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.group_launches = group_launches
        self.components = components
        self.scheduler = scheduler
        self.scheduler_cfg = dict(scheduler_cfg or {})
        self.owned = Path(owned) if owned else self.run_dir / "work"
        self.log = log
        self.records = self.run_dir / "steps"
        self.logs = self.run_dir / "logs"
        self.launches = self.run_dir / "launches"
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
        outside: List[float] = []  # per task-file launch: seconds outside its stages' work
        wall = time.perf_counter()
        # local_cwd runs torchrun / python from PATH: make them this environment's.
        bin_dir = str(Path(sys.executable).parent)
        if not os.environ.get("PATH", "").startswith(bin_dir + os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            with get_runner() as runner:
                done = 0
                for group in self.launch_groups(todo):
                    if self._grouped(group[0].component):
                        group_seconds, extra = self._run_group(runner, group, prints, done,
                                                               len(todo))
                        seconds.update(group_seconds)
                        outside.append(extra)
                    else:
                        seconds[group[0].name] = self._run_one(
                            runner, group[0], prints[group[0].name], f"{done + 1}/{len(todo)}")
                    done += len(group)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if outside:
            wall = time.perf_counter() - wall
            self.log(f"{len(outside)} launches in {wall:.0f} s; outside the stages' own work "
                     f"(start-up): {sum(outside):.0f} s, {sum(outside) / wall:.1%}")
        return seconds

    def _grouped(self, component: str) -> bool:
        """Whether steps of ``component`` launch together, over a task file."""
        return (self.group_launches
                and "tasks" in inspect.signature(self.components[component]).parameters)

    def launch_groups(self, todo: List[Step]) -> Iterator[List[Step]]:
        """``todo`` as launches, in an order that respects inputs: the first step whose inputs
        are all made, with (``group_launches``, a component taking a task file) every other
        such step of its component and resources."""
        pending = list(todo)
        while pending:
            waiting = {s.name for s in pending}
            ready = [s for s in pending if not waiting.intersection(s.after)]
            first = ready[0]
            group = [first]
            if self._grouped(first.component):
                group = [s for s in ready if s.component == first.component
                         and s.resources == first.resources]
            pending = [s for s in pending if s not in group]
            yield group

    def _run_group(self, runner: Any, group: List[Step], prints: Dict[str, str], done: int,
                   total: int) -> Tuple[Dict[str, float], float]:
        """Launch ``group`` as one job over a task file; returns each step's seconds and the
        launch's seconds outside them (process start-up, imports)."""
        from torchx.specs import AppState

        first = group[0]
        name = _file_name(first.name)
        tasks = []
        for step in group:
            self._clear(step, prints[step.name])
            self._write_record(step, state="queued", fingerprint=prints[step.name],
                               launch=name)
            tasks.append(Task(name=step.name, config=to_dict(step.config),
                              record=str(self._record_path(step)),
                              fields={"fingerprint": prints[step.name], "launch": name,
                                      "log": str(self._step_log(step))}))
        task_file = self.launches / f"{name}.json"
        write_tasks(task_file, tasks)
        app = self.components[first.component](tasks=str(task_file), **first.resources)
        started = time.perf_counter()
        handle = runner.run(app, scheduler=self.scheduler, cfg=self.scheduler_cfg)
        for i, step in enumerate(group, done + 1):
            self.log(f"run    {step.name} ({i}/{total}) in one launch of {len(group)} as "
                     f"{handle}")
        reported: set = set()

        def report_done() -> None:  # each stage's end as its task records it
            for step in group:
                if step.name not in reported and self.is_done(step, prints[step.name]):
                    reported.add(step.name)
                    self.log(f"done   {step.name} in {self.record(step)['seconds']:.1f} s")

        while True:
            status = runner.status(handle)
            report_done()
            if status is None or status.is_terminal():
                break
            time.sleep(0.5)
        elapsed = time.perf_counter() - started
        log_path = self._save_log(runner, handle, app.roles[0].name, f"launch__{name}")
        if log_path is not None:
            self._split_log(log_path, group)
        state = status.state if status is not None else AppState.UNKNOWN
        unfinished = [s for s in group if not self.is_done(s, prints[s.name])]
        if state != AppState.SUCCEEDED or unfinished:
            failed = unfinished[0] if unfinished else first
            self.log(f"FAILED {failed.name} after {elapsed:.0f} s in a launch of {len(group)} "
                     f"({state.name})")
            own_log = self._step_log(failed) if log_path is not None else None
            tail = _tail(own_log)
            what = state.name if state != AppState.SUCCEEDED else "SUCCEEDED without its outputs"
            raise StageFailed(failed.name, what, own_log, tail)
        seconds = {step.name: float(self.record(step)["seconds"]) for step in group}
        outside = max(elapsed - sum(seconds.values()), 0.0)
        self.log(f"launch of {len(group)} {first.component} steps took {elapsed:.1f} s, "
                 f"{outside:.1f} s of it outside the stages (process start-up, imports)")
        return seconds, outside

    def _step_log(self, step: Step) -> Path:
        return self.logs / f"{_file_name(step.name)}.log"

    def _split_log(self, log_path: Path, group: List[Step]) -> None:
        """Each step's part of a launch's log (from its task's first line to the next's)."""
        lines = log_path.read_text(errors="replace").splitlines(keepends=True)
        starts = []
        for i, step in enumerate(group, 1):
            mark = f"{TASK_MARK} {i}/{len(group)}: {step.name} ==="
            starts.append(next((j for j, line in enumerate(lines) if mark in line), None))
        for k, (step, begin) in enumerate(zip(group, starts)):
            if begin is None:
                continue
            end = next((b for b in starts[k + 1:] if b is not None), len(lines))
            with atomic_output(self._step_log(step), overwrite=True) as t:
                t.write_text("".join(lines[begin:end]))

    def _run_one(self, runner: Any, step: Step, fingerprint: str, counter: str) -> float:
        from torchx.specs import AppState

        self._clear(step, fingerprint)
        app = self.components[step.component](**step.args)
        started = time.perf_counter()
        handle = runner.run(app, scheduler=self.scheduler, cfg=self.scheduler_cfg)
        self._write_record(step, state="running", fingerprint=fingerprint, handle=handle,
                           started_at=now_utc())
        self.log(f"run    {step.name} ({counter}) as {handle}")
        status = runner.wait(handle, wait_interval=0.5)
        elapsed = time.perf_counter() - started
        log_path = self._save_log(runner, handle, app.roles[0].name, _file_name(step.name))
        state = status.state if status is not None else AppState.UNKNOWN
        if state != AppState.SUCCEEDED:
            tail = _tail(log_path)
            self.log(f"FAILED {step.name} after {elapsed:.0f} s ({state.name})")
            raise StageFailed(step.name, state.name, log_path, tail)
        missing = [p for p in step.outputs if not Path(p).exists()]
        if missing:
            raise StageFailed(step.name, "SUCCEEDED without its outputs", log_path,
                              f"missing: {missing}")
        self._write_record(step, state="done", fingerprint=fingerprint, handle=handle,
                           seconds=round(elapsed, 2), finished_at=now_utc(),
                           log=str(log_path) if log_path else None)
        self.log(f"done   {step.name} in {elapsed:.1f} s")
        return elapsed

    def _save_log(self, runner: Any, handle: str, role: str, name: str) -> Optional[Path]:
        if self.scheduler not in LOCAL_SCHEDULERS:
            return None  # the scheduler keeps the logs: torchx log <handle>
        from torchx.schedulers.api import Stream

        try:
            lines = list(runner.log_lines(handle, role, k=0, streams=Stream.COMBINED))
        except Exception as e:  # noqa: BLE001 - a missing log must not hide the stage's state
            lines = [f"(no log: {e})"]
        self.logs.mkdir(parents=True, exist_ok=True)
        path = self.logs / f"{name}.log"
        with atomic_output(path, overwrite=True) as t:
            t.write_text("".join(line if line.endswith("\n") else line + "\n"
                                 for line in lines))
        return path


def _tail(log: Optional[Path]) -> str:
    """The last lines of a saved log ("" without one)."""
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-TAIL_LINES:])


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
                            scheduler=cfg.scheduler, scheduler_cfg=options, log=log,
                            group_launches=cfg.group_launches)
    log(f"{len(steps)} stages on {cfg.scheduler} ({cfg.nnodes}x{cfg.nproc} processes per "
        f"training stage), run directory {run_dir}")
    runner.run(steps)
    return json.loads((run_dir / "summary.json").read_text())
