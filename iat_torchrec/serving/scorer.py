"""Score requests with a bundle's model and the user's live history from its store.

A request is (user id, request time t, C candidates). For a batch of R requests with B
candidates in all, :meth:`Scorer.score`:

1. builds the candidates' features (:func:`~iat_torchrec.serving.features.candidate_features`);
2. finds each *request's* history once: the user's last L instances with ``ts < t`` in the
   history store's time index (:meth:`~iat_torchrec.tokens.time_index.UserTimeIndex.query`,
   unknown users get an empty history), materialised with matured labels only
   (:class:`~iat_torchrec.history.HistoryMaterializer`, the offline readers' code), plus the
   item ids of its last k steps for item-id branches;
3. runs the quantised model once over all B candidates with the R histories and each
   candidate's request (``history_groups``): the store lookups read R x L token or code rows,
   not B x L.

What is shared and what is not: history rows, their side information and the token / code
lookups are per request. An IAT branch or SIF-Mixer trained blind to the target
(``--model.iat.history_sees_query false``, ``--model.mixer.history_sees_target false``)
encodes each request's history once and runs only the candidate's own query or target row per
candidate. The paper's forms let the history attend to the candidate (the IAT query sits in
the Transformer's sequence; the SIF-Mixer's column attention mixes the target row into every
history row), and DIN / BST attend with the candidate's item, so there the layers after the
lookup run per candidate on a copy of its request's history. Scores equal scoring each
candidate alone either way (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from iat_torchrec.history import (HistoryBatch, HistoryLayout, HistoryMaterializer,
                                  add_history_items, last_range_steps)
from iat_torchrec.serving.bundle import Bundle
from iat_torchrec.serving.features import RequestError, candidate_features
from iat_torchrec.tokens.lookup import InstanceTokenLookup, SampleCodeLookup
from iat_torchrec.tokens.store import TokenStore


@dataclasses.dataclass
class ScoreRequest:
    """One request: ``user_id``, request time ``ts`` (seconds), candidates (field -> value)."""

    user_id: int
    ts: int
    candidates: Sequence[Mapping[str, Any]]
    instance_id: Optional[int] = None  # the logged instance a replayed request stands for


@dataclasses.dataclass
class ScoringInputs:
    """What :meth:`Scorer.forward` runs on: the candidates' ``dense`` [B, num_dense] and
    ``sparse`` features, the requests' ``history`` [R, L], each candidate's request
    ``groups`` [B] and the candidates per request ``sizes`` [R]."""

    dense: torch.Tensor
    sparse: Any
    history: Optional[HistoryBatch]
    groups: torch.Tensor
    sizes: torch.Tensor


class StoreLookup(nn.Module):
    """The lookup the model holds (row ids [N, L] -> [N, L, ...]), whose store's lookup
    ``inner`` is replaced when the store grows (:meth:`Scorer.refresh`)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.device = getattr(inner, "device", torch.device("cpu"))

    @property
    def dim(self) -> int:
        return int(getattr(self.inner, "dim"))

    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(row_ids)


