"""Round trips: raw files -> shards -> stream give back the raw values (both shard formats)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pandas as pd
import pytest
import torch

from data_pipeline import (DataConfig, ShardStream, build_loader, convert_csv, convert_numpy, convert_pt,
                           convert_tsv, load_manifest, load_split_array, write_series)
from data_pipeline.convert import convert, main as convert_main
from data_pipeline.errors import DataError
from data_pipeline.shards import decode, decode_parquet
from data_pipeline.testing import identity_series

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ETTH1 = REPO / "data" / "ETTh1.csv"
FORMATS = ["parquet", "webdataset"]
L = 336


@pytest.fixture(scope="module")
def etth1_z() -> np.ndarray:
    """The CSV z-scored the authors' way: StandardScaler (ddof 0) fitted on train rows 0..8640."""
    x = pd.read_csv(ETTH1).drop(columns=["date"]).to_numpy(np.float64)
    mu, sd = x[:8640].mean(0), x[:8640].std(0)
    return ((x - mu) / sd).T  # [C, T]


@pytest.fixture(scope="module", params=FORMATS)
def etth1_manifest(request, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"etth1-{request.param}")
    return convert_csv(str(ETTH1), str(out), request.param, progress=False)


def all_windows(ds: ShardStream) -> np.ndarray:
    return np.stack([x for _, x in ds.iter_windows()])


