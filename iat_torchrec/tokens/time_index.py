"""The per-user time index of a token store and its vectorised query.

Every store row appears once, at a *position* in user-time order: users ascending, and within a
user by (ts, instance_id). A user's positions are contiguous (``offsets[u]:offsets[u + 1]``), so
the history of a target sample (user u, time t) is one range of positions: its end is the first
position of u with ``ts >= t`` (ties at equal ts are excluded), its begin at most ``max_len``
before. A history is therefore stored as ``(begin, length)`` and materialised per batch.

The range end of a whole batch is found by one ``searchsorted`` into ``keys``, a single sorted
int64 array: ``keys[p] = user_index * (K + 1) + rank of ts`` among the K distinct timestamps
of the store. Queries are sorted first (torch's radix sort), which turns random binary searches into
a cache-friendly sweep (10M rows, one core: 0.7M searches/s random, 28M/s sorted).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np
import torch

INT64_MAX = np.iinfo(np.int64).max


class UnknownUserError(KeyError):
    """Target samples of users without rows in the store (when unknown users are not allowed)."""

    def __init__(self, positions: np.ndarray, user_ids: np.ndarray) -> None:
        self.positions, self.user_ids = positions, user_ids
        shown = ", ".join(str(int(u)) for u in user_ids[:5])
        more = f" and {len(user_ids) - 5} more" if len(user_ids) > 5 else ""
        super().__init__(f"{len(user_ids)} target sample(s) of users not in the token store: "
                         f"user_id {shown}{more} (first at sample {int(positions[0])})")

    def __str__(self) -> str:
        return str(self.args[0])


def stable_argsort(values: np.ndarray) -> np.ndarray:
    """Stable argsort of an int64 array (torch's radix sort: about 3x NumPy's on 10M rows)."""
    _, order = torch.sort(torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
                          stable=True)
    return order.numpy()


def _dense_rank(values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, rank of each value among them)."""
    order = stable_argsort(values)
    ordered = values[order]
    new = np.empty(ordered.size, dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    rank = np.empty(values.size, dtype=np.int64)
    rank[order] = np.cumsum(new) - 1
    return ordered[new], rank


@dataclasses.dataclass(frozen=True)
class UserTimeIndex:
    """Store rows in user-time order; see the module docstring. All arrays are NumPy (often
    memory-mapped from the store)."""

    users: np.ndarray      # [U] int64, sorted distinct user ids
    offsets: np.ndarray    # [U + 1] int64, user u holds positions offsets[u]:offsets[u + 1]
    rows: np.ndarray       # [N] int64, the store row at each position
    ts: np.ndarray         # [N] int64, ts at each position
    label: np.ndarray      # [N] int8, the instance's label at each position
    ts_values: np.ndarray  # [K] int64, sorted distinct timestamps
    keys: np.ndarray       # [N] int64, user_index * (K + 1) + ts rank, ascending

    FILES = ("users", "offsets", "rows", "ts", "label", "ts_values", "keys")

    @property
    def num_positions(self) -> int:
        return int(self.rows.shape[0])

    @property
    def num_users(self) -> int:
        return int(self.users.shape[0])

    def arrays(self) -> Dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.FILES}

    @classmethod
    def build(cls, user_id: np.ndarray, ts: np.ndarray, label: np.ndarray,
              id_order: np.ndarray) -> "UserTimeIndex":
        """Index rows ``0..N-1`` given their columns; ``id_order`` is the argsort of their
        instance ids (ties at equal ts are ordered by instance id)."""
        users, user_index = _dense_rank(user_id)
        ts_values, ts_rank = _dense_rank(ts)
        k1 = ts_values.size + 1
        if users.size and users.size > INT64_MAX // k1:
            raise OverflowError(f"{users.size} users x {ts_values.size} distinct timestamps "
                                "overflow the int64 time-index key")
        keys_by_row = user_index * k1 + ts_rank
        # Stable sort of rows taken in instance-id order: equal keys keep id order.
        rows = id_order[stable_argsort(keys_by_row[id_order])]
        counts = np.bincount(user_index, minlength=users.size)
        offsets = np.zeros(users.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(users=users, offsets=offsets, rows=rows.astype(np.int64, copy=False),
                   ts=ts[rows].astype(np.int64, copy=False),
                   label=label[rows].astype(np.int8, copy=False),
                   ts_values=ts_values, keys=keys_by_row[rows])

    def query(self, user_id: np.ndarray, t: np.ndarray, max_len: int,
              allow_unknown_users: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each target sample (user_id[i], t[i]): the positions ``begin[i] : begin[i] +
        length[i]`` of that user's last ``max_len`` rows with ``ts < t[i]``, oldest first.

        Returns ``(begin int64, length int64, known bool)``. A user without rows before t gets
        length 0. A user absent from the store raises :class:`UnknownUserError` unless
        ``allow_unknown_users``, in which case it gets length 0 and ``known`` False.
        """
        if max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {max_len}")
        user_id = np.asarray(user_id, dtype=np.int64)
        t = np.asarray(t, dtype=np.int64)
        if user_id.shape != t.shape or user_id.ndim != 1:
            raise ValueError(f"user_id and t must be 1-D of equal length, got {user_id.shape} "
                             f"and {t.shape}")
        n_users = self.users.size
        u = np.searchsorted(self.users, user_id)
        np.minimum(u, max(n_users - 1, 0), out=u)
        known = (self.users[u] == user_id) if n_users else np.zeros(user_id.size, dtype=bool)
        if not allow_unknown_users and not known.all():
            bad = np.flatnonzero(~known)
            raise UnknownUserError(bad, np.unique(user_id[bad]))
        key = u * (self.ts_values.size + 1) + np.searchsorted(self.ts_values, t)
        end = np.empty_like(key)
        if key.size > 4096:  # sorted needles: a cache-friendly sweep instead of random probes
            sorted_key, order = torch.sort(torch.from_numpy(key))
            end[order.numpy()] = np.searchsorted(self.keys, sorted_key.numpy())
        else:
            end[:] = np.searchsorted(self.keys, key)
        length = np.minimum(end - self.offsets[u], max_len) if n_users else np.zeros_like(end)
        length[~known] = 0
        begin = end - length
        begin[~known] = 0
        return begin, length, known
