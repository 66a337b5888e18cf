"""Plan the sharding of embedding tables (and an instance-token store) for a described cluster,
on paper: TorchRec's planner over a simulated topology, nothing allocated, no devices.

    python apps/plan.py --config experiments/plan_industrial.json --out results/plan_industrial.json
    python apps/plan.py --model.spec data/feature_spec.json --cluster.hosts 2 --cluster.device cpu
    python apps/plan.py --model.tables "count=100 rows=1K..1M dim=16" "rows=500M dim=128 name=uid" \
        --tokens.num_instances 1000000000 --cluster.hosts 4

Prints the plan (per table: sharding type, kernel, ranks; per device: HBM and DDR used against
capacity, the perf estimate) and writes it with ``--out``. Tables that cannot be placed are
listed one per line with the reason, and the exit code is then 2, as for bad input (one line on
stderr). Every flag is a field of :class:`iat_torchrec.distributed.plan.PlanConfig`
(``--help``).
"""

from __future__ import annotations

import functools
import sys

from iat_torchrec.distributed.plan import PlanConfig, run_plan
from iat_torchrec.stages.cli import stage_main

main = functools.partial(stage_main, PlanConfig, run_plan)


if __name__ == "__main__":
    sys.exit(main())
