"""The downstream model's variants: the one table of history sources and what each builds and
reads (METHOD.md, "Stage 3"; "Evaluation protocol" for the baselines).

:data:`VARIANTS` maps every :class:`HistorySource` to a frozen :class:`Variant` naming the history
parts of ``DLRM_SIF`` for that source; :func:`~iat_torchrec.models.dlrm_sif.build_tower` composes
them and nothing else decides per source. The sources:

=============  ============  ==========  ==============  ========================================
source         item branch   IAT branch  SIF-Mixer rows  reads
=============  ============  ==========  ==============  ========================================
``none``       none          no          none            nothing: DLRM (``dot``: TorchRec's,
                                                         ``dcn``: its DLRM_DCN)
``pooled``     mean          no          none            histories, item ids
``din``        DIN           no          none            histories, item ids
``bst``        BST           no          none            histories, item ids
``iat``        from config   yes         none            histories, IAT tokens (+ item ids)
``sif_codes``  none          no          codes           histories, HGAQ codes, codebooks
``sif_iat``    none          no          tokens          histories, IAT tokens (codebooks
                                                         optional: they add L_align)
``sif_both``   none          no          tokens + codes  histories, IAT tokens, codes, codebooks
=============  ============  ==========  ==============  ========================================

``iat``'s item branch is the config's ``iat_item_branch`` (default ``bst``): the paper keeps the
hand-crafted branch and adds IAT, so ``iat`` compares against ``bst``. ``pooled`` is the peer
library's DNN (mean item and mean label of the last k steps, METHOD.md "Protocol P1").

Item and IAT branches give one more feature token to the interaction (``dot``, ``dcn``,
``concat`` or ``mixer``); SIF-Mixer rows (the sum of the listed encodings of each history step)
go into the full SIF-Mixer, which is then the interaction (``mixer`` only).

What a stage or the pipeline asks (this module imports only the standard library)::

    v = variant("sif_iat")       # or HistorySource.SIF_IAT.variant
    v.reads_history              # needs history shards
    v.uses_tokens                # needs an IAT store (a token lookup)
    v.uses_codes                 # needs a SIF store's codes (code lookup) and its codebooks
    v.is_sif                     # SIF-Mixer rows: interaction "mixer"; takes a SIF store's
                                 # codebooks when there is one (L_align)
    v.item_branch_for("bst")     # the item branch given the config's iat_item_branch:
                                 # item ids (item_logs, item_history_len) unless "none"

Adding a variant = one entry here (and, for a new kind of part, its builder in
``dlrm_sif.build_tower``).
"""

from __future__ import annotations

import dataclasses
import enum
import types
from typing import Mapping, Optional, Sequence, Tuple

INTERACTIONS = ("mixer", "dot", "dcn", "concat")
ITEM_BRANCHES = ("none", "mean", "din", "bst")
ROW_ENCODINGS = ("tokens", "codes")


class HistorySource(str, enum.Enum):
    """Where the downstream model's history comes from: the key of :data:`VARIANTS`."""

    NONE = "none"
    POOLED = "pooled"
    DIN = "din"
    BST = "bst"
    IAT = "iat"
    SIF_CODES = "sif_codes"
    SIF_IAT = "sif_iat"
    SIF_BOTH = "sif_both"

    @property
    def variant(self) -> "Variant":
        return VARIANTS[self]

    @property
    def is_sif(self) -> bool:
        """History rows go into the SIF-Mixer (see :attr:`Variant.is_sif`)."""
        return self.variant.is_sif

    @property
    def uses_tokens(self) -> bool:
        """Reads IAT tokens (needs a token lookup)."""
        return self.variant.uses_tokens

    @property
    def uses_codes(self) -> bool:
        """Reads HGAQ codes of history steps (needs codebooks and a code lookup)."""
        return self.variant.uses_codes


@dataclasses.dataclass(frozen=True)
class Variant:
    """The history parts of one source.

    Args:
        item_branch: the hand-crafted item-id branch (``none | mean | din | bst``), or None for
            the config's ``iat_item_branch``.
        iat_branch: the IAT branch (tokens -> one feature token) is in.
        sif_rows: encodings summed into SIF-Mixer history rows (``tokens``, ``codes``); non-empty
            makes the full SIF-Mixer the interaction.
    """

    item_branch: Optional[str] = "none"
    iat_branch: bool = False
    sif_rows: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.item_branch is not None and self.item_branch not in ITEM_BRANCHES:
            raise ValueError(f"item_branch must be None or one of {ITEM_BRANCHES}")
        if not set(self.sif_rows) <= set(ROW_ENCODINGS):
            raise ValueError(f"sif_rows must be drawn from {ROW_ENCODINGS}, got {self.sif_rows}")
        if self.sif_rows and (self.iat_branch or self.item_branch != "none"):
            raise ValueError("the SIF-Mixer with history rows takes no feature tokens")

    @property
    def is_sif(self) -> bool:
        """History rows into the SIF-Mixer: needs interaction ``mixer``; codebooks, when given,
        add L_align."""
        return bool(self.sif_rows)

    @property
    def uses_tokens(self) -> bool:
        """Reads IAT tokens: needs a token lookup."""
        return self.iat_branch or "tokens" in self.sif_rows

    @property
    def uses_codes(self) -> bool:
        """Reads HGAQ codes of history steps: needs a code lookup and the codebooks."""
        return "codes" in self.sif_rows

    @property
    def reads_history(self) -> bool:
        """Reads the batch's histories (every source but ``none``)."""
        return self.item_branch != "none" or self.iat_branch or self.is_sif

    def item_branch_for(self, iat_item_branch: str) -> str:
        """The item branch in use (``none | mean | din | bst``) given the config's
        ``iat_item_branch``."""
        return iat_item_branch if self.item_branch is None else self.item_branch


VARIANTS: Mapping[HistorySource, Variant] = types.MappingProxyType({
    HistorySource.NONE: Variant(),
    HistorySource.POOLED: Variant(item_branch="mean"),
    HistorySource.DIN: Variant(item_branch="din"),
    HistorySource.BST: Variant(item_branch="bst"),
    HistorySource.IAT: Variant(item_branch=None, iat_branch=True),
    HistorySource.SIF_CODES: Variant(sif_rows=("codes",)),
    HistorySource.SIF_IAT: Variant(sif_rows=("tokens",)),
    HistorySource.SIF_BOTH: Variant(sif_rows=("tokens", "codes")),
})


def variant(source: "HistorySource | str") -> Variant:
    """The variant of a history source (its value or the enum)."""
    return VARIANTS[HistorySource(source)]


__all__: Sequence[str] = (
    "INTERACTIONS", "ITEM_BRANCHES", "ROW_ENCODINGS", "HistorySource", "Variant", "VARIANTS",
    "variant",
)
