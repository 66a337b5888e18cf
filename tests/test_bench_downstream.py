"""apps/bench_downstream.py runs end to end on tiny sizes and prints every row (no timings
checked)."""

from __future__ import annotations

import re

import pytest
import torch

from apps import bench_downstream as bench


@pytest.fixture
def restore_threads():
    """The benchmark sets torch's thread count (not pinned: ``--one_core false``); give the rest
    of the suite its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_every_variant_has_a_row_and_the_reference_is_one(capsys, restore_threads, tmp_path):
    bench.main(["--lengths", "4", "--batch_size", "16", "--num_batches", "2", "--warmup", "1",
                "--steps", "1", "--repeats", "1", "--store_rows", "500", "--one_core", "false",
                "--threads", "1", "--work_dir", str(tmp_path)])
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in ("-", "4"):
            rows[(cells[0], cells[1])] = cells
    assert set(rows) == {("-", bench.REFERENCE[0])} | {("4", name) for name, _, _ in
                                                        bench.VARIANTS}
    assert rows[("-", bench.REFERENCE[0])][6] == "1.00"
    for cells in rows.values():
        assert re.fullmatch(r"[\d,]+", cells[5]) and float(cells[6]) > 0
    assert list(tmp_path.iterdir()) == []  # the scratch folder is cleaned up