def test_csv_manifest_records_borders_stats_and_hash(etth1_manifest):
    m = etth1_manifest
    raw = pd.read_csv(ETTH1)
    assert m["samples"] == 1 and m["points"] == 7 * len(raw) and m["n_channels"] == 7
    assert m["channel_names"] == list(raw.columns[1:]) and m["freq"] == "h"
    (shard,) = m["shards"]
    assert shard["borders"] == {"train": [0, 8640], "val": [8640, 11520], "test": [11520, 14400]}
    assert shard["shapes"] == [[7, len(raw), 1]]
    x = raw.drop(columns=["date"]).to_numpy(np.float64)[:8640]
    np.testing.assert_allclose(m["stats"]["mean"], x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(m["stats"]["std"], x.std(0), rtol=1e-6)
    assert len(m["content_hash"]) == 64
    again = load_manifest(m["_url"])
    assert again["content_hash"] == m["content_hash"]


def test_csv_train_windows_equal_csv(etth1_manifest, etth1_z):
    ds = ShardStream(etth1_manifest, DataConfig(shuffle=False), seq_len=L, batch_size=5)
    wins = all_windows(ds)
    assert wins.shape == (8640 - L + 1, 7, L) == (8305, 7, L)
    ref = np.lib.stride_tricks.sliding_window_view(etth1_z[:, :8640], L, axis=1).transpose(1, 0, 2)
    np.testing.assert_allclose(wins, ref, atol=2e-5)
    # batched: 8305 = 5 x 1661, so the loader's batches are exactly the windows in order
    batches = [b for chunk, _ in ds for b in chunk]  # items: (n batches stacked, their infos)
    assert len(batches) == 1661 and batches[0].dtype == torch.float32
    np.testing.assert_array_equal(torch.cat(batches).numpy(), wins)


@pytest.mark.parametrize("split,start,end", [("val", 8640 - L, 11520), ("test", 11520 - L, 14400)])
def test_val_test_splits_overlap_by_input_length(etth1_manifest, etth1_z, split, start, end):
    H = 96  # forecasting: windows of L + H, the caller splits input / target
    ds = ShardStream(etth1_manifest, DataConfig(split=split, shuffle=False), seq_len=L + H, overlap=L, batch_size=1)
    wins = all_windows(ds)
    assert len(wins) == (end - start) - (L + H) + 1
    np.testing.assert_allclose(wins[0], etth1_z[:, start:start + L + H], atol=2e-5)
    np.testing.assert_allclose(wins[-1], etth1_z[:, end - L - H:end], atol=2e-5)
    arr = load_split_array(etth1_manifest["_url"], split, L)
    assert arr.dtype == np.float32 and arr.shape == (7, end - start)
    np.testing.assert_allclose(arr, etth1_z[:, start:end], atol=2e-5)


def test_default_config_converts_csv_on_first_use(tmp_path, etth1_z, monkeypatch):
    monkeypatch.chdir(REPO)  # the default source is the repo-relative data/ETTh1.csv
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), shuffle=False)
    loader = build_loader(cfg, seq_len=L, batch_size=16)
    (made,) = list((tmp_path / "cache" / "ETTh1").iterdir())
    assert made.name.endswith("-parquet") and (made / "manifest.json").exists()
    assert len(loader) == 8305 // 16 and loader.stats["tail_dropped"] == 8305 % 16
    first = next(iter(loader))
    assert first.shape == (16, 7, L)
    np.testing.assert_allclose(first[0].numpy(), etth1_z[:, :L], atol=2e-5)
    mtime = (made / "manifest.json").stat().st_mtime_ns
    build_loader(cfg, seq_len=L, batch_size=16)  # cached: not converted again
    assert (made / "manifest.json").stat().st_mtime_ns == mtime
    # an edited CSV is a different content hash: converted afresh, never the stale shards
    edited = tmp_path / "ETTh1.csv"
    text = ETTH1.read_text().splitlines()
    text[1] = text[1].replace("5.827000141143799", "6.0", 1)
    edited.write_text("\n".join(text) + "\n")
    cfg2 = DataConfig(source=str(edited), cache_dir=str(tmp_path / "cache"), shuffle=False)
    b = next(iter(build_loader(cfg2, seq_len=L, batch_size=16)))
    assert len(list((tmp_path / "cache" / "ETTh1").iterdir())) == 2
    assert not torch.equal(b, first)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tfc_pt_roundtrip_by_file_split(tmp_path, fmt):
    files = [str(SHARED / "classification" / "Gesture" / f"{s}.pt") for s in ("train", "val", "test")]
    m = convert_pt(files, str(tmp_path / "g"), fmt, shard_samples=100, progress=False)
    assert m["splits"]["available"] == ["train", "val", "test"]
    assert [s["samples"] for s in m["shards"]] == [100, 100, 100, 20, 100, 20, 100, 20]
    for split in ("train", "test"):
        ref = torch.load(files[["train", "val", "test"].index(split)], weights_only=True)
        x = ref["samples"].numpy().astype(np.float32)
        ds = ShardStream(m, DataConfig(split=split, shuffle=False, normalize=False), seq_len=206, batch_size=1)
        got = all_windows(ds)  # one full-length window per series, in file order
        np.testing.assert_array_equal(got, x)
    # labels are kept per series in the shard
    shard = decode(m["shards"][0]["url"], (tmp_path / "g" / m["shards"][0]["url"]).read_bytes(), fmt)
    ref = torch.load(files[0], weights_only=True)
    assert shard.labels == ref["labels"][:100].long().tolist()
    # z-scoring statistics come from the train file only
    x = ref["samples"].numpy()
    np.testing.assert_allclose(m["stats"]["mean"], x.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(m["stats"]["std"], x.std(axis=(0, 2)), rtol=1e-5)


def test_epilepsy_pt_independent_channels(tmp_path):
    m = convert_pt(str(SHARED / "classification" / "Epilepsy" / "train.pt"), str(tmp_path / "e"), progress=False)
    ds = ShardStream(m, DataConfig(split="train", shuffle=False, channels="independent", normalize=False),
                     seq_len=178, batch_size=4)
    x = torch.load(SHARED / "classification" / "Epilepsy" / "train.pt", weights_only=True)["samples"].numpy()
    np.testing.assert_array_equal(all_windows(ds), x.astype(np.float32))
    assert ds.plan.steps == 15


@pytest.mark.parametrize("fmt", FORMATS)
def test_npz_and_npy_roundtrip(tmp_path, fmt):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3, 50)).astype(np.float32)
    y = rng.integers(0, 4, size=12)
    np.savez(tmp_path / "set_train.npz", samples=x, labels=y)
    np.save(tmp_path / "uni.npy", x[:, 0, :].astype(np.float64))  # [N, L]: N univariate series
    m = convert_numpy(str(tmp_path / "set_train.npz"), str(tmp_path / "out"), fmt, progress=False)
    ds = ShardStream(m, DataConfig(window_stride=10, shuffle=False, normalize=False), seq_len=20, batch_size=1)
    got = all_windows(ds)
    ref = np.stack([x[i, :, s:s + 20] for i in range(12) for s in (0, 10, 20, 30)])
    np.testing.assert_array_equal(got, ref)
    m2 = convert_numpy(str(tmp_path / "uni.npy"), str(tmp_path / "out2"), fmt, progress=False)
    assert m2["samples"] == 12 and m2["n_channels"] == 1
    ds2 = ShardStream(m2, DataConfig(shuffle=False, normalize=False), seq_len=50, batch_size=1)
    np.testing.assert_array_equal(all_windows(ds2)[:, 0], x[:, 0, :])


