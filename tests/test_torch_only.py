"""The long-history models and their benchmark need PyTorch only: in a process where torchrec
and fbgemm_gpu cannot be imported, ``iat_torchrec.models.mixer``, ``.history``, ``.sit`` (the
SIT), ``.quantizer`` (HGAQ's residual VQ) and ``iat_torchrec.history.batch`` import, and
``apps/bench_mixer.py`` runs every row (tiny sizes, no timings checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WITHOUT_TORCHREC = """
import sys
for name in ("torchrec", "fbgemm_gpu", "pyarrow"):
    sys.modules[name] = None  # import fails
import iat_torchrec.models.mixer, iat_torchrec.models.history
import iat_torchrec.models.sit, iat_torchrec.models.quantizer, iat_torchrec.history.batch
from apps import bench_mixer
bench_mixer.main(["--lengths", "3", "--batch_size", "2", "--branch_batch_size", "3",
                  "--num_tokens", "4", "--mixer.d0", "8", "--mixer.num_blocks", "2",
                  "--token_dim", "8", "--query_dim", "8", "--iat.adapt_dim", "8",
                  "--iat.side_dim", "8", "--iat.num_heads", "2", "--item_dim", "8",
                  "--repeats", "1", "--matmul_size", "64", "--reference", "true",
                  "--threads", "1"])
assert not any(m.startswith(("torchrec", "fbgemm_gpu")) for m in sys.modules
               if sys.modules[m] is not None)
"""


def test_models_and_bench_mixer_run_without_torchrec():
    out = subprocess.run([sys.executable, "-c", WITHOUT_TORCHREC], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    rows = [line for line in out.splitlines() if line.startswith("|     3 |")]
    names = [line.split("|")[2].strip() for line in rows]
    assert names == ["flat attention (reference)", "SIF-Mixer", "SIF-Mixer (before)",
                     "IAT branch", "IAT branch (before)", "BST", "BST (before)", "DIN",
                     "DIN (before)"]
