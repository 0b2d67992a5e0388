"""Mid-epoch resume: after state_dict at batch k, a fresh loader yields exactly the rest of the run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline import DataConfig, DataError, build_loader, write_series
from data_pipeline.testing import identity_series

SEQ = 12
LENGTHS = [int(v) for v in np.random.default_rng(11).integers(15, 120, size=30)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("resume")
    return write_series(identity_series(LENGTHS, 2), str(out), "parquet", shard_samples=3, progress=False)["_url"]


def make(url: str, rank: int, world: int, workers: int, **kw):
    cfg = DataConfig(source=url, num_workers=workers, window_stride=2, shuffle_buffer=kw.pop("shuffle_buffer", 64),
                     **kw)
    return build_loader(cfg, seq_len=SEQ, batch_size=8, rank=rank, world_size=world, seed=17)


def take(loader, k: int) -> tuple[list, dict]:
    it = iter(loader)
    got = [next(it) for _ in range(k)]
    sd = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
    it.close()
    return got, sd


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_resume_equals_uninterrupted_run(corpus, world, workers):
    for rank in range(world):
        full = list(make(corpus, rank, world, workers))
        n = len(full)
        assert n == len(make(corpus, rank, world, workers)) > 6
        for k in (0, 1, 5, n - 1, n):
            first, sd = take(make(corpus, rank, world, workers), k)
            resumed = make(corpus, rank, world, workers)
            resumed.load_state_dict(sd)
            rest = list(resumed)
            assert same(first + rest, full), (rank, k)
            assert resumed.stats["batches"] == n


def test_resume_in_a_later_epoch_and_set_epoch_semantics(corpus):
    ld = make(corpus, 0, 1, 2)
    ld.set_epoch(3)
    full = list(ld)
    ld2 = make(corpus, 0, 1, 2)
    ld2.set_epoch(3)
    first, sd = take(ld2, 4)
    assert sd["epoch"] == 3
    ld3 = make(corpus, 0, 1, 2)
    ld3.load_state_dict(sd)
    ld3.set_epoch(3)  # the trainer's usual loop: same epoch keeps the resume point
    assert same(first + list(ld3), full)
    ld4 = make(corpus, 0, 1, 2)
    ld4.load_state_dict(sd)
    ld4.set_epoch(4)  # another epoch: starts that epoch from the beginning
    ld5 = make(corpus, 0, 1, 2)
    ld5.set_epoch(4)
    assert same(list(ld4), list(ld5))


def test_resume_infinite_mode_across_epoch_boundaries(corpus):
    n = len(make(corpus, 0, 1, 2))
    total = 2 * n + 5
    it = iter(make(corpus, 0, 1, 2, infinite=True))
    full = [next(it) for _ in range(total)]
    it.close()
    for k in (n - 1, n + 3):
        first, sd = take(make(corpus, 0, 1, 2, infinite=True), k)
        ld = make(corpus, 0, 1, 2, infinite=True)
        ld.load_state_dict(sd)
        it = iter(ld)
        rest = [next(it) for _ in range(total - k)]
        it.close()
        assert same(first + rest, full)


def test_resume_with_skipped_bad_series(tmp_path):
    recs = identity_series(LENGTHS, 2)
    recs[4].values[1, 7] = np.nan
    recs[17].values[0, 3] = np.inf
    url = write_series(recs, str(tmp_path), "parquet", shard_samples=3, allow_nonfinite=True,
                       progress=False)["_url"]
    kw = dict(on_bad_sample="skip", normalize=False)
    straight = make(url, 0, 1, 2, **kw)
    full = list(straight)
    assert straight.stats["bad_series"] == 2
    for k in (1, 2, len(full) // 2, len(full) - 2, len(full)):
        first, sd = take(make(url, 0, 1, 2, **kw), k)
        ld = make(url, 0, 1, 2, **kw)
        ld.load_state_dict(sd)
        assert same(first + list(ld), full)
        # each bad series counted once, wherever the cut fell and however often its shard was re-read
        assert ld.stats["bad_series"] == 2 and ld.stats["skipped_bad"] == straight.stats["skipped_bad"], k


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counts_survive_wrap_around_and_resume(tmp_path, workers):
    """A missing shard skipped (shuffle_buffer=1: one group per shard, re-read by the quota top-up):
    counted once per epoch in a straight run and in every resumed one."""
    url = write_series(identity_series(LENGTHS, 2), str(tmp_path), "parquet", shard_samples=3, progress=False)["_url"]
    (tmp_path / "data-00002.parquet").unlink()
    kw = dict(on_bad_sample="skip", normalize=False, shuffle_buffer=1, shuffle_shards=1, verify_checksums=False)
    straight = make(url, 0, 1, workers, **kw)
    full = list(straight)
    assert straight.stats["bad_shards"] == 1 and straight.stats["resampled"] > 0
    for k in range(0, len(full) + 1, 3):
        first, sd = take(make(url, 0, 1, workers, **kw), k)
        ld = make(url, 0, 1, workers, **kw)
        ld.load_state_dict(sd)
        assert same(first + list(ld), full), k
        assert ld.stats["bad_shards"] == 1, k


def test_state_from_another_layout_is_refused(corpus):
    _, sd = take(make(corpus, 0, 2, 2), 2)
    other = make(corpus, 0, 1, 2)
    with pytest.raises(DataError, match=r"different layout .* world_size: saved 2, now 1"):
        other.load_state_dict(sd)
    with pytest.raises(DataError, match="unsupported version"):
        other.load_state_dict({"version": 99})


def test_close_joins_the_data_threads(tmp_path, monkeypatch):
    """A pass left by `break` must leave no thread behind: a daemon thread still inside pyarrow or
    numpy when the interpreter exits aborts the process. Slow reads keep the read-ahead in flight."""
    import threading
    import time

    from data_pipeline.stream import ShardStream

    load, calls, lock = ShardStream._load, [], threading.Lock()

    def slow_load(self, sid):  # the first group's shard at once, each shard read ahead slower
        with lock:
            calls.append(sid)
            i = len(calls) - 1
        time.sleep(0.5 * i)
        return load(self, sid)

    monkeypatch.setattr(ShardStream, "_load", slow_load)
    names = {"shard-read-ahead", "data-pipeline-producer"}
    # one series per shard, ~1000 windows each: the first batch's look-ahead (2048 windows) needs
    # three shards, and four more are being read ahead when the pass is left
    long = write_series(identity_series([2000] * 8, 1), str(tmp_path), "parquet", shard_samples=1,
                        progress=False)["_url"]
    # only this loader's threads count: a loader another test left unclosed ends when it is collected
    before = {t for t in threading.enumerate() if t.name in names}
    loader = make(long, 0, 1, 0, read_ahead=4, shuffle=False)
    for _ in loader:
        break
    assert any(t.name in names and t not in before for t in threading.enumerate())  # reads are in flight now
    loader.close()
    assert [t.name for t in threading.enumerate() if t.name in names and t not in before] == []
    monkeypatch.setattr(ShardStream, "_load", load)
    assert len(list(loader)) == len(loader)  # a closed loader starts the next pass as usual
