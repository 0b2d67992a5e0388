"""The epoch plan: which consumer (rank x DataLoader worker) reads which windows, in what order,
and how many batches each yields. Computed from the manifest alone, identically on every rank, so
ranks agree without talking to each other.

Splitting. With at least as many shards (holding windows of the split) as consumers, shards are
dealt to consumers once per run, largest first to the least-loaded consumer (LPT), so every window
belongs to exactly one consumer and loads stay balanced. With fewer shards than consumers every
consumer reads every shard and keeps every n-th window of one global order (window-level
striding): still exactly once, at n-fold read cost, which only happens for small data sets.

Order. Per epoch, a consumer's shards are shuffled (seed, epoch, consumer) and grouped into runs of
consecutive shards holding >= `shuffle_buffer` windows and >= `shuffle_shards` shards; the windows of
a group are visited in a keyed pseudo-random permutation. So the shuffle is exact within a group (a
whole small data set such as ETTh1 is one group: a full shuffle), batches mix several shards even
when one shard holds millions of windows, and a group costs its shards' memory.

Batches. Each consumer yields whole batches of its own windows. drop_last: a consumer yields
floor(N_c / B) batches; then every rank is cut to T = the minimum over ranks of its consumers' batch
counts (trimming its fullest workers first), so all ranks take exactly T steps per epoch. Shard
assignment is fixed for the run, hence T (= len(loader)) is the same every epoch. The windows not
yielded (per worker remainders + the cut) are the epoch's tail, reported as `tail_dropped`; the
tail is different random windows each epoch when shuffling (the same windows without it).
"""
from __future__ import annotations

import heapq
import logging
from typing import Optional

import numpy as np

from .errors import DataError
from .windows import Permutation, ShardWindows

log = logging.getLogger("data_pipeline")


def fit_quotas(full: list[int], target: int) -> list[int]:
    """Reduce per-worker batch counts to sum to `target`, trimming the largest first (deterministic)."""
    q = list(full)
    excess = sum(q) - target
    while excess > 0:
        top = max(q)
        idx = [i for i, v in enumerate(q) if v == top]
        nxt = max((v for v in q if v < top), default=0)
        room = (top - nxt) * len(idx)
        if room <= excess:
            for i in idx:
                q[i] = nxt
            excess -= room
        else:
            d, r = divmod(excess, len(idx))
            for j, i in enumerate(idx):
                q[i] -= d + (1 if j >= len(idx) - r else 0)
            excess = 0
    return q


