"""`build_loader`: the trainer's one entry point, and `StreamLoader`, which wraps ShardStream in a
DataLoader (or a producer thread when num_workers == 0) and owns the resume state.

Order across workers. DataLoader delivers workers' batches round-robin from worker 0 on every new
iterator; after a resume the uninterrupted run would continue at some other worker. So the loader
fixes the order itself (round-robin over workers that still have quota, from a saved pointer) and
reorders the few batches DataLoader hands over early. Together with position-addressable streams
this makes `load_state_dict` + iterate yield exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import atexit
import copy
import logging
import queue
import threading
import time
import weakref
from collections import Counter, deque
from typing import Any, Iterable, Iterator, Optional, TypedDict

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import fs as _fs
from .config import DataConfig
from .convert import ensure_converted
from .errors import DataError, ShardError
from .readers import is_raw
from .shards import (ChannelStats, decode, make_manifest, load_manifest, shard_entry, shard_url, sniff_format,
                     Series)
from .stream import READ_JOIN_TIMEOUT_S, ShardStream
from .windows import split_rows

log = logging.getLogger("data_pipeline")
STATE_VERSION = 1
STAT_KEYS = ("windows", "batches", "tail_dropped", "skipped_short", "padded", "skipped_bad", "bad_series",
             "bad_shards", "resampled", "shards_read", "bytes_read", "retries")


class Position(TypedDict):
    """Where a pass stands, as of the last batch handed out."""
    epoch: int
    workers: list[list[int]]  # per worker [epoch, pos, k] of its last batch handed out (see BatchInfo)
    ptr: int  # the worker whose batch comes next (round-robin over those with quota left)
    batches: int  # batches handed out this epoch
    done: list[bool]  # workers with nothing more to give (drop_last=False: their stream ended)


class LoaderState(Position):
    """`StreamLoader.state_dict()`. Checkpoints persist it as JSON: changing a field or its meaning
    needs a new STATE_VERSION, or older checkpoints no longer load."""
    version: int
    layout: dict  # StreamLoader._layout(): a state resumes only the same layout and data
    stats: dict  # the counters of the batches handed out (the plan's own are recomputed)


# ----------------------------------------------------------------------------- sources

def _has_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def scan_shards(urls: list[str], fmt: str = "auto", storage_options: Optional[dict] = None,
                retries: int = 3, on_bad_sample: str = "error", timeout: Optional[float] = _fs.DEFAULT_IO_TIMEOUT,
                backoff: float = 0.2) -> dict:
    """An in-memory manifest for bare shard URLs (no manifest.json): reads every shard once to learn
    series shapes and per-channel statistics (all data counts as `train`). Prefer real manifests.

    With on_bad_sample == "skip" a shard that cannot be decoded is listed empty with its reason; the
    stream then skips and counts it like any bad shard."""
    if not urls:
        raise DataError("no shard files matched")
    fmts = {sniff_format(u) if fmt == "auto" else fmt for u in urls}
    if len(fmts) != 1:
        raise DataError(f"mixed shard formats {sorted(fmts)}; list one format per data set")
    fmt = fmts.pop()
    entries, stats, hetero = [], ChannelStats(), False
    for u in urls:
        try:
            data = _fs.read_bytes(u, storage_options, retries=retries, backoff=backoff, timeout=timeout)
        except FileNotFoundError:
            raise DataError(f"shard {u}: not found") from None
        except OSError as e:
            raise DataError(f"shard {e}" if str(e).startswith(u) else f"shard {u}: {e}") from None
        try:
            shard = decode(u, data, fmt)
        except ShardError as e:
            if on_bad_sample != "skip":
                raise
            entries.append({"url": u, "split": None, "samples": 0, "points": 0, "shapes": [], "bytes": len(data),
                            "sha256": None, "bad": str(e)})
            continue
        recs = [Series(i, a) for i, a in zip(shard.ids, shard.arrays)]
        for r in recs:
            if not hetero:
                try:
                    stats.add(r.values[:, np.isfinite(r.values).all(axis=0)])
                except DataError:
                    hetero = True
        entries.append(shard_entry(u, recs, data, None))
    m = make_manifest(_fs.protocol_of(urls[0]), fmt, entries, splits={"by": ["none"], "available": ["train"]},
                      stats=None if hetero else stats.to_dict("all series (scanned)"))
    m["_url"] = ""
    return m


def resolve_manifest(source: str, *, fmt: str = "auto", cache_dir: str = "data/shards",
                     storage_options: Optional[dict] = None, retries: int = 3, backoff: float = 0.2,
                     on_bad_sample: str = "error", timeout: Optional[float] = _fs.DEFAULT_IO_TIMEOUT) -> dict:
    """data.source -> manifest: a manifest .json; a folder holding manifest.json; shard URL(s) or a glob
    (scanned); or a raw file (.csv/.pt/.npy/.npz/.tsv) converted under cache_dir on first use."""
    so = storage_options or {}
    if is_raw(source):
        url = ensure_converted(source, cache_dir, "parquet" if fmt == "auto" else fmt, so, retries, timeout=timeout)
        return load_manifest(url, so, retries, backoff, timeout)
    if source.endswith(".json"):
        return load_manifest(source, so, retries, backoff, timeout)
    try:
        if _has_glob(source):
            return scan_shards(_fs.glob(source, so, timeout), fmt, so, retries, on_bad_sample, timeout, backoff)
        if source.endswith((".parquet", ".pq", ".tar")):
            return scan_shards([source], fmt, so, retries, on_bad_sample, timeout, backoff)
        try:
            is_dir = _fs.isdir(source, so, timeout)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"data.source {source}: cannot be reached ({type(e).__name__}: {e})") from None
        if is_dir:
            m_url = source.rstrip("/") + "/manifest.json"
            if _fs.exists(m_url, so, timeout):
                return load_manifest(m_url, so, retries, backoff, timeout)
            found = sorted(_fs.glob(source.rstrip("/") + "/*.parquet", so, timeout) +
                           _fs.glob(source.rstrip("/") + "/*.tar", so, timeout))
            return scan_shards(found, fmt, so, retries, on_bad_sample, timeout, backoff)
    except OSError as e:
        if "unreachable" not in str(e):
            raise
        raise DataError(f"data.source {source}: {e}") from None
    raise DataError(f"data.source {source}: not found (expected a manifest .json, a folder, shard URL/glob, "
                    f"or a .csv/.pt/.npy/.npz/.tsv file)")


# ----------------------------------------------------------------------------- loader

class _ThreadSource:
    """num_workers == 0: run the stream on one producer thread so batches are cut while the model steps."""

    _END = object()

    def __init__(self, it: Iterator, depth: int):
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.it = it
        self.ended = False
        self.t = threading.Thread(target=self._run, daemon=True, name="data-pipeline-producer")
        self.t.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self.it:
                if not self._put(item):
                    break
            else:
                self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._put(e)
        finally:
            close = getattr(self.it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    pass

    def __next__(self) -> Any:
        if self.ended:
            raise StopIteration
        while True:
            try:
                item = self.q.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.t.is_alive() and self.q.empty():
                    raise DataError("data producer thread died without a result") from None
        if item is self._END:
            self.ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        while True:
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        # Join: a daemon thread still inside native code (pyarrow, torch) when the interpreter
        # exits aborts the process ("terminate called without an active exception").
        if self.t is not threading.current_thread():
            self.t.join(timeout=READ_JOIN_TIMEOUT_S + 30)  # it first waits for its read-ahead


_OPEN: "weakref.WeakSet[StreamLoader]" = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    """A pass still open at exit (left by an exception, or by `break` in a frame kept alive) has
    threads inside pyarrow or numpy; interpreter finalisation would abort the process on them."""
    for loader in list(_OPEN):
        loader.close()


class StreamLoader:
    """Iterable over [B, C, L] float32 batches; see build_loader for the contract."""
    shared = False  # as run state (trainer/state.py): each rank's own position in the stream

    def __init__(self, dataset: ShardStream, num_workers: int = 0, prefetch: int = 4, pin_memory: bool = False):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.workers = max(1, num_workers)
        self.prefetch = max(1, prefetch)
        self.wait_seconds = 0.0
        self.bad_reports: list[str] = []
        self._counters: Counter = Counter()
        self._state = self._fresh(dataset.epoch)
        self._pending: Optional[Position] = None
        self._active: Optional[Iterator] = None

    # -------------------------------------------------------------- contract

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch`; a loaded resume state survives only if it is for this epoch."""
        epoch = int(epoch)
        if self._pending is not None and self._pending["epoch"] != epoch:
            log.warning("set_epoch(%d) discards the loaded resume state of epoch %d", epoch, self._pending["epoch"])
            self._pending = None
        self.dataset.set_epoch(epoch)
        if self._pending is None:
            self._state = self._fresh(epoch)

    def __len__(self) -> int:
        """Batches per epoch for this rank, identical on every rank and every epoch (infinite mode: per pass)."""
        return self.dataset.plan.steps

    @property
    def stats(self) -> dict:
        """Counters for the trainer's logs, summed over workers (every key always present)."""
        s = Counter(dict.fromkeys(STAT_KEYS, 0))
        s.update(self.dataset.plan_stats)
        s.update(self._counters)
        return dict(s)

    def describe(self) -> dict:
        return self.dataset.plan.describe()

    def _fresh(self, epoch: int) -> Position:
        return {"epoch": epoch, "workers": [[epoch, 0, 0] for _ in range(self.workers)], "ptr": 0, "batches": 0,
                "done": [False] * self.workers}

    def _layout(self) -> dict:
        """What the positions are valid for: a state loads only where every value is equal. Saved in
        checkpoints, so keep its keys and values."""
        d, c, p = self.dataset, self.dataset.cfg, self.dataset.plan
        return {"rank": d.rank, "world_size": d.world_size, "num_workers": c.num_workers, "batch_size": d.batch_size,
                "seq_len": d.seq_len, "stride": c.window_stride, "overlap": d.overlap, "split": c.split,
                "channels": c.channels, "short_series": c.short_series, "seed": d.seed, "shuffle": p.shuffle,
                "shuffle_buffer": p.shuffle_buffer, "shuffle_shards": p.shuffle_shards, "infinite": c.infinite,
                "drop_last": d.drop_last, "normalize": c.normalize, "series_norm": c.series_norm,
                "on_bad_sample": c.on_bad_sample, "content_hash": d.manifest.get("content_hash")}

    def state_dict(self) -> LoaderState:
        """JSON-serialisable; restores the exact remaining sequence for the same layout."""
        st = copy.deepcopy(self._state)
        return {"version": STATE_VERSION, "layout": self._layout(), **st, "stats": dict(self._counters)}

    def load_state_dict(self, sd: dict) -> None:
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise DataError(f"loader state: unsupported version {sd.get('version') if isinstance(sd, dict) else sd!r}")
        mine, theirs = self._layout(), sd.get("layout", {})
        diff = [f"{k}: saved {theirs.get(k)!r}, now {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if diff:
            raise DataError("loader state was saved with a different layout or data; exact resume needs the same "
                            "ranks x workers, batch and window settings and shards: " + "; ".join(diff))
        if len(sd["workers"]) != self.workers:
            raise DataError(f"loader state holds {len(sd['workers'])} worker positions, loader has {self.workers}")
        self._state = {k: copy.deepcopy(sd[k]) for k in Position.__annotations__}
        self._counters = Counter(sd.get("stats", {}))
        self._pending = self._state
        self.dataset.set_epoch(sd["epoch"])

    # -------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._pending is not None:
            st, self._pending = self._pending, None
        else:
            st = self._fresh(self.dataset.epoch)
        self._state = st
        self.close()  # one pass at a time: a new one ends the last (its threads are joined)
        self._active = self._run(st)
        _OPEN.add(self)
        return self._active

    def close(self) -> None:
        """End the current pass now and join its threads (reads in flight included). Passes still
        open when the interpreter exits are closed by an atexit hook."""
        active, self._active = self._active, None
        _OPEN.discard(self)
        if active is not None:
            active.close()

    def _next_worker(self, st: Position, quotas: list[int]) -> Optional[int]:
        W = self.workers
        for i in range(W):
            w = (st["ptr"] + i) % W
            if st["done"][w]:
                continue
            if self.dataset.cfg.infinite or st["workers"][w][2] < quotas[w]:
                return w
        return None

    def _run(self, st: Position) -> Iterator[torch.Tensor]:
        ds = self.dataset
        quotas = ds.plan.rank_quotas()
        if self._next_worker(st, quotas) is None:
            return
        positioned = ds.positioned(st["workers"])
        if self.num_workers == 0:
            chunks = iter(positioned)
            source: Any = _ThreadSource(_pinned(chunks, torch.cuda.current_device()) if self.pin_memory else chunks,
                                        self.prefetch)
        else:
            dl = DataLoader(positioned, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch,
                            persistent_workers=False, pin_memory=self.pin_memory)
            source = iter(dl)
        buffers: dict[int, deque] = {w: deque() for w in range(self.workers)}
        try:
            while True:
                w = self._next_worker(st, quotas)
                if w is None:
                    return
                t0 = time.perf_counter()
                while not buffers[w]:
                    try:
                        chunk, infos = next(source)
                    except StopIteration:
                        if not ds.drop_last:
                            for v in range(self.workers):
                                st["done"][v] = not buffers[v]
                            break
                        raise DataError(f"worker {w} stopped after {st['workers'][w][2]} of {quotas[w]} batches "
                                        f"(inconsistent plan)") from None
                    buffers[infos[0].worker].extend(zip(chunk.unbind(0), infos))
                self.wait_seconds += time.perf_counter() - t0
                if not buffers[w]:
                    continue
                batch, info = buffers[w].popleft()
                st["workers"][w] = [info.epoch, info.pos, info.k]
                st["ptr"] = (w + 1) % self.workers
                st["batches"] += 1
                self._counters.update(info.stats)
                for msg in info.bad:
                    if msg not in self.bad_reports:  # striding workers all meet the same bad shard
                        log.warning("data: skipped bad input: %s", msg)
                        if len(self.bad_reports) < 100:
                            self.bad_reports.append(msg)
                yield batch
        finally:
            if isinstance(source, _ThreadSource):
                source.close()
            else:
                # shut workers down now: an exception's traceback would otherwise keep the iterator
                # (and its processes) alive until garbage collection
                shutdown = getattr(source, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()


def build_loader(cfg: DataConfig, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 2023, *, split: Optional[str] = None, overlap: Optional[int] = None,
                 shuffle: Optional[bool] = None, infinite: Optional[bool] = None,
                 drop_last: bool = True, pin_memory: bool = False) -> StreamLoader:
    """The trainer's data: `for batch in loader` gives [batch_size, C, seq_len] float32 tensors
    (C = 1 with channels: independent), the same number of batches on every rank (= len(loader)).

    Keyword overrides are for evaluation/fine-tuning: another split, forecasting windows
    (seq_len=L+H, overlap=L), no shuffle, and drop_last=False (then ranks may differ in steps:
    single-process evaluation only). `pin_memory` (needs CUDA): batches in page-locked memory, pinned
    off the training thread, for `to_device`'s asynchronous copies.
    """
    cfg.validate()
    manifest = resolve_manifest(cfg.source, fmt=cfg.format, cache_dir=cfg.cache_dir,
                                storage_options=cfg.storage_options, retries=cfg.retries, backoff=cfg.retry_backoff,
                                on_bad_sample=cfg.on_bad_sample, timeout=cfg.io_timeout)
    if cfg.format != "auto" and manifest["format"] != cfg.format:
        raise DataError(f"data.format is {cfg.format!r} but {manifest.get('_url') or cfg.source} holds "
                        f"{manifest['format']!r} shards")
    ds = ShardStream(manifest, cfg, seq_len=seq_len, batch_size=batch_size, rank=rank, world_size=world_size,
                     seed=seed, split=split, overlap=overlap, shuffle=shuffle, infinite=infinite, drop_last=drop_last)
    return StreamLoader(ds, num_workers=cfg.num_workers, prefetch=cfg.prefetch, pin_memory=pin_memory)


def _pinned(chunks: Iterator, device: int) -> Iterator:
    """The stream's chunks copied to page-locked memory on the producer thread (the pinned buffers
    come from `device`'s context, not a new one on GPU 0)."""
    torch.cuda.set_device(device)
    try:
        for chunk, infos in chunks:
            yield chunk.pin_memory(), infos
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def to_device(batches: Iterable[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """`batches` on `device`. On CUDA each is copied on a side stream (non-blocking, from pinned
    memory) that the compute stream then waits for: the training loop does not stop the host between
    log steps, so it queues batch k+1's copy while the GPU still computes batch k, and the two
    overlap. Nothing is fetched ahead on the host: the loader's resume state would then count a
    batch not yet trained on. Elsewhere a plain `.to(device)` (the same tensor on the CPU)."""
    if device.type != "cuda":
        for batch in batches:
            yield batch.to(device)
        return
    side, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    for batch in batches:
        with torch.cuda.stream(side):
            x = batch.to(device, non_blocking=True)
        compute.wait_stream(side)
        x.record_stream(compute)  # allocated on the side stream, used on the compute stream
        yield x


def load_split_array(source: str, split: str, seq_len: int, *, cache_dir: str = "data/shards",
                     storage_options: Optional[dict] = None, normalize: bool = True, retries: int = 3) -> np.ndarray:
    """The rows of one split of a single-series data set (a TSLib CSV) as [C, T] float32, z-scored with
    the train statistics; val/test start seq_len rows early (the spec's L overlap)."""
    m = resolve_manifest(source, cache_dir=cache_dir, storage_options=storage_options, retries=retries)
    entries = [e for e in m["shards"] if e.get("borders")]
    n_series = sum(e["samples"] for e in entries)
    if n_series != 1:
        raise DataError(f"{source}: load_split_array needs exactly one time-split series, the manifest has "
                        f"{n_series}; use build_loader for multi-series data")
    e = entries[0]
    rows = split_rows(e, split, seq_len)
    if rows is None:
        raise DataError(f"{source}: no {split!r} split (borders: {e['borders']})")
    url = shard_url(m, e)
    try:
        data = _fs.read_bytes(url, storage_options, retries=retries)
    except FileNotFoundError:
        raise DataError(f"shard {url}: not found") from None
    x = decode(url, data, m["format"]).arrays[0]
    a, b = rows[0], min(rows[1], x.shape[1])
    x = x[:, a:b]
    if normalize:
        st = m.get("stats")
        if not st:
            raise DataError(f"{source}: the manifest has no statistics to normalise with")
        x = (x - np.asarray(st["mean"], np.float32)[:, None]) / np.asarray(st["std"], np.float32)[:, None]
    return np.ascontiguousarray(x, dtype=np.float32)