def test_ucr_tsv_variable_length(tmp_path):
    rows = ["1\t1.0\t2.0\t3.0\t4.0\t5.0", "2\t6.0\t7.0\t8.0\tNaN\tNaN", "1\t9.0\t10.0\t11.0\t12.0\tNaN"]
    (tmp_path / "Toy_TRAIN.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "Toy_TEST.tsv").write_text("2\t1.0\t1.0\t1.0\t1.0\t1.0\n")
    m = convert_tsv([str(tmp_path / "Toy_TRAIN.tsv"), str(tmp_path / "Toy_TEST.tsv")], str(tmp_path / "o"),
                    progress=False)
    assert m["name"] == "Toy" and m["splits"]["available"] == ["train", "test"]
    assert m["shards"][0]["shapes"] == [[1, 5, 1], [1, 3, 1], [1, 4, 1]]
    ds = ShardStream(m, DataConfig(shuffle=False, normalize=False), seq_len=3, batch_size=1)
    got = [x[0].tolist() for _, x in ds.iter_windows()]
    assert got == [[1, 2, 3], [2, 3, 4], [3, 4, 5], [6, 7, 8], [9, 10, 11], [10, 11, 12]]
    shard = decode_parquet("x", (tmp_path / "o" / m["shards"][0]["url"]).read_bytes())
    assert shard.labels == [1, 2, 1]


def test_parquet_decode_is_zero_copy(tmp_path):
    m = write_series(identity_series([30, 40, 50], 2), str(tmp_path), "parquet", progress=False)
    shard = decode_parquet("s", (tmp_path / m["shards"][0]["url"]).read_bytes())
    # views of one Arrow buffer (read-only, not owning), not per-series copies: every array's base
    # chain ends at the same pyarrow FloatArray (the column's child buffer) and its data lies inside it
    roots = []
    for a in shard.arrays:
        assert not a.flags.owndata and not a.flags.writeable
        b = a
        while isinstance(b, np.ndarray):
            b = b.base
        roots.append(b)
    assert all(r is roots[0] for r in roots) and isinstance(roots[0], pa.FloatArray)
    buf = roots[0].buffers()[1]
    for a in shard.arrays:
        start = a.__array_interface__["data"][0]
        assert buf.address <= start and start + a.nbytes <= buf.address + buf.size
    np.testing.assert_array_equal(shard.arrays[1], identity_series([30, 40, 50], 2)[1].values)


def test_webdataset_shards_read_by_webdataset_library(tmp_path):
    import webdataset as wds

    recs = identity_series([30, 40], 3)
    m = write_series(recs, str(tmp_path), "webdataset", progress=False)
    url = str(tmp_path / m["shards"][0]["url"])
    samples = list(wds.WebDataset(url, shardshuffle=False, empty_check=False))
    assert len(samples) == 2
    for s, r in zip(samples, recs):
        np.testing.assert_array_equal(np.load(io.BytesIO(s["npy"])), r.values)
        assert json.loads(s["json"])["id"] == r.id


def test_conversion_is_deterministic_and_shard_sizes_follow_targets(tmp_path):
    recs = identity_series([400] * 20, 4)  # 6.4 kB of values per series
    a = write_series(recs, str(tmp_path / "a"), "parquet", shard_mb=32 * 1024 / 2**20, progress=False)
    b = write_series(recs, str(tmp_path / "b"), "parquet", shard_mb=32 * 1024 / 2**20, progress=False)
    assert a["content_hash"] == b["content_hash"]
    assert [s["samples"] for s in a["shards"]] == [5, 5, 5, 5]  # a shard closes before exceeding 32 kB
    c = write_series(recs, str(tmp_path / "c"), "webdataset", shard_samples=7, progress=False)
    assert [s["samples"] for s in c["shards"]] == [7, 7, 6]
    assert sum(s["points"] for s in c["shards"]) == c["points"] == 20 * 4 * 400


def test_cli_converts_to_memory_and_local(tmp_path, capsys):
    rc = convert_main([str(ETTH1), "--out", "memory://cli/etth1", "--format", "webdataset", "--no-progress"])
    assert rc == 0 and "1 shard(s)" in capsys.readouterr().out
    m = load_manifest("memory://cli/etth1/manifest.json")
    assert m["format"] == "webdataset" and m["shards"][0]["borders"]["train"] == [0, 8640]
    loader = build_loader(DataConfig(source="memory://cli/etth1/manifest.json"), seq_len=L, batch_size=32)
    assert len(loader) == 8305 // 32 and next(iter(loader)).shape == (32, 7, L)
    # the real entry point, with a progress bar on stderr
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "data_pipeline.convert", str(ETTH1), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert "convert ETTh1" in r.stderr and (out / "manifest.json").exists()
    bad = subprocess.run([sys.executable, "-m", "data_pipeline.convert", str(tmp_path / "nope.csv"), "--out",
                          str(out)], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.csv: input file not found" in bad.stderr


UEA_TS = """# a two-dimensional UEA-style set
@problemName Toy
@timeStamps false
@missing false
@univariate false
@dimensions 2
@equalLength true
@seriesLength 4
@classLabel true walk run
@data
1,2,3,4:5,6,7,8:run
0.5,0.25,?,1:1,1,1,1:walk
"""


def test_uea_ts_reader_and_roundtrip(tmp_path):
    (tmp_path / "Toy_TRAIN.ts").write_text(UEA_TS)
    from data_pipeline.readers import read_input

    raw = read_input(str(tmp_path / "Toy_TRAIN.ts"))
    assert raw.split == "train" and raw.name == "Toy" and [s.label for s in raw.series] == [1, 0]
    np.testing.assert_array_equal(raw.series[0].values, [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert np.isnan(raw.series[1].values[0, 2]) and raw.series[1].values.shape == (2, 4)
    bad = tmp_path / "Bad_TRAIN.ts"
    bad.write_text(UEA_TS.replace(":walk", ":jump"))
    with pytest.raises(DataError, match=r"Bad_TRAIN.ts: line 12: class 'jump' is not in @classLabel"):
        read_input(str(bad))
    m = convert(str(tmp_path / "Toy_TRAIN.ts"), str(tmp_path / "shards"), progress=False, allow_nonfinite=True)
    assert m["samples"] == 2 and m["n_channels"] == 2
