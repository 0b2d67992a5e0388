"""`ShardStream`: the IterableDataset that turns shards into batches of windows.

Every position of a consumer's epoch order (plan.py) maps to one window without reading data, so a
consumer can start at any position: that is how mid-epoch resume works (no replay, no buffer state
to save). Each yielded item is `(n consecutive batches [n, B, C, L] float32, n BatchInfo)`, which
`StreamLoader` turns into `state_dict()` and `stats` across DataLoader processes.

Read-ahead: daemon threads fetch (with retries), verify, decode and z-score the next `read_ahead`
shards while the current group is being cut into windows, so in steady state the consumer never
waits on storage. DataLoader's `prefetch_factor` (data.prefetch) then
overlaps window cutting with the training step.

Bad input: a shard that cannot be decoded, does not match its manifest, or a series with NaN/inf
raises `ShardError` naming the shard (and series) when its turn comes, or with `on_bad_sample:
skip` its windows are skipped and counted (`skipped_bad`, `bad_shards`, `bad_series`) and the
consumer tops up its quota by wrapping around its own order (`resampled`) so ranks still take equal
steps. A shard unreachable after the bounded retries is always an error: skipping through an
outage would silently drop data.
"""
from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import fs as _fs
from .config import DataConfig
from .errors import DataError, ShardError, shard_error
from .plan import Plan, Sequence
from .shards import check_against_manifest, decode, expand_shapes, sha256, shard_url
from .windows import ShardWindows, shard_windows

log = logging.getLogger("data_pipeline")

READ_JOIN_TIMEOUT_S = 60.0  # how long close() waits for read-ahead still in flight (one shard read, retries included)


class ShardUnreachable(ShardError):
    """Storage kept failing after the bounded retries; never skipped."""


@dataclass(frozen=True)
class BatchInfo:
    """Sent with each batch from the worker that cut it (across processes: it pickles). After it the
    worker stands at `pos`, the next position of its `epoch` order (skipped bad windows count; past
    the end it wraps around to top up), having yielded `k` batches this epoch: all a resume needs.
    `stats`: counter deltas since the worker's previous batch; `bad`: bad-input messages met since."""
    worker: int
    epoch: int
    pos: int
    k: int
    stats: dict
    bad: list


class _Bad:
    def __init__(self, reason: str):
        self.reason = reason


class _Prepared:
    """A shard cut to the split's rows and normalised: arrays[i] is [C, rows] float32, None if bad."""

    def __init__(self, arrays: list, bad: dict[int, str], nbytes: int, retries: int):
        self.arrays, self.bad, self.nbytes, self.retries = arrays, bad, nbytes, retries


def _spawn(fn) -> tuple[Future, threading.Thread]:
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - delivered to the consumer
            fut.set_exception(e)
    t = threading.Thread(target=run, daemon=True, name="shard-read-ahead")
    t.start()
    return fut, t