class Sequence:
    """The order one consumer visits its windows in one epoch; positions 0..n-1."""

    def __init__(self, plan: "Plan", consumer: int, epoch: int):
        self.plan, self.consumer, self.epoch = plan, consumer, epoch
        rng = np.random.default_rng([plan.seed, epoch, 7919])
        if plan.mode == "shard":
            ids = list(plan.assignment[consumer])
            if plan.shuffle:
                ids = [ids[i] for i in np.random.default_rng([plan.seed, epoch, 1 + consumer]).permutation(len(ids))]
            self.step, self.offset, self.tag = 1, 0, 1 + consumer
        else:
            ids = list(range(len(plan.shards)))
            if plan.shuffle:
                ids = [ids[i] for i in rng.permutation(len(ids))]
            self.step, self.offset, self.tag = plan.n_consumers, consumer, 0
        self.shard_ids = np.asarray(ids, dtype=np.int64)
        totals = np.asarray([plan.shards[i].total for i in ids], dtype=np.int64)
        self.shard_cum = np.concatenate([[0], np.cumsum(totals)]).astype(np.int64)
        # groups: runs of consecutive shards with >= shuffle_buffer windows and >= shuffle_shards shards
        # (one shard each if no shuffle)
        starts = [0]
        acc = 0
        for k, t in enumerate(totals):
            acc += int(t)
            full = acc >= plan.shuffle_buffer and k + 1 - starts[-1] >= plan.shuffle_shards
            if (not plan.shuffle or full) and k + 1 < len(totals):
                starts.append(k + 1)
                acc = 0
        self.group_first = np.asarray(starts, dtype=np.int64)  # first shard (sequence index) of each group
        self.group_cum = self.shard_cum[self.group_first]
        self.total = int(self.shard_cum[-1])  # windows in the global/consumer order
        self.n = plan.counts[consumer]
        self._perms: dict[int, Permutation] = {}

    def group_shards(self, g: int) -> list[int]:
        lo = int(self.group_first[g])
        hi = int(self.group_first[g + 1]) if g + 1 < len(self.group_first) else len(self.shard_ids)
        return [int(s) for s in self.shard_ids[lo:hi]]

    @property
    def n_groups(self) -> int:
        return len(self.group_first)

    def locate(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions -> (shard id, window number within that shard, group)."""
        gpos = np.asarray(pos, dtype=np.int64) * self.step + self.offset
        grp = np.searchsorted(self.group_cum, gpos, side="right") - 1
        if self.plan.shuffle:
            off = gpos - self.group_cum[grp]
            for g in np.unique(grp):
                m = grp == g
                perm = self._perms.get(int(g))
                if perm is None:
                    size = self._group_size(int(g))
                    perm = self._perms[int(g)] = Permutation(size, (self.plan.seed, self.epoch, self.tag, int(g)))
                off[m] = perm(off[m])
            gpos = self.group_cum[grp] + off
        k = np.searchsorted(self.shard_cum, gpos, side="right") - 1
        return self.shard_ids[k], gpos - self.shard_cum[k], grp

    def _group_size(self, g: int) -> int:
        end = int(self.group_cum[g + 1]) if g + 1 < len(self.group_cum) else self.total
        return end - int(self.group_cum[g])


class Plan:
    def __init__(self, shards: list[ShardWindows], *, world_size: int, rank: int, workers: int, batch_size: int,
                 seed: int, shuffle: bool, shuffle_buffer: int, drop_last: bool = True, shuffle_shards: int = 1):
        self.shards = [s for s in shards if s.total > 0]
        self.world_size, self.rank, self.workers = world_size, rank, workers
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.shuffle_buffer, self.shuffle_shards = max(1, shuffle_buffer), max(1, shuffle_shards)
        n = self.n_consumers = world_size * workers
        total = sum(s.total for s in self.shards)
        if total == 0:
            raise DataError("no windows: every series of the split is shorter than one window "
                            "(or the split is empty); lower seq_len or set data.short_series: pad")
        self.mode = "shard" if len(self.shards) >= n else "stride"
        if self.mode == "shard":
            self.assignment: list[list[int]] = [[] for _ in range(n)]
            heap = [(0, c) for c in range(n)]
            order = sorted(range(len(self.shards)), key=lambda i: (-self.shards[i].total, i))
            for i in order:  # LPT: largest shard to the least-loaded consumer
                load, c = heapq.heappop(heap)
                self.assignment[c].append(i)
                heapq.heappush(heap, (load + self.shards[i].total, c))
            self.assignment = [sorted(a) for a in self.assignment]  # manifest order; epochs shuffle it
            self.counts = [sum(self.shards[i].total for i in a) for a in self.assignment]
        else:
            self.assignment = []
            self.counts = [len(range(c, total, n)) for c in range(n)]
        self.total = total
        B = batch_size
        if drop_last:
            full = [c // B for c in self.counts]
            per_rank = [sum(full[r * workers:(r + 1) * workers]) for r in range(world_size)]
            self.steps = min(per_rank)
            if self.steps == 0:
                worst = int(np.argmin(per_rank))
                raise DataError(f"rank {worst} gets {sum(self.counts[worst * workers:(worst + 1) * workers])} "
                                f"windows, fewer than one batch of {B} per worker it needs: use a smaller "
                                f"batch_size, fewer workers/ranks, or a larger stride-1 split")
            self.quotas: list[int] = []
            for r in range(world_size):
                self.quotas += fit_quotas(full[r * workers:(r + 1) * workers], self.steps)
            used = self.steps * B * world_size
            if rank == 0 and used < 0.75 * total:
                log.warning("data: only %d of %d windows per epoch are used: shards are too few or too uneven "
                            "for %d ranks x %d workers (every rank must take the same %d steps); write more, "
                            "smaller shards (convert --shard-mb/--shard-samples)", used, total, world_size,
                            workers, self.steps)
        else:
            self.quotas = [-(-c // B) for c in self.counts]
            self.steps = sum(self.quotas[rank * workers:(rank + 1) * workers])

    def consumer(self, worker: int) -> int:
        return self.rank * self.workers + worker

    def rank_quotas(self, rank: Optional[int] = None) -> list[int]:
        r = self.rank if rank is None else rank
        return self.quotas[r * self.workers:(r + 1) * self.workers]

    def tail_dropped(self, rank: Optional[int] = None) -> int:
        r = self.rank if rank is None else rank
        got = sum(self.counts[r * self.workers:(r + 1) * self.workers])
        return max(0, got - sum(self.rank_quotas(r)) * self.batch_size) if self.drop_last else 0

    def sequence(self, consumer: int, epoch: int) -> Sequence:
        return Sequence(self, consumer, epoch)

    def describe(self) -> dict:
        return {"mode": self.mode, "consumers": self.n_consumers, "shards": len(self.shards),
                "windows": self.total, "windows_per_consumer": list(self.counts), "steps_per_epoch": self.steps,
                "quotas": list(self.quotas)}
