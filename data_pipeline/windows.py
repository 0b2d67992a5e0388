"""Window arithmetic: which rows of a series a split uses, how many windows they give, and where
window number w of a shard starts, all computed from manifest shapes without reading data.

A window is (series, start, channel) over the split's rows [a, b): starts a, a+stride, ... while
start + L <= b; the rows after the last full stride are not used. `channels="independent"`
turns each multivariate window into C univariate ones (window-major, then channel).
A forecasting window of length L+H is just a window of length L+H with `overlap=L`: the caller
splits it into input and target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import DataError

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def split_rows(entry: dict, split: str, overlap: int) -> Optional[tuple[int, int]]:
    """The (start, end) row range of `split` for every series of the shard, None if the shard has none.

    Time-split shards (TSLib CSVs) carry `borders`; val/test start `overlap` rows early (= L, the
    input length) so their first window ends where the split begins, as in Informer/Autoformer.
    File-split shards belong wholly to their split; unsplit shards are all `train`.
    """
    borders = entry.get("borders")
    if borders:
        if split not in borders:
            return None
        a, b = borders[split]
        return (max(0, a - overlap) if split != "train" else a), b
    tag = entry.get("split")
    if (tag or "train") != split:
        return None
    return 0, 2**62


@dataclass
class ShardWindows:
    """Windows of one shard under the stream's settings, kept per run of equal shapes (compact)."""
    index: int  # position in the manifest's shard list
    url: str
    entry: dict
    a: int  # first row of the split
    b: int  # end row of the split (clipped per series)
    C: np.ndarray  # per run: channels
    T: np.ndarray  # per run: series length
    count: np.ndarray  # per run: number of series
    eff: np.ndarray  # per run: rows inside the split
    per_series: np.ndarray  # per run: windows per series
    run_series0: np.ndarray  # per run: index of its first series
    run_cum: np.ndarray  # per run: first window index (len runs + 1)
    dropped_short: int  # series with fewer split rows than one window, dropped
    padded: int  # series shorter than one window, zero-padded to one window (short_series: pad)
    seq_len: int
    stride: int
    independent: bool

    @property
    def total(self) -> int:
        return int(self.run_cum[-1])

    def locate(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Window numbers -> (series index, start row within the series, channel or -1)."""
        r = np.searchsorted(self.run_cum, w, side="right") - 1
        j = w - self.run_cum[r]
        per = self.per_series[r]
        series = self.run_series0[r] + j // per
        k = j % per
        if self.independent:
            c = self.C[r]
            step, chan = k // c, k % c
        else:
            step, chan = k, np.full_like(k, -1)
        return series, self.a + step * self.stride, chan


def shard_windows(index: int, url: str, entry: dict, split: str, seq_len: int, stride: int, overlap: int,
                  independent: bool, short: str) -> Optional[ShardWindows]:
    rows = split_rows(entry, split, overlap)
    if rows is None:
        return None
    a, b = rows
    shapes = np.asarray(entry["shapes"], dtype=np.int64).reshape(-1, 3)
    C, T, count = shapes[:, 0], shapes[:, 1], shapes[:, 2]
    eff = np.clip(np.minimum(T, b) - a, 0, None)
    full = np.where(eff >= seq_len, (eff - seq_len) // stride + 1, 0)
    is_short = eff < seq_len
    if short == "pad":
        full = np.where(is_short & (eff > 0), 1, full)
    elif short == "error" and is_short.any():
        r = int(np.flatnonzero(is_short)[0])
        raise DataError(f"shard {url}: series #{int(count[:r].sum())} has {int(eff[r])} rows in the "
                        f"{split!r} split, shorter than one window ({seq_len}); set data.short_series "
                        f"to drop or pad")
    per = full * (C if independent else 1)
    series0 = np.zeros(len(count), dtype=np.int64)
    np.cumsum(count[:-1], out=series0[1:])
    keep = per > 0  # runs without windows are never located: drop them (series0 keeps true indices)
    run_cum = np.concatenate([[0], np.cumsum((per * count)[keep])]).astype(np.int64)
    return ShardWindows(index, url, entry, a, b, C[keep], T[keep], count[keep], eff[keep], per[keep], series0[keep],
                        run_cum, int(count[is_short & (full == 0)].sum()), int(count[is_short & (full > 0)].sum()),
                        seq_len, stride, independent)


# ----------------------------------------------------------------------------- permutation

def _mix(x: np.ndarray) -> np.ndarray:
    z = x * _M1
    z ^= z >> np.uint64(30)
    z *= _M2
    z ^= z >> np.uint64(27)
    z *= _M3
    z ^= z >> np.uint64(31)
    return z


class Permutation:
    """A keyed pseudo-random bijection of [0, n), evaluated pointwise (4-round Feistel + cycle walking).

    Why not np.random.permutation: a shard of 16 M windows would need a 128 MB table per worker,
    and resuming at window k would mean regenerating it; this costs O(1) memory and O(1) per lookup.
    """

    def __init__(self, n: int, key: tuple[int, ...]):
        self.n = int(n)
        bits = max(2, int(self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.SeedSequence(list(key)).generate_state(4, dtype=np.uint64)

    def _round(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        if self.n <= 1:
            return np.asarray(i, dtype=np.int64)
        x = self._round(np.asarray(i, dtype=np.uint64))
        out = x >= np.uint64(self.n)
        while out.any():  # cycle walking: re-encrypt until inside [0, n); terminates (bijection)
            x[out] = self._round(x[out])
            out = x >= np.uint64(self.n)
        return x.astype(np.int64)

