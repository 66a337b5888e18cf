"""Typed configuration: every setting is one dataclass field, reached everywhere by a dotted name.

A config is a dataclass whose fields are leaves (int, float, str, bool, an Enum, a list or tuple
of those, optionally ``Optional``) or nested configs. Each leaf has one dotted name
(``model.mixer.num_blocks``), one default and one help text (``metadata={"help": ...}``), and
everything else is derived from that declaration:

- :func:`parse_config`: the command line (``--model.mixer.num_blocks 4``), with ``--config
  FILE`` reading a JSON file of the same nested shape first (flags override it);
- :func:`config_to_args`: the flags that reproduce a config (what a TorchX component passes to
  its app);
- :func:`leaves`: every leaf with its dotted name, type, default and help (what the TorchX
  components and the pipeline build their arguments from);
- :func:`to_dict` / :func:`from_dict` / :func:`save_config` / :func:`load_config`: the nested
  JSON form, which records every setting of a run.

Example::

    @dataclasses.dataclass
    class Mixer:
        num_blocks: int = dataclasses.field(default=4, metadata={"help": "blocks"})

    @dataclasses.dataclass
    class Stage:
        mixer: Mixer = dataclasses.field(default_factory=Mixer)

    cfg = parse_config(Stage, ["--mixer.num_blocks", "2"])   # Stage(mixer=Mixer(num_blocks=2))
    config_to_args(cfg)                                       # ["--mixer.num_blocks", "2"]
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, TypeVar, Union

from iat_torchrec.atomic import atomic_output

T = TypeVar("T")
MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration value or file that does not fit its dataclass."""


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One setting: its dotted ``name``, Python type (Optional stripped), ``default``
    (:data:`MISSING` when required), ``help`` and the dataclass that declares it."""

    name: str
    type: Any
    default: Any
    help: str
    owner: type
    optional: bool

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def is_sequence(self) -> bool:
        return typing.get_origin(self.type) in (list, tuple)

    @property
    def item_type(self) -> Any:
        """The element type of a list / tuple leaf."""
        return typing.get_args(self.type)[0]


def _strip_optional(tp: Any) -> tuple:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _declaring_class(cls: type, name: str) -> type:
    for base in cls.__mro__:
        if name in getattr(base, "__annotations__", {}):
            return base
    return cls


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def leaves(cls: Type[Any], prefix: str = "") -> List[Leaf]:
    """Every leaf setting of the config class ``cls``, depth first in field order."""
    hints = typing.get_type_hints(cls)
    out: List[Leaf] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _strip_optional(hints[f.name])
        name = f"{prefix}{f.name}"
        if is_config(tp):
            default = _field_default(f)
            sub = leaves(tp, name + ".")
            if default is not MISSING and default is not None:
                # A nested default comes from the nested class itself: it is declared there.
                sub = [dataclasses.replace(leaf, default=_get(default, leaf.name[len(name) + 1:]))
                       for leaf in sub]
            out += sub
        else:
            out.append(Leaf(name, tp, _field_default(f), f.metadata.get("help", ""),
                            _declaring_class(cls, f.name), optional))
    return out


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


# --------------------------------------------------------------------------- values
def _parse_bool(s: Union[str, bool]) -> bool:
    if isinstance(s, bool):
        return s
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _scalar(tp: Any, value: Any, name: str) -> Any:
    try:
        if tp is bool:
            return _parse_bool(value)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return tp(value)
        if tp is float and isinstance(value, (int, float, str)):
            return float(value)
        if tp is int and isinstance(value, (int, str)) and not isinstance(value, bool):
            return int(value)
        if tp is str:
            return str(value)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{name}: {e}") from None
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{name}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def coerce(leaf: Leaf, value: Any) -> Any:
    """``value`` (from JSON, a flag or a component argument) as the leaf's type."""
    if value is None:
        if leaf.optional:
            return None
        raise ConfigError(f"{leaf.name}: a value is required")
    if leaf.is_sequence:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        items = [_scalar(leaf.item_type, v, leaf.name) for v in value]
        return tuple(items) if typing.get_origin(leaf.type) is tuple else items
    return _scalar(leaf.type, value, leaf.name)


