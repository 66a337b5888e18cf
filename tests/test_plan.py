"""Sharding plans on paper (apps/plan.py): the industrial example plans in time within every
device's HBM and DDR, tables that cannot be placed are named with the reason (exit 2), UVM
caching takes tables larger than HBM, a feature spec's tables are all placed, and the saved JSON
rebuilds TorchRec's own ParameterSharding of every table."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import time

import pytest
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import CacheParams, ParameterSharding
from torchx.specs.builders import materialize_appdef

from conftest import REPO_ROOT
from iat_torchrec.config import leaves, parse_config
from iat_torchrec.data.synthetic import SyntheticConfig, feature_spec
from iat_torchrec.distributed.plan import (ClusterDescription, ModelDescription, PlanConfig,
                                           PlanError, PlanResult, TokenStoreDescription,
                                           parse_table_group, plan_sharding, write_plan)
from iat_torchrec.models.dlrm_sif import DLRMSIFConfig, embedding_tables
from torchx_components import components

INDUSTRIAL = REPO_ROOT / "experiments" / "plan_industrial.json"


def _small_cluster(**kw) -> ClusterDescription:
    return ClusterDescription(hosts=1, devices_per_host=2, **kw)


def _every_table_accounted_for(result: PlanResult, names) -> None:
    placed = [p.table.name for p in result.tables]
    unplaced = [u.table.name for u in result.unplaced]
    assert sorted(placed + unplaced) == sorted(names)
    assert not set(placed) & set(unplaced)
    assert all(u.reason for u in result.unplaced)


def _within_capacity(result: PlanResult) -> None:
    for d in result.devices:
        assert d.hbm <= d.hbm_for_tables <= d.hbm_capacity, d
        assert d.ddr <= d.ddr_for_tables <= d.ddr_capacity, d


def _rebuilt(entry) -> ParameterSharding:
    """A table's ParameterSharding from the saved JSON alone (how a stage would load it)."""
    return ParameterSharding(
        sharding_type=entry["sharding_type"], compute_kernel=entry["compute_kernel"],
        ranks=entry["ranks"],
        sharding_spec=EnumerableShardingSpec([
            ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"],
                          placement=s["placement"]) for s in entry["shards"]]),
        cache_params=CacheParams(load_factor=entry["cache_load_factor"]))


@pytest.fixture(scope="module")
def industrial(tmp_path_factory):
    config = parse_config(PlanConfig, ["--config", str(INDUSTRIAL)])
    start = time.perf_counter()
    result = plan_sharding(config)
    seconds = time.perf_counter() - start
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    write_plan(result, str(out))
    return config, result, seconds, json.loads(out.read_text())


def test_industrial_example_plans_in_time_within_every_device(industrial):
    config, result, seconds, saved = industrial
    assert seconds < 120, seconds  # ~10 s on the 2-core build machine
    assert config.cluster.world_size == 64 and config.tokens.num_instances == 10 ** 9
    names = [f"{band}_{i}" for band, n in [("small", 200), ("medium", 70), ("large", 24),
                                           ("huge", 6)] for i in range(n)] + ["iat_tokens"]
    _every_table_accounted_for(result, names)
    _within_capacity(result)
    assert len(result.devices) == 64 and result.max_perf_ms > 0
    # Every placed table is covered by its shards, each on a rank of the cluster.
    for p in result.tables:
        assert sum(s["sizes"][0] * s["sizes"][1] for s in p.shards) == (
            p.table.rows * p.table.planned_as[1])
        assert all(0 <= r < 64 for r in p.ranks)
    # The saved plan is complete: it rebuilds TorchRec's own ParameterSharding of every table.
    assert len(saved["tables"]) == len(result.tables)
    for entry in saved["tables"]:
        mine = result.plan.plan[entry["module"]][entry["name"]]
        rebuilt = _rebuilt(entry)
        assert (rebuilt.sharding_type, rebuilt.compute_kernel, rebuilt.ranks) == (
            mine.sharding_type, mine.compute_kernel, mine.ranks)
        assert rebuilt.sharding_spec.shards == mine.sharding_spec.shards
        assert rebuilt.cache_params == mine.cache_params
    assert [d["hbm"] for d in saved["devices"]] == [d.hbm for d in result.devices]


