"""One declaration per setting: every leaf of every stage config reaches the app's flags, the
TorchX component and the pipeline under one dotted name with one default, and no two
dataclasses declare the same setting. Also the config machinery itself (flags, files)."""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import inspect
import json
import re
import shlex
from typing import Any, Dict, List, Optional, Tuple

import pytest
from torchx.specs.builders import materialize_appdef

from conftest import REPO_ROOT
from iat_torchrec.config import (ConfigError, Leaf, config_to_args, from_dict, leaves,
                                 load_config, parse_config, plain, save_config, to_dict)
from iat_torchrec.pipeline.plan import PLAN_OWNED, PipelineConfig
from iat_torchrec.stages.assemble import AssembleConfig
from iat_torchrec.stages.compress import CompressConfig
from iat_torchrec.stages.evaluate import EvaluateConfig
from iat_torchrec.stages.prepare import DataConfig
from iat_torchrec.stages.tokenize import TokenizeConfig
from iat_torchrec.stages.train import TrainDownstreamConfig
from torchx_components import components

# stage config, its app, its component, its key in PipelineConfig (None: set by the plan)
STAGES = [
    (DataConfig, "prepare_data", components.prepare_data, "data"),
    (CompressConfig, "compress", components.compress, "compress"),
    (TokenizeConfig, "tokenize_samples", components.tokenize, "tokenize"),
    (AssembleConfig, "assemble", components.assemble, "assemble"),
    (TrainDownstreamConfig, "train", components.train, "downstream"),
    (EvaluateConfig, "evaluate", components.evaluate, None),
]
IDS = [s[1] for s in STAGES]
# Names two dataclasses both use for different settings (each its own module's concept).
HOMONYMS = {
    "d0": "the tokenizer's codeword size / the SIF-Mixer's token size (checked equal at train)",
    "num_heads": "attention heads of the SIF-Mixer, BST and the IAT branch",
    "num_layers": "Transformer blocks of BST and the IAT branch",
    "ffn_mult": "FFN width of the SIF-Mixer, BST and the IAT branch",
    "dropout": "dropout of the SIF-Mixer, BST and the IAT branch",
    "position_buckets": "position embeddings of BST and the IAT branch",
    "use_gap": "time-gap embeddings of DIN and BST",
    "dense_arch_layers": "the source model's and the downstream model's dense arch",
    "embedding_dim": "the synthetic spec's field width / the downstream tables' width",
    "label_delay_s": "the synthetic spec's delay / assembly's override of a log's delay",
    "seed": "the synthetic data's seed / a training run's seed",
    "token_dim": "the source model's bottleneck / the width the downstream model expects",
    "store": "the store a stage writes / the store assembly reads",
    "overwrite": "replace a stage's store / assembly's shards",
    "output": "assembly's shards folder / what BST outputs (target token or mean)",
    "side_init_std": "initial std of the side-information embeddings of the IAT branch / of the "
                     "SIF-Mixer's recency and side encodings",
}


