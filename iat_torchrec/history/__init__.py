"""The history contract: batch types, layout, label codes, and the ops on them.

Names are imported on first use (PEP 562), so ``iat_torchrec.history.batch`` (torch only: the
layout, label codes, ``steps_after``) can be imported where torchrec and fbgemm_gpu are not
installed; ``ops`` needs fbgemm_gpu and ``downstream`` torchrec.
"""

import importlib
from typing import Any

_HOMES = {
    "batch": ("DEFAULT_GAP_BOUNDARIES_S", "LABEL_NEGATIVE", "LABEL_PAD", "LABEL_POSITIVE",
              "LABEL_UNKNOWN", "LABEL_VOCAB_SIZE", "HistoryBatch", "HistoryLayout",
              "steps_after"),
    "downstream": ("HIST_ITEM_PREFIX", "DownstreamBatch", "add_history_items",
                   "history_item_features"),
    "ops": ("HistoryMaterializer", "TimeIndexArrays", "last_range_steps", "last_step_items",
            "last_steps", "last_steps_index", "materialize_history"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


def __dir__() -> list:
    return sorted(__all__)
