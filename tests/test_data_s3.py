"""S3 for real: a moto server on 127.0.0.1, s3fs pointed at it with endpoint_url, no mocking."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import DataConfig, DataError, ShardError, build_loader, convert, load_manifest
from data_pipeline.convert import main as convert_main
from tests.s3_server import s3  # noqa: F401 - session fixture

REPO = Path(__file__).resolve().parents[1]
ETTH1 = str(REPO / "data" / "ETTh1.csv")
GESTURE = REPO.parent / "shared" / "data" / "classification" / "Gesture"
L = 96


def batches(source: str, so: dict | None = None, workers: int = 0, **kw) -> list[torch.Tensor]:
    cfg = DataConfig(source=source, storage_options=so or {}, num_workers=workers, **kw)
    return list(build_loader(cfg, seq_len=L, batch_size=64, seed=9))


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_convert_to_and_stream_from_s3(s3, tmp_path, fmt):
    bucket, so = s3["new_bucket"](), s3["storage_options"]
    m = convert(ETTH1, f"s3://{bucket}/etth1", fmt, storage_options=so, progress=False)
    keys = sorted(o["Key"] for o in s3["client"].list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["etth1/" + m["shards"][0]["url"], "etth1/manifest.json"]
    assert load_manifest(f"s3://{bucket}/etth1/manifest.json", so)["content_hash"] == m["content_hash"]
    local = convert(ETTH1, str(tmp_path / "local"), fmt, progress=False)
    assert local["content_hash"] == m["content_hash"]  # byte-identical shards wherever they live
    remote = batches(m["_url"], so, workers=2)
    ref = batches(local["_url"], workers=2)
    n = 8640 - L + 1  # one series, two workers: window-level striding, 4273 + 4272 windows
    assert len(remote) == len(ref) == (n - n // 2) // 64 + (n // 2) // 64
    assert all(torch.equal(a, b) for a, b in zip(remote, ref))


def test_convert_on_first_use_into_an_s3_cache(s3):
    bucket, so = s3["new_bucket"](), s3["storage_options"]
    got = batches(ETTH1, so, cache_dir=f"s3://{bucket}/cache", shuffle=False)
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("cache/ETTh1/") and k.endswith("-parquet/manifest.json") for k in keys)
    x = got[0][0].numpy()
    assert x.shape == (7, L) and abs(float(x.mean())) < 3


def test_cli_to_s3_and_stream_tfc_split(s3):
    bucket = s3["new_bucket"]()
    rc = convert_main([str(GESTURE / "train.pt"), str(GESTURE / "test.pt"), "--out", f"s3://{bucket}/gesture",
                       "--format", "webdataset", "--shard-samples", "64", "--no-progress",
                       "-o", "key=testing", "-o", "secret=testing",
                       "-o", f"client_kwargs.endpoint_url={s3['endpoint_url']}",
                       "-o", "client_kwargs.region_name=us-east-1"])
    assert rc == 0
    so = s3["storage_options"]
    cfg = DataConfig(source=f"s3://{bucket}/gesture/manifest.json", storage_options=so, split="test",
                     shuffle=False, normalize=False, num_workers=2)
    ld = build_loader(cfg, seq_len=206, batch_size=8)
    got = torch.cat(list(ld)).numpy()
    ref = torch.load(GESTURE / "test.pt", weights_only=True)["samples"].numpy().astype(np.float32)
    assert got.shape == (120, 3, 206)
    # two workers deal the 2 test shards (64 + 56 series); together they yield every series once
    assert sorted(map(bytes, got)) == sorted(map(bytes, ref))


def test_glob_and_missing_keys_on_s3(s3):
    bucket, so = s3["new_bucket"](), s3["storage_options"]
    convert(ETTH1, f"s3://{bucket}/e", "parquet", storage_options=so, progress=False)
    got = batches(f"s3://{bucket}/e/*.parquet", so, shuffle=False, normalize=False)
    assert len(got) == (17420 - L + 1) // 64  # no manifest: the whole series counts as train
    with pytest.raises(DataError, match=rf"manifest s3://{bucket}/nothing/manifest.json: not found"):
        batches(f"s3://{bucket}/nothing/manifest.json", so)
    s3["client"].delete_object(Bucket=bucket, Key="e/data-00000.parquet")
    with pytest.raises(ShardError, match=rf"shard s3://{bucket}/e/data-00000.parquet: not found"):
        batches(f"s3://{bucket}/e/manifest.json", so)