def _app_help(app: str, monkeypatch, capsys) -> Dict[str, str]:
    """``--<flag>`` -> its help line, from the app's own ``--help``."""
    monkeypatch.setenv("COLUMNS", "2000")  # one line per flag
    spec = importlib.util.spec_from_file_location(f"app_{app}", REPO_ROOT / "apps" / f"{app}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    options = out[out.index("\noptions:"):]
    flags = {}
    for entry in re.split(r"\n(?=  -)", options)[1:]:  # "  --flag METAVAR  help (default: x)"
        name = entry.split()[0].rstrip(",")
        flags[name] = " ".join(entry.split())
    return flags


def _declared_default(leaf: Leaf) -> Any:
    """The default the declaring dataclass itself gives the field."""
    f = {f.name: f for f in dataclasses.fields(leaf.owner)}[leaf.name.rsplit(".", 1)[-1]]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@pytest.mark.parametrize("config, app, component, key", STAGES, ids=IDS)
def test_every_setting_reaches_app_component_and_pipeline(config, app, component, key,
                                                           monkeypatch, capsys):
    stage_leaves = leaves(config)
    assert stage_leaves, config
    # The app's --help: every leaf under its dotted name, with its default.
    flags = _app_help(app, monkeypatch, capsys)
    for leaf in stage_leaves:
        line = flags.get(f"--{leaf.name}")
        assert line is not None, f"apps/{app}.py --help lacks --{leaf.name}"
        shown = "(required)" if leaf.required else f"(default: {plain(leaf.default)})"
        assert line.endswith(" ".join(f"{leaf.help} {shown}".split())), (leaf.name, line)
    assert set(flags) - {"-h", "--help", "--config"} == {f"--{leaf.name}" for leaf in stage_leaves}
    # The TorchX component: the same names and defaults, and TorchX's own argument parsing
    # hands exactly the defaults to the app.
    params = inspect.signature(component).parameters
    not_settings = {"image", "cpu", "gpu", "memMB", "j", "tasks"}
    assert set(params) - not_settings == {leaf.name for leaf in stage_leaves}
    required: List[str] = []
    for leaf in stage_leaves:
        given = params[leaf.name].default
        if leaf.required:
            assert given is inspect.Parameter.empty, leaf.name
            required += [f"--{leaf.name}", "x"]
        else:
            assert given == plain(leaf.default), leaf.name
    role = materialize_appdef(component, required).roles[0]
    argv = shlex.split(role.args[1]) if role.entrypoint == "bash" else role.args  # dist.ddp
    args = argv[[i for i, a in enumerate(argv) if a.endswith(f"apps/{app}.py")][0] + 1:]
    for leaf in stage_leaves:
        if leaf.required or leaf.default is None:
            continue
        i = args.index(f"--{leaf.name}")
        value = plain(leaf.default)
        if isinstance(value, list):
            assert args[i + 1:i + 1 + len(value)] == [str(v) for v in value], leaf.name
        else:
            assert args[i + 1] == str(value), leaf.name
    # The pipeline: every setting it does not fill itself, under <key>.<name>, same default.
    if key is not None:
        pipeline = {leaf.name: leaf for leaf in leaves(PipelineConfig)}
        owned = set(PLAN_OWNED[key])
        for leaf in stage_leaves:
            mine = pipeline[f"{key}.{leaf.name}"]
            assert mine.owner is leaf.owner and mine.help == leaf.help, leaf.name
            if leaf.name not in owned:
                assert not leaf.required, f"the pipeline cannot default {key}.{leaf.name}"
                assert mine.default == leaf.default, leaf.name
        pipeline_flags = _app_help("pipeline", monkeypatch, capsys)
        for leaf in stage_leaves:
            offered = f"--{key}.{leaf.name}" in pipeline_flags
            assert offered == (leaf.name not in owned), leaf.name


def test_no_two_dataclasses_declare_the_same_setting():
    declared: Dict[str, Dict[type, str]] = {}
    for cls in [PipelineConfig] + [s[0] for s in STAGES]:
        for leaf in leaves(cls):
            # A nested default is the nested class's own: nobody re-declares it above.
            assert plain(leaf.default) == plain(_declared_default(leaf)), (cls, leaf.name)
            declared.setdefault(leaf.name.rsplit(".", 1)[-1], {})[leaf.owner] = leaf.help
    for name, owners in declared.items():
        if len(owners) > 1:
            assert name in HOMONYMS, f"{name} is declared by {sorted(o.__name__ for o in owners)}"


# ---------------------------------------------------------------------------- the machinery
@dataclasses.dataclass
class _Inner:
    size: int = dataclasses.field(default=4, metadata={"help": "a size"})
    sizes: List[int] = dataclasses.field(default_factory=lambda: [8, 4], metadata={"help": "s"})
    cut: Tuple[int, ...] = dataclasses.field(default=(1, 2), metadata={"help": "boundaries"})


class _Mode(str, enum.Enum):
    A = "a"
    B = "b"


@dataclasses.dataclass
class _Outer:
    path: str = dataclasses.field(default="", metadata={"help": "a path"})
    mode: _Mode = dataclasses.field(default=_Mode.A, metadata={"help": "a mode"})
    flag: bool = dataclasses.field(default=False, metadata={"help": "a flag"})
    delay: Optional[int] = dataclasses.field(default=None, metadata={"help": "optional"})
    inner: _Inner = dataclasses.field(default_factory=_Inner, metadata={"help": "nested"})


def test_dotted_flags_round_trip_through_args_and_files(tmp_path):
    cfg = parse_config(_Outer, ["--inner.size", "2", "--mode", "b", "--flag",
                                "--inner.sizes", "3", "--inner.cut", "5", "9"])
    assert cfg == _Outer(mode=_Mode.B, flag=True, inner=_Inner(size=2, sizes=[3], cut=(5, 9)))
    assert parse_config(_Outer, config_to_args(cfg)) == cfg
    assert from_dict(_Outer, to_dict(cfg)) == cfg
    save_config(cfg, tmp_path / "c.json")
    assert load_config(_Outer, tmp_path / "c.json") == cfg
    # A file sets defaults, flags override it.
    (tmp_path / "part.json").write_text(json.dumps({"inner": {"size": 7}, "delay": 3}))
    again = parse_config(_Outer, ["--config", str(tmp_path / "part.json"), "--delay", "5"])
    assert again.inner.size == 7 and again.delay == 5 and again.inner.sizes == [8, 4]


def test_bad_settings_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown settings \['inner.nope'\]"):
        from_dict(_Outer, {"inner": {"nope": 1}})
    with pytest.raises(ConfigError, match="inner.size: "):
        from_dict(_Outer, {"inner": {"size": "many"}})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        parse_config(_Outer, ["--config", str(tmp_path / "bad.json")])


def test_a_finished_run_reruns_from_its_config_file(tmp_path):
    cfg = parse_config(PipelineConfig, ["--config", str(REPO_ROOT / "experiments" / "main.json"),
                                        "--seeds", "4"])
    save_config(cfg, tmp_path / "config.json")
    assert load_config(PipelineConfig, tmp_path / "config.json") == cfg
    assert parse_config(PipelineConfig, ["--config", str(tmp_path / "config.json")]) == cfg
    assert cfg.downstream.model.item_history_len == 128 and cfg.seeds == [4]
