"""A TorchX component derived from a stage's config dataclass.

``@stage_component(CompressConfig, "apps/compress.py", ...)`` turns a documented ``def`` into a
TorchX component whose arguments are the config's settings under their dotted names
(``--model.token_dim 64``), with their defaults and help texts, plus the resources (``image``,
``cpu``, ``memMB``, and for distributed stages ``j`` and ``gpu``). Nothing is declared twice:
the component reads the dataclass. Calling it builds the config (checked by the decorated
function) and returns the ``AppDef`` that runs the app with the same flags. With ``tasks`` (a
task file, :mod:`iat_torchrec.stages.tasks`) it checks every config of the file instead and the
app runs them all in one launch.
"""

import dataclasses
import enum
import inspect
from typing import Any, Callable, Dict, List, Optional, Type

import torchx
import torchx.specs as specs
from torchx.components.dist import ddp
from torchx.components.utils import python

from iat_torchrec.config import ConfigError, Leaf, config_to_args, from_flat, leaves, plain
from iat_torchrec.stages.tasks import TASKS_HELP, load_tasks


def _resource(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Resources:
    """What a stage's processes get: the component arguments besides the stage's settings, with
    the component's defaults; ``None``: the component takes no such argument. A component with
    ``j`` launches through torchrun (``dist.ddp``), one without it as one process."""

    j: Optional[str] = _resource("1x2", "{nnodes}x{nproc_per_node}")
    cpu: int = _resource(2, "CPUs per process")
    gpu: Optional[int] = _resource(0, "GPUs per process (use 1 with --sharding.device cuda)")
    memMB: int = _resource(8192, "memory per process in MB")
    image: str = _resource(torchx.IMAGE, "image (local_cwd: the working directory)")

    @property
    def distributed(self) -> bool:
        return self.j is not None

    def offered(self) -> List[dataclasses.Field]:
        """The resource arguments this component takes."""
        return [f for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


def _annotation(leaf: Leaf) -> Any:
    item = leaf.item_type if leaf.is_sequence else leaf.type
    if isinstance(item, type) and issubclass(item, enum.Enum):
        item = str
    tp = List[item] if leaf.is_sequence else item
    return Optional[tp] if leaf.optional else tp


def _parameter(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    param = inspect.Parameter("placeholder", inspect.Parameter.KEYWORD_ONLY,
                              annotation=annotation, default=default)
    # Dotted names are not identifiers; TorchX only uses them as flag names and keyword keys.
    param._name = name  # type: ignore[attr-defined]
    return param


def component_parameters(config_cls: Type[Any],
                         resources: Resources) -> List[inspect.Parameter]:
    """The component's parameters: every setting of ``config_cls``, ``tasks``, then the
    resources."""
    params = [_parameter(leaf.name, _annotation(leaf),
                         inspect.Parameter.empty if leaf.required else plain(leaf.default))
              for leaf in leaves(config_cls)]
    params.append(_parameter("tasks", str, ""))
    return params + [_parameter(f.name, type(getattr(resources, f.name)),
                                getattr(resources, f.name)) for f in resources.offered()]


def stage_component(config_cls: Type[Any], script: str, name: str,
                    resources: Resources = Resources()) -> Callable[[Callable[..., Any]],
                                                                    Callable[..., specs.AppDef]]:
    """Decorate ``def <stage>(config) -> specs.AppDef``: its docstring's first paragraph
    describes the component, its body checks the built config (and may raise)."""

    def wrap(check: Callable[..., Any]) -> Callable[..., specs.AppDef]:
        params = component_parameters(config_cls, resources)
        offered = resources.offered()
        defaults = {p.name: p.default for p in params}

        def component(**kwargs: Any) -> specs.AppDef:
            res: Dict[str, Any] = {f.name: kwargs.pop(f.name, getattr(resources, f.name))
                                   for f in offered}
            tasks = kwargs.pop("tasks", "")
            if tasks:
                given = sorted(k for k, v in kwargs.items() if v != defaults.get(k))
                if given:
                    raise ConfigError(f"tasks={tasks} replaces the settings; got {given} too")
                for _, config in load_tasks(config_cls, tasks):
                    check(config)
                args = ["--tasks", tasks]
            else:
                config = from_flat(config_cls, kwargs)
                check(config)
                args = config_to_args(config)
            if resources.distributed:
                return ddp(*args, script=script, name=name, **res)
            return python(*args, script=script, name=name, **res)

        summary = inspect.getdoc(check) or name
        lines = [summary, "", "Args:"]
        lines += [f"    {leaf.name}: {leaf.help or leaf.name}" for leaf in leaves(config_cls)]
        lines.append(f"    tasks: {TASKS_HELP}, instead of the config the other settings make")
        lines += [f"    {f.name}: {f.metadata['help']}" for f in offered]
        component.__doc__ = "\n".join(lines)
        component.__name__ = component.__qualname__ = check.__name__
        component.__module__ = check.__module__
        component.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            params, return_annotation=specs.AppDef, __validate_parameters__=False)
        return component

    return wrap
