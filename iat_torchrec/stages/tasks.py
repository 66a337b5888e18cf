"""Several runs of one stage in one launch: the task file.

Starting a stage process (Python, torch and torchrec imports; torchrun's rendezvous) costs
seconds, more than the work of many runs. So one launch of a stage can run a list of configs in
order, in the same processes: ``apps/<stage>.py --tasks FILE`` (the TorchX components take
``--tasks`` too). The file is JSON::

    {"tasks": [{"name": "synthetic/seed0/train_DLRM",
                "config": {...every setting, nested like --config...},
                "record": ".../steps/synthetic__seed0__train_DLRM.json",
                "fields": {"fingerprint": "..."}},
               ...]}

Every rank of a torchrun job runs the same list, so the runs' collectives pair up. Each task's
output starts with the line ``=== task i/n: <name> ===`` (:data:`TASK_MARK`). When a task has a
``record`` path, rank 0 writes it (atomically) as ``fields`` plus ``state: running`` and
``started_at`` when the task starts, and ``state: done``, ``seconds`` and ``finished_at`` once it
has returned: a launch killed half-way leaves the finished tasks recorded as done and the one in
progress as running (resumable from its checkpoints). The pipeline's runner
(:mod:`iat_torchrec.pipeline.runner`) writes these files and reads these records.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple, Type, TypeVar, Union

from iat_torchrec.config import ConfigError, from_dict
from iat_torchrec.atomic import atomic_output

C = TypeVar("C")
TASK_MARK = "=== task"
TASKS_HELP = ("a task file (iat_torchrec.stages.tasks): run each of its configs, in order, in "
              "this one launch")


@dataclasses.dataclass
class Task:
    """One run of a stage: its ``name``, its settings (nested, as :func:`~iat_torchrec.config.
    to_dict` writes them) and the record kept for it (``record`` path, ``fields``)."""

    name: str
    config: Dict[str, Any]
    record: str = ""
    fields: Dict[str, Any] = dataclasses.field(default_factory=dict)


def write_tasks(path: Union[str, Path], tasks: List[Task]) -> None:
    """Write a task file (atomically)."""
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps({"tasks": [dataclasses.asdict(t) for t in tasks]},
                                  indent=2) + "\n")


def read_tasks(path: Union[str, Path]) -> List[Task]:
    """The tasks of a task file; a clear error naming the file for anything else."""
    try:
        data = json.loads(Path(path).read_text())
        tasks = [Task(**t) for t in data["tasks"]]
    except FileNotFoundError:
        raise ConfigError(f"{path}: task file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: expected {{\"tasks\": [{{\"name\", \"config\", "
                          f"\"record\", \"fields\"}}, ...]}} ({e})") from None
    if not tasks:
        raise ConfigError(f"{path}: the task file lists no task")
    return tasks


def load_tasks(config_cls: Type[C], path: Union[str, Path]) -> List[Tuple[Task, C]]:
    """Every task of the file with its config, built (and so checked) before any of them
    runs."""
    out = []
    for task in read_tasks(path):
        try:
            out.append((task, from_dict(config_cls, task.config)))
        except ConfigError as e:
            raise ConfigError(f"{path}: task {task.name}: {e}") from None
    return out


def now_utc() -> str:
    """The time now (UTC, ISO-8601 in seconds), as records hold it."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_record(task: Task, **fields: Any) -> None:
    with atomic_output(task.record, overwrite=True) as tmp:
        tmp.write_text(json.dumps({"step": task.name, **task.fields, **fields}, indent=2)
                       + "\n")


def run_tasks(config_cls: Type[C], run: Callable[[C], Any], path: Union[str, Path]) -> None:
    """Run every task of the file at ``path`` in order (see the module docstring)."""
    tasks = load_tasks(config_cls, path)
    is_main = int(os.environ.get("RANK", "0")) == 0
    for i, (task, config) in enumerate(tasks, 1):
        print(f"{TASK_MARK} {i}/{len(tasks)}: {task.name} ===", flush=True)
        started, started_at = time.perf_counter(), now_utc()
        if is_main and task.record:
            _write_record(task, state="running", started_at=started_at)
        run(config)
        if is_main and task.record:
            _write_record(task, state="done", started_at=started_at, finished_at=now_utc(),
                          seconds=round(time.perf_counter() - started, 2))
