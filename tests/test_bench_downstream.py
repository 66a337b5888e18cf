"""apps/bench_downstream.py runs end to end on tiny sizes and prints every row, with its cost and
roofline columns and the start-up row (no timings checked)."""

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


NUMBER = r"[\d,]+(\.\d+)?"


def test_every_variant_has_a_row_and_the_reference_is_one(capsys, restore_threads, tmp_path):
    bench.main(["--lengths", "4", "--batch_size", "16", "--num_batches", "2", "--warmup", "1",
                "--steps", "1", "--repeats", "1", "--store_rows", "500", "--one_core", "false",
                "--threads", "1", "--startup_repeats", "1", "--mixer.num_blocks", "1",
                "--work_dir", str(tmp_path)])
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 12 and cells[0] in ("-", "4"):
            rows[(cells[0], cells[1])] = cells
    assert set(rows) == ({("-", bench.REFERENCE[0]), ("-", bench.STARTUP)}
                         | {("4", name) for name, _, _ in bench.VARIANTS})
    assert rows[("-", bench.REFERENCE[0])][5] == "1.0000"
    startup = rows.pop(("-", bench.STARTUP))
    assert float(startup[4]) > 0 and startup[5:] == ["-"] * 7
    for cells in rows.values():
        assert all(re.fullmatch(NUMBER, c) for c in cells[4:]), cells
        samples, mflop, kb, gflops, gbs, roof = (float(c.replace(",", "")) for c in cells[6:])
        assert samples > 0 and mflop > 0 and kb > 0 and gflops > 0 and 0 < roof
        # achieved rates are the per-sample costs times the measured samples/s
        assert gflops == pytest.approx(samples * mflop / 1e3, rel=0.02, abs=0.01)
    # a history model costs more than DLRM alone
    assert float(rows[("4", bench.VARIANTS[0][0])][7].replace(",", "")) > float(
        rows[("-", bench.REFERENCE[0])][7].replace(",", ""))
    assert list(tmp_path.iterdir()) == []  # the scratch folder is cleaned up