class ShardStream(IterableDataset):
    """Streams windows of one split of a manifest's shards; see the module docstring.

    `cfg` holds the data knobs; the keywords are what the trainer decides (window length, batch,
    ranks, seed) and evaluation's overrides of cfg (split, shuffle, infinite: None keeps cfg's).
    `overlap` (default: seq_len) is how many rows val/test start before their border; for
    forecasting windows of length L+H pass seq_len=L+H, overlap=L.
    """

    def __init__(self, manifest: dict, cfg: DataConfig, *, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, split: Optional[str] = None, overlap: Optional[int] = None,
                 shuffle: Optional[bool] = None, infinite: Optional[bool] = None, drop_last: bool = True):
        self.cfg = cfg = replace(cfg, split=split or cfg.split, shuffle=cfg.shuffle if shuffle is None else shuffle,
                                 infinite=cfg.infinite if infinite is None else infinite)
        split, stride, short_series = cfg.split, cfg.window_stride, cfg.short_series
        if seq_len < 1 or batch_size < 1 or stride < 1:
            raise DataError(f"seq_len, batch_size and stride must be >= 1 (got {seq_len}, {batch_size}, {stride})")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside world_size {world_size}")
        self.manifest = manifest
        self.url = manifest.get("_url", "<manifest>")
        self.fmt = manifest["format"]
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.overlap = seq_len if overlap is None else overlap
        self.independent = cfg.channels == "independent"
        if cfg.normalize and cfg.series_norm:
            raise DataError("normalize (manifest statistics) and series_norm (each series' own) exclude each other")
        self.workers = max(1, cfg.num_workers)
        self.drop_last = drop_last
        self.epoch = 0
        self.starts: Optional[list[tuple[int, int, int]]] = None  # set on copies by positioned()

        shards: list[ShardWindows] = []
        self.plan_stats: Counter = Counter()
        skipped: list[str] = []
        for i, entry in enumerate(manifest["shards"]):
            url = shard_url(manifest, entry)
            if entry["samples"] == 0 or not entry["shapes"]:
                why = entry.get("bad") or f"shard {url}: empty shard (the manifest lists 0 series)"
                if cfg.on_bad_sample == "skip":
                    self.plan_stats["bad_shards"] += 1
                    skipped.append(why)
                    log.warning("data: skipped bad input: %s", why)
                    continue
                raise ShardError(why)
            sw = shard_windows(i, url, entry, split, seq_len, stride, self.overlap, self.independent, short_series)
            if sw is not None:
                shards.append(sw)
                self.plan_stats["skipped_short"] += sw.dropped_short
                self.plan_stats["padded"] += sw.padded
        if not shards and skipped and len(skipped) == len(manifest["shards"]):
            # not "no shards hold the split": they may well hold it, but every one is bad
            raise DataError(f"{self.url or 'data.source'}: all {len(skipped)} shard(s) were skipped as bad "
                            f"(on_bad_sample: skip), nothing left to read: " + "; ".join(skipped[:3]) +
                            (f"; ... ({len(skipped) - 3} more)" if len(skipped) > 3 else ""))
        if not shards:
            avail = (manifest.get("splits") or {}).get("available")
            extra = f"; {len(skipped)} other shard(s) were skipped as bad: {skipped[0]}" if skipped else ""
            raise DataError(f"manifest {self.url}: no shards hold the {split!r} split (available: {avail}){extra}")
        chans = {int(c) for s in shards for c in s.C}
        if not self.independent and len(chans) > 1:
            by_c: dict[int, str] = {}
            for s in shards:
                for c in s.C:
                    by_c.setdefault(int(c), s.url)
            raise DataError(f"manifest {self.url}: channels=multivariate needs one channel count per batch, but "
                            f"shards differ: " + ", ".join(f"C={c} in {u}" for c, u in sorted(by_c.items())) +
                            "; use data.channels: independent")
        self.n_channels = 1 if self.independent else (chans.pop() if chans else 0)
        self.mean = self.std = None
        if cfg.normalize:
            st = manifest.get("stats")
            if not st:
                raise DataError(f"manifest {self.url}: no per-channel statistics (channel counts differ or no "
                                f"train split); set data.normalize: false")
            self.mean = np.asarray(st["mean"], dtype=np.float32)
            self.std = np.asarray(st["std"], dtype=np.float32)
            bad_c = sorted({int(c) for s in shards for c in s.C if int(c) != len(self.mean)})
            if bad_c:
                raise DataError(f"manifest {self.url}: statistics cover {len(self.mean)} channels but series "
                                f"have {bad_c}; set data.normalize: false")
        self.plan = Plan(shards, world_size=world_size, rank=rank, workers=self.workers, batch_size=batch_size,
                         seed=seed, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer, drop_last=drop_last,
                         shuffle_shards=cfg.shuffle_shards)
        if rank != 0:  # data-set-wide counts live on rank 0 only, so the trainer can sum stats over ranks
            self.plan_stats.clear()
        self.plan_stats["tail_dropped"] = self.plan.tail_dropped()

    # ------------------------------------------------------------------ reading shards

    def _load(self, sid: int) -> Any:
        """Fetch + decode + prepare one shard (runs on a read-ahead thread). Returns _Prepared or _Bad."""
        sw = self.plan.shards[sid]
        retried = [0]

        def on_retry(e: BaseException) -> None:
            retried[0] += 1
            log.warning("shard %s: transient error, retrying (%s: %s)", sw.url, type(e).__name__, e)
        try:
            data = _fs.read_bytes(sw.url, self.cfg.storage_options or {}, self.cfg.retries, self.cfg.retry_backoff,
                                  on_retry, timeout=self.cfg.io_timeout)
        except FileNotFoundError:
            return self._bad_or_raise(shard_error(sw.url, "not found"))
        except OSError as e:
            if "unreachable after" in str(e):
                raise ShardUnreachable(f"shard {e}") from None
            raise ShardUnreachable(f"shard {sw.url}: cannot read ({type(e).__name__}: {e})") from None
        except Exception as e:  # noqa: BLE001 - anything else from the storage client: name the shard
            raise ShardUnreachable(f"shard {sw.url}: cannot read ({type(e).__name__}: {e})") from None
        try:
            want = sw.entry.get("bytes")
            if want is not None and want != len(data):
                why = "truncated" if len(data) < want else "modified"
                raise shard_error(sw.url, f"{why}: {len(data)} bytes, the manifest says {want}")
            if self.cfg.verify_checksums and sw.entry.get("sha256") and sha256(data) != sw.entry["sha256"]:
                raise shard_error(sw.url, "corrupt or modified: content does not match the manifest's sha256")
            shard = decode(sw.url, data, self.fmt)
            check_against_manifest(shard, sw.entry)
            return self._prepare(sw, shard, len(data), retried[0])
        except ShardError as e:
            return self._bad_or_raise(e)

    def _bad_or_raise(self, e: ShardError) -> _Bad:
        if self.cfg.on_bad_sample == "skip":
            return _Bad(str(e))
        raise e

    def _prepare(self, sw: ShardWindows, shard, nbytes: int, retries: int) -> _Prepared:
        C, T = expand_shapes(sw.entry["shapes"])
        L, pad = self.seq_len, self.cfg.short_series == "pad"
        arrays: list = [None] * len(shard)
        bad: dict[int, str] = {}
        for i, x in enumerate(shard.arrays):
            a, b = sw.a, min(int(T[i]), sw.b)
            if b - a < L and not (pad and b - a > 0):
                continue  # no windows from this series in this split
            part = x[:, a:b]
            if self.mean is not None:  # z-score once per series; windows are views of the result
                part = (part - self.mean[:, None]) / self.std[:, None]
            elif self.cfg.series_norm and part.shape[1] > 0:  # each channel by its own split-row statistics
                p64 = part.astype(np.float64)  # large offsets (1e6 + noise) lose the noise in fp32 statistics
                with np.errstate(invalid="ignore"):
                    mu, sd = p64.mean(axis=1, keepdims=True), p64.std(axis=1, keepdims=True)
                part = ((p64 - mu) / np.maximum(sd, 1e-5)).astype(np.float32)  # NaN/inf reach the check below
            if not np.isfinite(part).all():  # NaN/inf survive the z-scoring, so one check covers both
                n_bad = int(part.size - np.count_nonzero(np.isfinite(x[:, a:b])))
                msg = (f"shard {sw.url}: series {shard.ids[i]!r} (#{i}) has {n_bad} NaN/inf value(s) "
                       f"in rows {a}..{b}")
                if self.cfg.on_bad_sample != "skip":
                    raise ShardError(msg)
                bad[i] = msg
                continue
            arrays[i] = part
        return _Prepared(arrays, bad, nbytes, retries)

    # ------------------------------------------------------------------ iteration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def worker_layout(self) -> int:
        info = get_worker_info()
        if info is None:
            if self.cfg.num_workers > 0:
                raise DataError("ShardStream was built for DataLoader workers but iterated in the main process")
            return 0
        if info.num_workers != self.workers:
            raise DataError(f"ShardStream was built for {self.workers} workers, DataLoader has {info.num_workers}")
        return info.id

    def transfer_batches(self) -> int:
        """Batches per item a DataLoader worker hands over: one ~4 MB tensor moves through shared
        memory much faster than many small ones (the per-item IPC cost dominates small batches)."""
        if self.cfg.num_workers == 0:
            return 1
        nbytes = self.batch_size * max(1, self.n_channels) * self.seq_len * 4
        return int(min(16, max(1, (4 << 20) // nbytes)))

    def positioned(self, starts: Iterable[Iterable[int]]) -> ShardStream:
        """A copy whose worker w starts at starts[w] = (epoch, pos, k) (see BatchInfo), not at the
        start of `epoch`: how a loader resumes. A copy, because DataLoader takes the dataset it is
        given into its workers; this stream stays as it was."""
        ds = copy.copy(self)
        ds.starts = [tuple(p) for p in starts]
        return ds

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[BatchInfo]]]:
        """Items are (tensor [n, B, C, L], n BatchInfo): n consecutive batches of this worker."""
        w = self.worker_layout()
        epoch, pos, k = self.starts[w] if self.starts else (self.epoch, 0, 0)
        return self._chunks(self._emit(w, self.plan.consumer(w), epoch, pos, k), self.transfer_batches())

    @staticmethod
    def _chunks(batches: Iterator[tuple[np.ndarray, BatchInfo]],
                n: int) -> Iterator[tuple[torch.Tensor, list[BatchInfo]]]:
        buf: list[np.ndarray] = []
        infos: list[BatchInfo] = []
        try:
            for b, info in batches:
                if buf and (len(buf) >= n or b.shape != buf[0].shape):
                    yield torch.from_numpy(np.stack(buf)), infos
                    buf, infos = [], []
                buf.append(b)
                infos.append(info)
                if len(buf) >= n:
                    yield torch.from_numpy(np.stack(buf)), infos
                    buf, infos = [], []
            if buf:
                yield torch.from_numpy(np.stack(buf)), infos
        finally:
            batches.close()

    def _emit(self, w: int, consumer: int, epoch: int, pos: int, k: int) -> Iterator[tuple[np.ndarray, BatchInfo]]:
        B, quota = self.batch_size, self.plan.quotas[consumer]
        stats: Counter = Counter()
        bad_msgs: list[str] = []
        # every consumer reads every shard when striding: let consumer 0 alone count bad shards/series
        cache = _Cache(self, stats, count_bad=self.plan.mode == "shard" or consumer == 0)
        try:
            for epoch in itertools.count(epoch) if self.cfg.infinite else (epoch,):
                seq = self.plan.sequence(consumer, epoch)
                cache.start(seq)
                N = seq.n
                # Bad shards/series are counted when the consumer first takes a window of their group, so
                # a resume (groups before `pos` are in the restored counters) or a wrap-around top-up
                # (pos >= N re-reads groups) never counts them twice.
                last = int(seq.locate(np.asarray([min(pos, N) - 1]))[2][0]) if pos > 0 else -1
                counted = set(range(last + 1))
                run = 0  # consecutive skipped positions: a whole lap without a window is an error
                ahead: list = []  # windows located + sliced ahead of need (never past the quota's last position)
                wins: list[np.ndarray] = []
                # drop_last: whole batches, topped up past N by wrapping around; else up to B until N
                while k < quota and (self.drop_last or pos < N):
                    if not ahead:
                        need = (quota - k) * B - len(wins) if self.drop_last else N - pos
                        ps = np.arange(pos, pos + max(1, min(need, 2048)), dtype=np.int64)
                        located = seq.locate(ps % N)
                        ahead = list(zip(cache.fetch(*located), located[2].tolist()))[::-1]
                    x, grp = ahead.pop()
                    if pos >= N:
                        stats["resampled"] += x is not None
                    elif grp not in counted:
                        counted.add(grp)
                        if cache.count_bad:
                            n_shards, n_series, msgs = cache.group_bad.get(grp, (0, 0, []))
                            stats["bad_shards"] += n_shards
                            stats["bad_series"] += n_series
                            bad_msgs.extend(msgs)
                    pos += 1
                    if x is None:
                        stats["skipped_bad"] += 1
                        run += 1
                        if run >= N:
                            seen = [m for _, _, ms in cache.group_bad.values() for m in ms]
                            raise DataError(f"consumer {consumer}: no valid window in a whole pass over "
                                            f"its shards ({N} windows skipped as bad): " + "; ".join(seen[:3]))
                    else:
                        run = 0
                        wins.append(x)
                    if len(wins) == B or (wins and not self.drop_last and pos >= N):
                        k += 1
                        stats["windows"] += len(wins)
                        stats["batches"] += 1
                        info = BatchInfo(w, epoch, pos, k, dict(stats), bad_msgs)
                        stats.clear()
                        batch, wins, bad_msgs = np.stack(wins), [], []
                        yield batch, info
                pos = k = 0
        finally:
            cache.close()

    def iter_windows(self, worker: int = 0, epoch: Optional[int] = None) -> Iterator[tuple[tuple, np.ndarray]]:
        """Every window of one consumer's epoch in stream order, without batching or quotas:
        ((manifest shard index, series, start row, channel), window). For tests and evaluation."""
        epoch = self.epoch if epoch is None else epoch
        seq = self.plan.sequence(self.plan.consumer(worker), epoch)
        cache = _Cache(self, Counter())
        cache.start(seq)
        try:
            for lo in range(0, seq.n, 4096):
                ps = np.arange(lo, min(seq.n, lo + 4096), dtype=np.int64)
                sids, wis, grps = seq.locate(ps)
                keys = cache.keys(sids, wis)
                for key, x in zip(keys, cache.fetch(sids, wis, grps)):
                    if x is not None:
                        yield key, x
        finally:
            cache.close()


class _Cache:
    """The decoded shards of the current group, plus read-ahead futures for the next ones."""

    def __init__(self, ds: ShardStream, stats: Counter, count_bad: bool = True):
        self.ds, self.stats, self.count_bad = ds, stats, count_bad
        self.seq: Optional[Sequence] = None
        self.futures: dict[int, Future] = {}
        self.threads: list[threading.Thread] = []  # every read still running, dropped ones included
        self.ready: dict[int, Any] = {}
        self.group = -1
        # group -> (bad shards, bad series, messages) of this epoch's order; the consumer counts them
        self.group_bad: dict[int, tuple[int, int, list[str]]] = {}

    def start(self, seq: Sequence) -> None:
        self.seq, self.group = seq, -1
        self.ready.clear()
        self.group_bad.clear()

    def close(self) -> None:
        """Wait for the reads still running: a daemon thread left inside pyarrow or numpy when the
        interpreter exits aborts the process ("terminate called without an active exception")."""
        self.futures.clear()
        self.ready.clear()
        deadline = time.monotonic() + READ_JOIN_TIMEOUT_S
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self.threads):
            log.warning("data: shard reads still run %.0f s after close; leaving them", READ_JOIN_TIMEOUT_S)
        self.threads.clear()

    def _enter(self, g: int) -> None:
        seq = self.seq
        need = seq.group_shards(g)
        read_ahead = max(0, self.ds.cfg.read_ahead)
        upcoming: list[int] = []
        for h in range(g + 1, seq.n_groups):
            upcoming += seq.group_shards(h)
            if len(upcoming) >= read_ahead:
                break
        upcoming = upcoming[:read_ahead]
        keep = set(need) | set(upcoming)
        for sid in need + upcoming:
            if sid not in self.futures and sid not in self.ready:
                self.futures[sid], t = _spawn(lambda sid=sid: self.ds._load(sid))
                self.threads = [u for u in self.threads if u.is_alive()] + [t]
        self.ready = {s: v for s, v in self.ready.items() if s in keep}
        for sid in list(self.futures):
            if sid not in keep:
                del self.futures[sid]  # a wrap-around jumped past it; close() still waits for it
        for sid in need:
            if sid not in self.ready:
                res = self.futures.pop(sid).result()  # re-raises the loader's exception here, in order
                if not isinstance(res, _Bad):  # I/O counters count every read, re-reads included
                    self.stats["shards_read"] += 1
                    self.stats["bytes_read"] += res.nbytes
                    self.stats["retries"] += res.retries
                self.ready[sid] = res
        bad = [self.ready[sid] for sid in need if isinstance(self.ready[sid], _Bad)]
        series = [m for sid in need if not isinstance(self.ready[sid], _Bad) for m in self.ready[sid].bad.values()]
        for msg in [b.reason for b in bad] + series:
            log.debug("skipping %s", msg)  # reported by the loader in the main process
        self.group_bad[g] = (len(bad), len(series), [b.reason for b in bad] + series)
        self.group = g

    def keys(self, sids: np.ndarray, wis: np.ndarray) -> list[tuple[int, int, int, int]]:
        """(manifest shard index, series, start row, channel) of each window."""
        ser, st, ch = self._locate(sids, wis)
        idx = [self.ds.plan.shards[s].index for s in sids.tolist()]
        return list(zip(idx, ser.tolist(), st.tolist(), ch.tolist()))

    def _locate(self, sids: np.ndarray, wis: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ser, st, ch = (np.empty(len(sids), dtype=np.int64) for _ in range(3))
        for sid in np.unique(sids):
            m = sids == sid
            ser[m], st[m], ch[m] = self.ds.plan.shards[int(sid)].locate(wis[m])
        return ser, st, ch

    def fetch(self, sids: np.ndarray, wis: np.ndarray, grps: np.ndarray) -> list[Optional[np.ndarray]]:
        """The windows at these (shard, window, group) places, in order; None where the data is bad."""
        ser, st, ch = self._locate(sids, wis)
        L = self.ds.seq_len
        out: list[Optional[np.ndarray]] = []
        for sid, s, start, c, g in zip(sids.tolist(), ser.tolist(), st.tolist(), ch.tolist(), grps.tolist()):
            if g != self.group:
                self._enter(g)
            res = self.ready[sid]
            x = None if isinstance(res, _Bad) else res.arrays[s]
            if x is None:
                out.append(None)
                continue
            a = start - self.ds.plan.shards[sid].a
            if c >= 0:
                x = x[c:c + 1]
            if x.shape[1] >= a + L:
                out.append(x[:, a:a + L])
            else:  # short_series: pad (zeros after the series)
                pad = np.zeros((x.shape[0], L), dtype=np.float32)
                pad[:, :x.shape[1]] = x
                out.append(pad)
        return out