def nested(cls: Type[Any], help: str) -> Any:
    """The field of a nested config: ``model: SourceModelConfig = nested(SourceModelConfig,
    "the source model")`` (its settings keep the nested class's own defaults)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def plain(value: Any) -> Any:
    """``value`` as JSON would hold it (enums by value, tuples as lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def to_flat(config: Any) -> Dict[str, Any]:
    """``{dotted name: JSON value}`` of every leaf of ``config``."""
    return {leaf.name: plain(_get(config, leaf.name)) for leaf in leaves(type(config))}


def from_flat(cls: Type[T], flat: Mapping[str, Any]) -> T:
    """Build ``cls`` from ``{dotted name: value}``; missing leaves take their defaults, unknown
    names are an error."""
    known = {leaf.name: leaf for leaf in leaves(cls)}
    unknown = sorted(set(flat) - set(known))
    if unknown:
        raise ConfigError(f"unknown settings {unknown} for {cls.__name__}")
    return _build(cls, _nest({name: coerce(known[name], v) for name, v in flat.items()}), "")


def _nest(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (the inverse of :func:`flatten`)."""
    out: Dict[str, Any] = {}
    for name, value in flat.items():
        *parents, last = name.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _build(cls: Type[T], values: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in values:
            continue
        tp, _ = _strip_optional(hints[f.name])
        value = values[f.name]
        kwargs[f.name] = (_build(tp, value, f"{prefix}{f.name}.") if is_config(tp)
                          else value)
    missing = [f"{prefix}{f.name}" for f in dataclasses.fields(cls)
               if f.init and f.name not in kwargs and _field_default(f) is MISSING]
    if missing:
        raise ConfigError(f"{cls.__name__}: required settings {missing} are not given")
    return cls(**kwargs)


def to_dict(config: Any) -> Dict[str, Any]:
    """The nested JSON form of ``config`` (every setting)."""
    return _nest(to_flat(config))


def flatten(nested: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: Dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def from_dict(cls: Type[T], nested: Mapping[str, Any]) -> T:
    """Build ``cls`` from its nested JSON form (missing settings take their defaults)."""
    return from_flat(cls, flatten(nested))


def save_config(config: Any, path: Union[str, Path]) -> None:
    """Write every setting of ``config`` as JSON (atomically)."""
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(to_dict(config), indent=2) + "\n")


def load_config(cls: Type[T], path: Union[str, Path]) -> T:
    """Read a config file written by :func:`save_config` (or by hand, any subset)."""
    return from_dict(cls, read_config_file(path))


def read_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings")
    return data


# --------------------------------------------------------------------------- command line
def add_config_arguments(parser: argparse.ArgumentParser, cls: Type[Any],
                         defaults: Optional[Mapping[str, Any]] = None,
                         prefix: str = "", exclude: Sequence[str] = ()) -> None:
    """One ``--<dotted name>`` flag per leaf of ``cls`` (``defaults``: values replacing the
    declared defaults, e.g. from a config file; ``exclude``: leaves not offered)."""
    defaults = defaults or {}
    for leaf in leaves(cls):
        if leaf.name in exclude:
            continue
        default = defaults.get(leaf.name, leaf.default)
        required = default is MISSING
        shown = None if required else plain(default)
        kwargs: Dict[str, Any] = {"help": f"{leaf.help} (default: {shown})" if not required
                                  else f"{leaf.help} (required)",
                                  "required": required, "dest": prefix + leaf.name}
        if not required:
            kwargs["default"] = default
        if leaf.is_sequence:
            item = leaf.item_type
            kwargs.update(nargs="*", type=_flag_type(item))
        elif leaf.type is bool:
            kwargs.update(type=_parse_bool, metavar="{true,false}", nargs="?", const=True)
        elif isinstance(leaf.type, type) and issubclass(leaf.type, enum.Enum):
            kwargs.update(type=str, choices=[e.value for e in leaf.type])
            if not required:
                kwargs["default"] = plain(default)
        else:
            kwargs["type"] = leaf.type
        parser.add_argument(f"--{prefix}{leaf.name}", **kwargs)


def _flag_type(tp: Any) -> Any:
    return _parse_bool if tp is bool else tp


def parse_config(cls: Type[T], argv: Optional[Sequence[str]] = None,
                 description: Optional[str] = None, exclude: Sequence[str] = ()) -> T:
    """Parse ``argv`` into ``cls``: ``--config FILE`` (JSON, nested like :func:`to_dict`) sets
    defaults, the dotted flags override them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    file_values: Dict[str, Any] = {}
    if known.config:
        file_values = flatten(read_config_file(known.config))
        by_name = {leaf.name: leaf for leaf in leaves(cls)}
        unknown = sorted(set(file_values) - set(by_name))
        if unknown:
            raise ConfigError(f"{known.config}: unknown settings {unknown} for {cls.__name__}")
        file_values = {k: coerce(by_name[k], v) for k, v in file_values.items()}
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip())
    parser.add_argument("--config", default="", help="JSON file of settings (nested like the "
                        "flags' dotted names); flags given as well override it")
    add_config_arguments(parser, cls, file_values, exclude=exclude)
    ns = vars(parser.parse_args(argv))
    ns.pop("config")
    return from_flat(cls, ns)


def config_to_args(config: Any) -> List[str]:
    """The command-line flags that reproduce ``config`` (``None`` leaves are left out)."""
    args: List[str] = []
    for name, value in to_flat(config).items():
        if value is None:
            continue
        if isinstance(value, list):
            args += [f"--{name}", *map(str, value)]
        else:
            args += [f"--{name}", str(value)]
    return args
