"""Splitting across ranks x workers, shuffling, window cutting, equal steps, infinite mode."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from data_pipeline import DataConfig, DataError, ShardStream, build_loader, write_series
from data_pipeline.plan import fit_quotas
from data_pipeline.testing import expected_keys, identity_series, window_key
from data_pipeline.windows import Permutation

SEQ, STRIDE = 16, 3
LENGTHS = [int(v) for v in np.random.default_rng(7).integers(20, 200, size=40)]


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> dict:
    """10 shards of uneven size (4 series each, lengths 20..200, 2 channels)."""
    out = tmp_path_factory.mktemp("many")
    return write_series(identity_series(LENGTHS, 2), str(out), "parquet", shard_samples=4, progress=False)


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> dict:
    """3 shards: fewer than 2 ranks x 2 workers."""
    out = tmp_path_factory.mktemp("few")
    return write_series(identity_series(LENGTHS, 2), str(out), "webdataset", shard_samples=14, progress=False)


def stream(m: dict, seq_len: int = SEQ, stride: int = STRIDE, batch_size: int = 8, rank: int = 0, world_size: int = 1,
           seed: int = 1, normalize: bool = False, **cfg_kw) -> ShardStream:
    cfg = DataConfig(window_stride=stride, normalize=normalize, **cfg_kw)
    return ShardStream(m, cfg, seq_len=seq_len, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)


def consumer_keys(m: dict, world: int, workers: int, **kw) -> list[list[tuple]]:
    out = []
    for r in range(world):
        ds = stream(m, rank=r, world_size=world, num_workers=workers, **kw)
        for w in range(max(1, workers)):
            out.append([window_key(x) for _, x in ds.iter_windows(worker=w)])
    return out


def loader_keys(m: dict, world: int, workers: int, batch: int = 8, **cfg_kw) -> tuple[list, list]:
    """Windows per rank from the real loader (DataLoader worker processes when workers > 0)."""
    per_rank, loaders = [], []
    for r in range(world):
        cfg = DataConfig(source=m["_url"], num_workers=workers, normalize=False, window_stride=STRIDE, **cfg_kw)
        ld = build_loader(cfg, seq_len=SEQ, batch_size=batch, rank=r, world_size=world, seed=3)
        batches = list(ld)
        assert len(batches) == len(ld)
        assert all(b.shape == (batch, 2, SEQ) and b.dtype == torch.float32 for b in batches)
        per_rank.append([window_key(w) for b in batches for w in b.numpy()])
        loaders.append(ld)
    return per_rank, loaders


@pytest.mark.parametrize("fixture,mode", [("many", "shard"), ("few", "stride")])
def test_every_window_exactly_once_across_2_ranks_x_2_workers(request, fixture, mode):
    m = request.getfixturevalue(fixture)
    want = expected_keys(LENGTHS, 2, SEQ, STRIDE)
    per_consumer = consumer_keys(m, world=2, workers=2)
    flat = [k for ks in per_consumer for k in ks]
    assert len(flat) == len(set(flat)) == len(want) and set(flat) == want
    ds = stream(m, world_size=2, num_workers=2)
    assert ds.plan.mode == mode
    if mode == "stride":  # window-level striding: consumers differ by at most one window
        sizes = [len(k) for k in per_consumer]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("fixture", ["many", "few"])
def test_loader_2_ranks_x_2_worker_processes_equal_steps_no_duplicates(request, fixture):
    m = request.getfixturevalue(fixture)
    per_rank, loaders = loader_keys(m, world=2, workers=2)
    assert len(loaders[0]) == len(loaders[1]) > 0  # equal steps on every rank
    flat = [k for ks in per_rank for k in ks]
    assert len(flat) == len(set(flat))
    total = len(expected_keys(LENGTHS, 2, SEQ, STRIDE))
    tail = sum(ld.stats["tail_dropped"] for ld in loaders)
    assert len(flat) + tail == total  # exactly once, up to the reported drop_last tail
    assert tail < 2 * 2 * 8 + max(ld.describe()["windows_per_consumer"][0] for ld in loaders)
    assert all(ld.stats["batches"] == len(ld) and ld.stats["windows"] == len(ld) * 8 for ld in loaders)


def test_equal_steps_with_very_uneven_shards(tmp_path):
    lengths = [600, 40, 40, 40, 40, 40]  # one big shard, five small ones
    m = write_series(identity_series(lengths, 1), str(tmp_path), "parquet", shard_samples=1, progress=False)
    steps = []
    for r in range(2):
        ds = stream(m, rank=r, world_size=2, num_workers=2, stride=1)
        got = list(ds.plan.rank_quotas())
        assert sum(got) == ds.plan.steps
        steps.append(ds.plan.steps)
        # each consumer never yields more batches than it has full batches of windows
        assert all(q * 8 <= ds.plan.counts[ds.plan.consumer(w)] for w, q in enumerate(got))
    assert steps[0] == steps[1]
    ds0 = stream(m, rank=0, world_size=2, num_workers=2, stride=1)
    assert ds0.plan.describe()["mode"] == "shard"


def test_shuffle_is_seeded_per_epoch_and_a_permutation(many):
    a = consumer_keys(many, 1, 0, seed=5)[0]
    b = consumer_keys(many, 1, 0, seed=5)[0]
    assert a == b  # same seed, same epoch: same order
    ds = stream(many, seed=5)
    ds.set_epoch(1)
    c = [window_key(x) for _, x in ds.iter_windows()]
    assert c != a and sorted(c) == sorted(a)  # reshuffled per epoch, same windows
    d = consumer_keys(many, 1, 0, seed=6)[0]
    assert d != a and sorted(d) == sorted(a)
    plain = consumer_keys(many, 1, 0, shuffle=False)[0]
    assert plain == sorted(plain)  # no shuffle: manifest order, series then start
    assert sorted(a) == plain
    # a full shuffle within a group: far from sorted (Spearman correlation of positions is small)
    rank = {k: i for i, k in enumerate(plain)}
    assert abs(np.corrcoef(np.arange(len(a)), [rank[k] for k in a])[0, 1]) < 0.3


def test_shuffle_mixes_whole_small_dataset_in_one_group(many):
    ds = stream(many, shuffle_buffer=10**9)
    assert ds.plan.sequence(0, 0).n_groups == 1
    ds_small = stream(many, shuffle_buffer=1, shuffle_shards=1)
    assert ds_small.plan.sequence(0, 0).n_groups == len(ds_small.plan.shards)


def test_groups_span_several_shards_even_when_one_exceeds_the_buffer(many):
    """With shards larger than the buffer, a group still takes `shuffle_shards` shards, so the first
    batch already mixes series from several shards (large corpora: several source data sets)."""
    ds = stream(many, shuffle_buffer=1, shuffle_shards=4)
    seq = ds.plan.sequence(0, 0)
    sizes = [len(seq.group_shards(g)) for g in range(seq.n_groups)]
    assert sizes[:-1] == [4] * (len(sizes) - 1) and 1 <= sizes[-1] <= 4 and sum(sizes) == 10
    first = [k for k, _ in zip((key for key, _ in ds.iter_windows()), range(32))]
    assert len({shard for shard, *_ in first}) >= 3  # 32 windows from at least 3 of the group's 4 shards


def test_independent_channels_and_stride(tmp_path):
    m = write_series(identity_series([50, 30], 3), str(tmp_path), "parquet", progress=False)
    ds = stream(m, seq_len=10, stride=5, channels="independent", shuffle=False)
    wins = [x for _, x in ds.iter_windows()]
    assert all(w.shape == (1, 10) for w in wins)
    assert [window_key(w) for w in wins] == sorted(expected_keys([50, 30], 3, 10, 5, independent=True))
    chunk, infos = next(iter(ds))
    assert chunk.shape == (1, 8, 1, 10) and infos[0].k == 1


def test_short_series_drop_pad_error(tmp_path):
    m = write_series(identity_series([5, 30, 12], 2), str(tmp_path), "parquet", progress=False)
    drop = stream(m, seq_len=16, stride=1, batch_size=1, shuffle=False)
    assert [window_key(x)[:2] for _, x in drop.iter_windows()] == [(1, s) for s in range(15)]
    assert drop.plan_stats["skipped_short"] == 2
    pad = stream(m, seq_len=16, stride=1, batch_size=1, shuffle=False, short_series="pad")
    wins = [x for _, x in pad.iter_windows()]
    assert len(wins) == 17 and pad.plan_stats["padded"] == 2
    np.testing.assert_array_equal(wins[0][:, :5], identity_series([5], 2)[0].values)
    assert not wins[0][:, 5:].any()  # zeros after the series
    with pytest.raises(DataError, match=r"series #0 has 5 rows in the 'train' split, shorter than one window"):
        stream(m, seq_len=16, short_series="error")


def test_multivariate_needs_one_channel_count(tmp_path):
    m = write_series(identity_series([40, 40], [2, 3]), str(tmp_path), "parquet", shard_samples=1, progress=False)
    with pytest.raises(DataError, match=r"channels=multivariate .* C=2 in .*data-00000.parquet, C=3 in "
                                        r".*data-00001.parquet"):
        stream(m)
    ds = stream(m, channels="independent")
    assert ds.plan.total == (40 - SEQ) // STRIDE * 5 + 5
    with pytest.raises(DataError, match="no per-channel statistics"):
        stream(m, channels="independent", normalize=True)


def test_infinite_mode_continues_with_the_next_epochs_shuffle(many):
    cfg = DataConfig(source=many["_url"], normalize=False, window_stride=STRIDE, infinite=True)
    ld = build_loader(cfg, seq_len=SEQ, batch_size=8, seed=3)
    n = len(ld)
    it = iter(ld)
    got = [next(it) for _ in range(2 * n + 3)]
    finite = build_loader(DataConfig(source=many["_url"], normalize=False, window_stride=STRIDE),
                          seq_len=SEQ, batch_size=8, seed=3)
    ep0 = list(finite)
    finite.set_epoch(1)
    ep1 = list(finite)
    assert all(torch.equal(a, b) for a, b in zip(got[:n], ep0))
    assert all(torch.equal(a, b) for a, b in zip(got[n:2 * n], ep1))
    assert not all(torch.equal(a, b) for a, b in zip(ep0, ep1))


def test_wait_seconds_and_stats(many):
    ld = build_loader(DataConfig(source=many["_url"], normalize=False), seq_len=SEQ, batch_size=8)
    list(ld)
    s = ld.stats
    assert ld.wait_seconds > 0
    assert s["shards_read"] == len(many["shards"]) and s["bytes_read"] == sum(e["bytes"] for e in many["shards"])
    assert s["windows"] == 8 * len(ld) and s["windows"] + s["tail_dropped"] == ld.describe()["windows"]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(n):
    p = Permutation(n, (1, 2, 3))
    out = p(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    if n > 10:
        assert not np.array_equal(out, Permutation(n, (1, 2, 4))(np.arange(n)))


def test_fit_quotas_trims_the_fullest_workers_first():
    assert fit_quotas([5, 9, 2], 10) == [4, 4, 2]
    assert fit_quotas([5, 5], 7) == [4, 3]
    assert fit_quotas([3, 1], 4) == [3, 1]
    assert sum(fit_quotas([100, 0, 7, 50], 60)) == 60
    assert Counter(fit_quotas([10, 10, 10], 20)) == Counter([7, 7, 6])


def test_drop_last_false_yields_every_window_with_partial_batches(many):
    cfg = DataConfig(source=many["_url"], normalize=False, window_stride=STRIDE, num_workers=2)
    ld = build_loader(cfg, seq_len=SEQ, batch_size=8, drop_last=False)
    batches = list(ld)
    keys = [window_key(w) for b in batches for w in b.numpy()]
    assert sorted(keys) == sorted(expected_keys(LENGTHS, 2, SEQ, STRIDE)) and len(batches) == len(ld)
    assert {b.shape[0] for b in batches[-2:]} - {8}  # the workers' last batches are partial


def test_series_norm_scales_each_series_by_its_own_statistics(tmp_path):
    """Corpora mixing scales (e.g. ETT loads and illness counts): every series, each channel, z-scored
    by its own split rows; a window spanning a whole series is then exactly mean 0, std 1."""
    from data_pipeline.shards import Series

    rng = np.random.default_rng(0)
    recs = [Series(f"s{i}", rng.normal(loc=10.0 ** (3 * i), scale=10.0 ** i, size=(2, 40))) for i in range(3)]
    m = write_series(recs, str(tmp_path), "parquet", progress=False)
    ds = stream(m, seq_len=40, stride=1, batch_size=1, series_norm=True, shuffle=False)
    wins = [x for _, x in ds.iter_windows()]
    assert len(wins) == 3
    for w in wins:
        np.testing.assert_allclose(w.mean(axis=1), 0.0, atol=1e-4)
        np.testing.assert_allclose(w.std(axis=1), 1.0, atol=1e-4)
    with pytest.raises(DataError, match="exclude each other"):
        stream(m, seq_len=40, batch_size=1, normalize=True, series_norm=True)
