"""Request fields -> model inputs (iat_torchrec.serving.features): well-formed candidates read a
field at a time give exactly what the value-by-value checking path gives, and every bad value
is still named by field and candidate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iat_torchrec.data.spec import DenseField, FeatureGroup, FeatureSpec, SparseField
from iat_torchrec.serving.features import (RequestError, _checked_columns, _columns,
                                           candidate_features)

SPEC = FeatureSpec(
    sparse=[SparseField("item", num_embeddings=50, embedding_dim=8, group=FeatureGroup.ITEM),
            SparseField("brand", num_embeddings=16, embedding_dim=8, group=FeatureGroup.ITEM,
                        hashed=True),
            SparseField("tags", num_embeddings=20, embedding_dim=8, group=FeatureGroup.ITEM,
                        multi_valued=True, vocabulary=True)],
    dense=[DenseField("price", group=FeatureGroup.ITEM)], labels=["click"])


def _candidates(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"item": int(rng.integers(50)), "brand": int(rng.integers(-10**12, 10**12)),
             "tags": [int(t) for t in rng.integers(0, 25, rng.integers(0, 4))],
             "price": float(rng.normal()) if i % 2 else int(rng.integers(10))}
            for i in range(n)]


def test_field_at_a_time_equals_the_checking_path():
    cands = _candidates(40)
    allowed = {"item", "brand", "tags", "price"}
    fast = _columns(SPEC, cands, allowed)
    checked = _checked_columns(SPEC, cands, allowed, "candidates")
    assert fast is not None
    np.testing.assert_array_equal(fast[0], checked[0])
    for name in SPEC.sparse_names:
        for a, b in zip(fast[1][name], checked[1][name]):
            np.testing.assert_array_equal(a, b)
    dense, kjt, oov = candidate_features(SPEC, cands)
    assert dense.shape == (40, 1) and kjt.keys() == SPEC.sparse_names
    assert oov == sum(t >= 20 for c in cands for t in c["tags"])  # vocabulary: unknown -> 0
    assert int(kjt["item"].values().max()) < 50 and int(kjt["brand"].values().min()) >= 0


@pytest.mark.parametrize("change, where", [
    (lambda c: c.pop("price"), "candidates[3].price: missing dense field"),
    (lambda c: c.update(item=True), "candidates[3].item: expected an integer"),
    (lambda c: c.update(item=7.0), "candidates[3].item: expected an integer"),
    (lambda c: c.update(tags=3), "candidates[3].tags: multi-valued field"),
    (lambda c: c.update(price=float("nan")), "candidates[3].price: expected a finite number"),
    (lambda c: c.update(price=1e39), "candidates[3].price: 1e+39 is beyond the float32 range"),
    (lambda c: c.update(brand=1 << 70), "candidates[3].brand: 1180591620717411303424 does not"),
    (lambda c: c.update(colour=1), "candidates[3].colour: not a field of the feature spec"),
    (lambda c: c.update(item=50), "candidates[3].item: id 50 is outside the field's ids"),
])
def test_a_bad_value_is_named(change, where):
    cands = _candidates(6)
    change(cands[3])
    with pytest.raises(RequestError) as e:
        candidate_features(SPEC, cands)
    assert str(e.value).startswith(where)


def test_an_empty_request_gives_empty_inputs():
    dense, kjt, oov = candidate_features(SPEC, [])
    assert dense.shape == (0, 1) and kjt.values().numel() == 0 and oov == 0
    assert torch.equal(kjt.lengths(), torch.zeros(0, dtype=torch.int64))
