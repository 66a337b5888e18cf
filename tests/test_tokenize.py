"""Stage 1b end to end: train the HGAQ tokenizer (2 processes via TorchX), export codes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchx.runner import get_runner
from torchx.specs import AppState

from conftest import REPO_ROOT, small_splits
from iat_torchrec.data.log import validate_log
from iat_torchrec.models.hgaq import HGAQConfig
from iat_torchrec.stages.tokenize import TokenizeConfig, run_tokenize, store_codebooks
from iat_torchrec.tokens.store import TokenStore
from torchx_components import components


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return small_splits(tmp_path_factory.mktemp("data"))


def test_two_process_tokenizer_exports_codes_that_decode(splits, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    app = components.tokenize(**{
        "train_log": str(splits["train"]), "valid_log": str(splits["valid"]),
        "export_logs": [str(splits[k]) for k in ("train", "valid", "test")],
        "store": str(tmp_path / "codes"), "model.codebook_size": 32,
        "model.fields_per_subtoken": 4, "train.batch_size": 128, "train.log_every": 0,
        "results": str(tmp_path / "results.json"), "j": "1x2"})
    with get_runner() as runner:
        handle = runner.run(app, scheduler="local_cwd", cfg={"log_dir": str(tmp_path / "logs")})
        status = runner.wait(handle, wait_interval=1)
    assert status.state == AppState.SUCCEEDED, status
    store = TokenStore.open(tmp_path / "codes")
    rows = sum(validate_log(splits[k]).rows for k in ("train", "valid", "test"))
    # 8 sparse + 3 dense fields, B = 4: user 2 fields -> 1, item 5 -> 2, context 4 -> 1, ...
    t = len(store.metadata["layout"])
    assert store.kind == "sif" and store.num_rows == rows and store.token_shape == (t, 3)
    codes = store.tokens(np.arange(store.num_rows))
    assert codes.dtype == np.uint8 and codes.max() < 32
    codebooks = store_codebooks(store)
    assert codebooks.shape == (t, 3, 32, 16) and torch.isfinite(codebooks).all()
    window = store.metadata["training_window"]
    assert window["rows"] == validate_log(splits["train"]).rows
    assert store.metadata["tokenizer_config"]["codebook_size"] == 32
    results = (tmp_path / "results.json").read_text()
    assert '"used_fraction"' in results and '"perplexity"' in results


def test_codebook_larger_than_uint8_is_refused(splits, tmp_path):
    cfg = TokenizeConfig(train_log=str(splits["train"]), store=str(tmp_path / "c"),
                         model=HGAQConfig(codebook_size=300))
    with pytest.raises(ValueError, match="at most 256 codes"):
        run_tokenize(cfg)
    assert not (tmp_path / "c").exists()
