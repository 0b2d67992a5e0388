"""Synthetic corpora whose values encode their own position, for tests and benchmarks.

value[c, t] of series s = (s * 4096 + t) * 8 + c, exact in float32 for s < 512, t < 4096, c < 8:
any window tells which series, start row and channel it came from, so coverage and order can be
checked without keeping the data around.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .shards import Series


def identity_series(lengths: Sequence[int], channels: int | Sequence[int] = 2, source: str = "synthetic",
                    split: Optional[str] = None) -> list[Series]:
    chans = [channels] * len(lengths) if isinstance(channels, int) else list(channels)
    out = []
    for s, (t, c) in enumerate(zip(lengths, chans)):
        assert s < 512 and t <= 4096 and c <= 8
        v = ((s * 4096 + np.arange(t, dtype=np.int64))[None, :] * 8 + np.arange(c)[:, None]).astype(np.float32)
        out.append(Series(f"s{s}", v, source=source, split=split))
    return out


def window_key(w: np.ndarray) -> tuple[int, int, int]:
    """(series, start, channel of the first row) of a window cut from identity_series data."""
    v = int(w[0, 0])
    return v // 8 // 4096, (v // 8) % 4096, v % 8


def expected_keys(lengths: Sequence[int], channels: int | Sequence[int], seq_len: int, stride: int = 1,
                  independent: bool = False) -> set[tuple[int, int, int]]:
    chans = [channels] * len(lengths) if isinstance(channels, int) else list(channels)
    keys = set()
    for s, (t, c) in enumerate(zip(lengths, chans)):
        for start in range(0, t - seq_len + 1, stride):
            for ch in (range(c) if independent else [0]):
                keys.add((s, start, ch))
    return keys