class Scorer:
    """A bundle's model with its stores, ready to score (one thread at a time).

    Args:
        bundle: the loaded bundle.
        max_len: L of served histories (0: the bundle's, the L it was trained with; the
            models accept any L).
        verify: check every store file's CRC32 when opening the stores.
        new_items: instance id -> item id of rows ingested since the export (item-id branches;
            :meth:`~iat_torchrec.serving.ingest.Ingestor.items`).
    """

    def __init__(self, bundle: Bundle, max_len: int = 0, verify: bool = True,
                 new_items: Optional[Mapping[int, int]] = None) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        self.labels = list(self.spec.labels)
        self.variant = bundle.model_config.variant
        layout = bundle.layout
        if layout is not None and max_len:
            layout = dataclasses.replace(layout, max_len=max_len)
        self.layout: Optional[HistoryLayout] = layout
        self.item_len = int(bundle.manifest["item_history_len"])
        self.token_lookup = self.code_lookup = None
        if self.variant.uses_tokens:
            self.token_lookup = StoreLookup(nn.Identity())
        if self.variant.uses_codes:
            self.code_lookup = StoreLookup(nn.Identity())
        self.stores: Dict[str, Optional[TokenStore]] = {}
        self.history_store: Optional[TokenStore] = None
        self.row_items: Optional[np.ndarray] = None
        self.refresh(verify=verify, new_items=new_items)
        self.model = bundle.inference_model(self.token_lookup, self.code_lookup)

    # ----------------------------------------------------------------- stores
    def refresh(self, verify: bool = False, new_items: Optional[Mapping[int, int]] = None
                ) -> None:
        """(Re)open the stores (after an append), rebuild their lookups and the time index
        buffers. ``new_items``: instance id -> item id of rows added since the export."""
        b = self.bundle
        self.stores = {name: b.open_store(name, verify=verify) for name in ("iat", "sif")}
        hs = b.manifest["history_store"]
        self.history_store = self.stores[hs] if hs else None
        iat, sif = self.stores["iat"], self.stores["sif"]
        if self.token_lookup is not None:
            self.token_lookup.inner = InstanceTokenLookup(iat)
        if self.code_lookup is not None:
            rows_like = iat if hs == "iat" else None
            self.code_lookup.inner = SampleCodeLookup.from_store(sif, rows_like=rows_like)
        if self.history_store is not None:
            self.materializer = HistoryMaterializer(self.history_store.time_index, self.layout)
            self.index_rows = np.asarray(self.history_store.time_index.rows, dtype=np.int64)
        if self.item_len:
            self.row_items = self._row_items(new_items or {})

    def _row_items(self, new_items: Mapping[int, int]) -> np.ndarray:
        base = self.bundle.base_items()
        n = self.history_store.num_rows
        if n == base.size:
            return base
        ids = self.history_store.column("instance_id", np.arange(base.size, n))
        missing = [int(i) for i in ids if int(i) not in new_items]
        if missing:
            raise RuntimeError(f"{self.history_store.path}: no item id known for ingested "
                               f"instance(s) {missing[:5]}")
        return np.concatenate([base, np.array([new_items[int(i)] for i in ids], np.int64)])

    @property
    def store_versions(self) -> Dict[str, int]:
        return {k: s.version for k, s in self.stores.items() if s is not None}

    # ----------------------------------------------------------------- scoring
    def check(self, r: ScoreRequest, where: str = "") -> None:
        """Refuse a request time before the history store's first instance (its history
        could never have been logged)."""
        s = self.history_store
        if s is not None and s.manifest.get("ts_min") is not None and r.ts < s.manifest["ts_min"]:
            raise RequestError(f"{where}ts", f"{r.ts} is before the store's first instance "
                                             f"(ts {s.manifest['ts_min']}): no history could "
                                             "exist yet")

    def prepare(self, requests: Sequence[ScoreRequest]) -> "ScoringInputs":
        """The model inputs of ``requests`` (steps 1-3 of the module docstring)."""
        for r in requests:
            self.check(r)
        sizes = torch.tensor([len(r.candidates) for r in requests], dtype=torch.int64)
        cands = [c for r in requests for c in r.candidates]
        dense, sparse, _ = candidate_features(self.spec, cands)
        groups = torch.repeat_interleave(torch.arange(len(requests)), sizes)
        history = None
        if self.history_store is not None:
            users = np.array([r.user_id for r in requests], dtype=np.int64)
            t = np.array([r.ts for r in requests], dtype=np.int64)
            begin, length, _ = self.history_store.time_index.query(
                users, t, self.layout.max_len, allow_unknown_users=True)
            history = self.materializer(torch.from_numpy(begin), torch.from_numpy(length),
                                        torch.from_numpy(t))
            if self.item_len:
                pos, valid = last_range_steps(begin, length, self.layout.max_len, self.item_len)
                items = (np.where(valid, self.row_items[self.index_rows[pos]], -1)
                         if self.index_rows.size else np.full(pos.shape, -1))
                sparse = add_history_items(sparse, torch.from_numpy(
                    np.ascontiguousarray(items, dtype=np.int64))[groups])
        return ScoringInputs(dense, sparse, history, groups, sizes)

    @torch.no_grad()
    def forward(self, x: "ScoringInputs") -> torch.Tensor:
        """The model's logits [B, num_labels] over prepared inputs, each request's history
        looked up (and, where the model allows, encoded) once."""
        return self.model(x.dense, x.sparse, x.history, history_groups=x.groups)

    def logits(self, requests: Sequence[ScoreRequest]) -> List[np.ndarray]:
        """Logits [C_r, num_labels] float32 of each request's candidates."""
        x = self.prepare(requests)
        return list(torch.split(self.forward(x).float(), x.sizes.tolist()))

    def score(self, requests: Sequence[ScoreRequest]) -> List[Dict[str, List[float]]]:
        """Per request, label -> probabilities (sigmoid of the logits), one per candidate."""
        out = []
        for logits in self.logits(requests):
            p = torch.sigmoid(logits).numpy().astype(np.float64)
            out.append({name: p[:, j].tolist() for j, name in enumerate(self.labels)})
        return out


def log_requests(path: Any, spec: Any, limit: int = 0) -> List[ScoreRequest]:
    """One single-candidate request per row of an instance log (``limit`` > 0: its first rows):
    the row's user, its timestamp and its fields as a client would send them. What tests and
    the load test replay against the server, and compare with the offline evaluation of the
    same rows."""
    from iat_torchrec.data.log import log_files, open_parquet  # pyarrow only where replayed

    names = [*spec.sparse_names, *spec.dense_names]
    out: List[ScoreRequest] = []
    for f in log_files(path):
        table = open_parquet(f).read(columns=["instance_id", "user_id", "ts", *names])
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
        for i in range(table.num_rows):
            out.append(ScoreRequest(user_id=cols["user_id"][i], ts=cols["ts"][i],
                                    candidates=[{n: cols[n][i] for n in names}],
                                    instance_id=cols["instance_id"][i]))
            if limit and len(out) >= limit:
                return out
    return out
