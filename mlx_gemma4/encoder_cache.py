"""Encoder outputs remembered by the content of their inputs.

A chat resends every earlier image (or audio clip) with each turn; keyed by a
digest of the processed input, each one is encoded once and then reused.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional

import mlx.core as mx
import numpy as np


class EncoderOutputCache:
    """The outputs of the last `max_entries` distinct inputs (least recently used dropped first)."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: "OrderedDict[bytes, mx.array]" = OrderedDict()

    @staticmethod
    def key(kind: str, *arrays: np.ndarray) -> bytes:
        """A digest of `kind` and the arrays' dtypes, shapes and contents."""
        digest = hashlib.blake2b(kind.encode(), digest_size=20)
        for array in arrays:
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.data)
        return digest.digest()

    def get(self, key: bytes) -> Optional[mx.array]:
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: bytes, value: mx.array) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
