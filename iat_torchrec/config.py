"""Typed configuration: one dataclass per stage, with the same names on the command line.

``parse_config(MyConfig, argv)`` builds an argparse parser whose flags are the dataclass fields
(``--num_users 1000``), typed and documented from the dataclass, so the library, the apps and the
TorchX components share one set of names.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import typing
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

T = TypeVar("T")


def _base_type(tp: Any) -> Any:
    """Strip Optional[...] from a type hint."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def field_help(cls: Type[Any]) -> Dict[str, str]:
    """Per-field help text from ``metadata={"help": ...}``."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def add_config_arguments(parser: argparse.ArgumentParser, cls: Type[Any]) -> None:
    """Add one ``--<field>`` flag per dataclass field of ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else None)
        required = default is None and f.default is dataclasses.MISSING \
            and f.default_factory is dataclasses.MISSING
        kwargs: Dict[str, Any] = {"help": f"{f.metadata.get('help', '')} (default: {default})",
                                  "required": required}
        if not required:
            kwargs["default"] = default
        origin = typing.get_origin(tp)
        if origin in (list, List, tuple, Sequence):
            (item,) = typing.get_args(tp)[:1]
            kwargs.update(nargs="*", type=item)
        elif tp is bool:
            kwargs.update(type=_parse_bool, metavar="{true,false}", nargs="?", const=True)
        elif isinstance(tp, type) and issubclass(tp, enum.Enum):
            kwargs.update(type=tp, choices=list(tp))
        else:
            kwargs["type"] = tp
        parser.add_argument(f"--{f.name}", **kwargs)


def parse_config(cls: Type[T], argv: Optional[Sequence[str]] = None,
                 description: Optional[str] = None) -> T:
    """Parse ``argv`` into an instance of the dataclass ``cls``."""
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip())
    add_config_arguments(parser, cls)
    ns = parser.parse_args(argv)
    return cls(**vars(ns))


def config_to_args(config: Any) -> List[str]:
    """The command-line flags that reproduce ``config`` (used by TorchX components)."""
    args: List[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            args += [f"--{f.name}", *map(str, value)]
        elif isinstance(value, enum.Enum):
            args += [f"--{f.name}", str(value.value)]
        else:
            args += [f"--{f.name}", str(value)]
    return args
