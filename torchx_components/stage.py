"""A TorchX component derived from a stage's config dataclass.

``@stage_component(CompressConfig, "apps/compress.py", ...)`` turns a documented ``def`` into a
TorchX component whose arguments are the config's settings under their dotted names
(``--model.token_dim 64``), with their defaults and help texts, plus the resources (``image``,
``cpu``, ``memMB``, and for distributed stages ``j`` and ``gpu``). Nothing is declared twice:
the component reads the dataclass. Calling it builds the config (checked by the decorated
function) and returns the ``AppDef`` that runs the app with the same flags.
"""

import dataclasses
import enum
import inspect
from typing import Any, Callable, Dict, List, Optional, Type

import torchx
import torchx.specs as specs
from torchx.components.dist import ddp
from torchx.components.utils import python

from iat_torchrec.config import Leaf, config_to_args, from_flat, leaves, plain


@dataclasses.dataclass(frozen=True)
class Resources:
    """What a stage's processes get (the component arguments besides the stage's settings)."""

    j: Optional[str] = "1x2"  # None: the component takes no such argument
    cpu: int = 2
    gpu: Optional[int] = 0
    memMB: int = 8192
    image: str = torchx.IMAGE


RESOURCE_HELP = {
    "j": "{nnodes}x{nproc_per_node}",
    "cpu": "CPUs per process",
    "gpu": "GPUs per process (use 1 with --sharding.device cuda)",
    "memMB": "memory per process in MB",
    "image": "image (local_cwd: the working directory)",
}


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


def component_parameters(config_cls: Type[Any], resources: Resources,
                         distributed: bool) -> List[inspect.Parameter]:
    """The component's parameters: every setting of ``config_cls``, then the resources."""
    params = [_parameter(leaf.name, _annotation(leaf),
                         inspect.Parameter.empty if leaf.required else plain(leaf.default))
              for leaf in leaves(config_cls)]
    for f in dataclasses.fields(Resources):
        value = getattr(resources, f.name)
        if value is not None and (distributed or f.name not in ("j", "gpu")):
            params.append(_parameter(f.name, type(value), value))
    return params


def stage_component(config_cls: Type[Any], script: str, name: str, distributed: bool,
                    resources: Resources = Resources()) -> Callable[[Callable[..., Any]],
                                                                    Callable[..., specs.AppDef]]:
    """Decorate ``def <stage>(config) -> specs.AppDef``: its docstring's first paragraph
    describes the component, its body checks the built config (and may raise)."""

    def wrap(check: Callable[..., Any]) -> Callable[..., specs.AppDef]:
        params = component_parameters(config_cls, resources, distributed)
        resource_names = [p.name for p in params[len(leaves(config_cls)):]]

        def component(**kwargs: Any) -> specs.AppDef:
            res: Dict[str, Any] = {k: kwargs.pop(k, getattr(resources, k))
                                   for k in resource_names}
            config = from_flat(config_cls, kwargs)
            check(config)
            args = config_to_args(config)
            if distributed:
                return ddp(*args, script=script, name=name, **res)
            return python(*args, script=script, name=name, **res)

        summary = inspect.getdoc(check) or name
        lines = [summary, "", "Args:"]
        lines += [f"    {leaf.name}: {leaf.help or leaf.name}" for leaf in leaves(config_cls)]
        lines += [f"    {n}: {RESOURCE_HELP[n]}" for n in resource_names]
        component.__doc__ = "\n".join(lines)
        component.__name__ = component.__qualname__ = check.__name__
        component.__module__ = check.__module__
        component.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            params, return_annotation=specs.AppDef, __validate_parameters__=False)
        return component

    return wrap
