"""The history contract: batch types, layout, label codes, and the ops on them."""

from iat_torchrec.history.batch import (DEFAULT_GAP_BOUNDARIES_S, LABEL_NEGATIVE, LABEL_PAD,
                                        LABEL_POSITIVE, LABEL_UNKNOWN, LABEL_VOCAB_SIZE,
                                        HistoryBatch, HistoryLayout)
from iat_torchrec.history.downstream import (HIST_ITEM_PREFIX, DownstreamBatch,
                                             add_history_items, history_item_features)
from iat_torchrec.history.ops import (HistoryMaterializer, TimeIndexArrays, last_range_steps,
                                      last_step_items, last_steps, last_steps_index,
                                      materialize_history, steps_after)

__all__ = [
    "DEFAULT_GAP_BOUNDARIES_S", "LABEL_NEGATIVE", "LABEL_PAD", "LABEL_POSITIVE", "LABEL_UNKNOWN",
    "LABEL_VOCAB_SIZE", "HistoryBatch", "HistoryLayout",
    "HIST_ITEM_PREFIX", "DownstreamBatch", "add_history_items", "history_item_features",
    "HistoryMaterializer", "TimeIndexArrays", "last_range_steps", "last_step_items", "last_steps",
    "last_steps_index", "materialize_history", "steps_after",
]