def test_a_table_larger_than_the_cluster_is_named_with_exit_code_2(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "apps" / "plan.py"),
         "--model.tables", "rows=100M dim=128 name=big", "count=3 rows=1K..1M dim=16 name=small",
         "--cluster.hosts", "1", "--cluster.devices_per_host", "2", "--cluster.hbm_gb", "1",
         "--cluster.ddr_gb_per_host", "4", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: 1 of 4 tables do not fit") and "big" in line
    (report,) = [x for x in proc.stdout.splitlines() if x.startswith("DOES NOT FIT")]
    assert report.startswith("DOES NOT FIT big (100,000,000 x 128 fp32): larger than the whole "
                             "cluster"), report
    saved = json.loads(out.read_text())
    assert [u["name"] for u in saved["unplaced"]] == ["big"]
    assert [t["name"] for t in saved["tables"]] == ["small_0", "small_1", "small_2"]


def test_uvm_caching_beyond_hbm_and_tables_that_fit_only_apart():
    # 4.8 GB tables on devices of 2 GB HBM: host memory behind an HBM cache.
    config = PlanConfig(model=ModelDescription(tables=["count=2 rows=20M dim=64 name=t"]),
                        cluster=_small_cluster(hbm_gb=2, ddr_gb_per_host=16))
    result = plan_sharding(config)
    assert [p.compute_kernel for p in result.tables] == ["fused_uvm_caching"] * 2
    assert all(p.cache_load_factor == 0.2 for p in result.tables)
    assert not result.unplaced and all(d.ddr > 0 for d in result.devices)
    _within_capacity(result)
    # Six fit alone but only three together: the other three are named, none is lost.
    config = PlanConfig(model=ModelDescription(tables=["count=6 rows=10M dim=64 name=t"]),
                        cluster=_small_cluster(hbm_gb=2, ddr_gb_per_host=8))
    result = plan_sharding(config)
    _every_table_accounted_for(result, [f"t_{i}" for i in range(6)])
    assert len(result.tables) == 3
    assert all(u.reason.startswith("does not fit beside the others") for u in result.unplaced)
    _within_capacity(result)


def test_feature_spec_tables_and_an_int8_store_are_all_placed(tmp_path):
    spec = feature_spec(SyntheticConfig())
    spec.save(tmp_path / "feature_spec.json")
    config = PlanConfig(model=ModelDescription(spec=str(tmp_path / "feature_spec.json")),
                        tokens=TokenStoreDescription(num_instances=10 ** 6, width=64,
                                                     dtype="int8"),
                        cluster=_small_cluster(device="cpu", ddr_gb_per_host=8))
    result = plan_sharding(config)
    expected = [t.name for t in embedding_tables(spec, DLRMSIFConfig())] + ["iat_tokens"]
    assert [p.table.name for p in result.tables] == expected and not result.unplaced
    # int8 rows as stored: 64 codes and a 4-byte scale and bias = 34 fp16 columns.
    tokens = result.tables[-1]
    assert tokens.table.weight_bytes == 68 * 10 ** 6
    assert {s["sizes"][1] for s in tokens.shards} == {34}
    assert {p.compute_kernel for p in result.tables} == {"fused"}
    assert all(d.hbm == 0 for d in result.devices)
    _within_capacity(result)


def test_table_groups_and_bad_descriptions():
    tables = parse_table_group("count=3 rows=1K..100K dim=16 name=s pooling=2", 0, 1.0)
    assert [(t.name, t.rows, t.dim, t.pooling_factor) for t in tables] == [
        ("s_0", 1000, 16, 2.0), ("s_1", 10000, 16, 2.0), ("s_2", 100000, 16, 2.0)]
    assert [t.name for t in parse_table_group("rows=5M dim=8", 3, 1.0)] == ["g3"]
    for bad, match in [("rows=1X dim=16", "not a number"), ("dim=16", "rows= is required"),
                       ("rows=10 dim=6", "multiple of 4"), ("count=1 rows=1..9 dim=8", "LO..HI"),
                       ("rows=10 dim=8 size=3", "key=value")]:
        with pytest.raises(PlanError, match=match):
            parse_table_group(bad, 0, 1.0)
    with pytest.raises(PlanError, match="unique"):
        plan_sharding(PlanConfig(model=ModelDescription(tables=["rows=8 dim=8 name=a"] * 2)))


def test_component_and_app_take_every_setting(capsys):
    params = inspect.signature(components.plan).parameters
    assert set(params) - {"image", "cpu", "memMB", "tasks"} == {x.name for x in leaves(PlanConfig)}
    role = materialize_appdef(components.plan, ["--cluster.hosts", "8"]).roles[0]
    args = role.args[role.args.index("apps/plan.py") + 1:]
    assert args[args.index("--cluster.hosts") + 1] == "8"
    assert parse_config(PlanConfig, args).cluster.hosts == 8
