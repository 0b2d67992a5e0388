"""The pre-training corpus builder (data_pipeline/corpus.py) on a tiny tree shaped like shared/data."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from data_pipeline import fs as _fs
from data_pipeline.config import DataConfig
from data_pipeline.corpus import ForbiddenSourceError, build_corpus, guard, main
from data_pipeline.loader import build_loader
from data_pipeline.shards import decode, load_manifest, shard_url

TEST_MARK = 9999.0  # every value of an evaluation split; must never reach the corpus
HELD_OUT = 5000.0  # TSLib val/test rows are >= this


def _gz(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(gzip.compress(text.encode(), mtime=0))


def _row(vals) -> str:
    return "\t".join(["1"] + ["NaN" if np.isnan(v) else repr(float(v)) for v in vals])


def make_tree(root) -> None:
    rng = np.random.default_rng(0)
    root = str(root)
    # TSLib-style CSV: 200 rows -> train rows [0, 140) (70%); later rows carry HELD_OUT values
    os.makedirs(f"{root}/forecasting/toy", exist_ok=True)
    t = np.arange(200)
    a = np.where(t < 140, rng.random(200), HELD_OUT + t)
    b = np.where(t < 140, np.sin(t / 5.0), HELD_OUT + t)
    dates = [f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00:00" for i in range(200)]
    with open(f"{root}/forecasting/toy/toy.csv", "w") as f:
        f.write("date,a,b\n" + "".join(f"{d},{x},{y}\n" for d, x, y in zip(dates, a, b)))
    # UCR TRAIN: 6 normal rows (100 points), a NaN-padded shorter row (80 + 20 NaN), a short row (30),
    # a row with a NaN in the middle (70 | NaN | 79), a row with 1e30
    rows = [rng.normal(size=100) for _ in range(6)]
    rows.append(np.concatenate([rng.normal(size=80), np.full(20, np.nan)]))
    short = np.full(150, np.nan)
    short[:30] = rng.normal(size=30)
    mid = rng.normal(size=150)
    mid[70] = np.nan
    huge = rng.normal(size=100)
    huge[5] = 1e30
    width = 150
    lines = [_row(np.concatenate([r, np.full(width - r.size, np.nan)])) for r in rows + [short, mid, huge]]
    _gz(f"{root}/corpus/ucr_2018/X/X_TRAIN.tsv.gz", "\n".join(lines) + "\n")
    _gz(f"{root}/corpus/ucr_2018/X/X_TEST.tsv.gz", "\n".join(_row(np.full(100, TEST_MARK) + np.arange(100))
                                                              for _ in range(3)) + "\n")
    # Monash .tsf: two series, horizon 4 dropped; one with '?' gaps
    v1 = ",".join(f"{x:.4f}" for x in rng.normal(size=100))
    v2 = ",".join("?" if i in (70, 71) else f"{x:.4f}" for i, x in enumerate(rng.normal(size=160)))
    _gz(f"{root}/corpus/monash_tsf/tiny_dataset.tsf.gz",
        "# comment\n@relation tiny\n@attribute series_name string\n@attribute start_timestamp date\n"
        "@frequency daily\n@horizon 4\n@missing true\n@equallength false\n@data\n"
        f"T1:2020-01-01 00-00-00:{v1}\nT2:2020-01-01 00-00-00:{v2}\n")
    # a plain table: date + value + an anomaly flag (not a series)
    _gz(f"{root}/corpus/nab_realdata/realX/x.csv.gz",
        "timestamp,value,is_anomaly\n" + "".join(f"2020-01-01 00:{i // 60:02d}:{i % 60:02d},{np.cos(i / 3):.5f},0\n"
                                                   for i in range(90)))
    # a long-format table the builder must skip with a reason
    _gz(f"{root}/corpus/readytensor_forecasting/long.csv.gz",
        "ticker,day,price\n" + "".join(f"T{k},{i},{i * k}\n" for k in range(3) for i in range(80)))


def _all_values(m) -> tuple[dict, dict]:
    """{split: concatenated values}, {split: set of ids} of a built corpus."""
    vals, ids = {}, {}
    for e in m["shards"]:
        url = shard_url(m, e)
        sd = decode(url, _fs.read_bytes(url), m["format"])
        vals.setdefault(e["split"], []).extend(a.reshape(-1) for a in sd.arrays)
        ids.setdefault(e["split"], set()).update(sd.ids)
    return {k: np.concatenate(v) for k, v in vals.items()}, ids


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    make_tree(root)
    return str(root)


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus") / "c")
    return build_corpus(out, tree, val_fraction=0.2, progress=False), out


def test_counts_in_card(built):
    m, out = built
    card = json.loads(open(f"{out}/data_card.json").read())
    c = card["counts"]
    assert c["skipped_short"] == 1  # the 30-point UCR row
    assert c["split_at_nan"] == 2 and c["segments_from_nan_split"] == 4  # UCR mid-NaN row + tsf '?' gap
    assert c["skipped_nonfinite_or_huge"] == 1  # the 1e30 row
    assert c["points_dropped_tsf_horizon"] == 8
    # toy.csv 2 + UCR (6 + padded + 2 segments) + tsf (T1 + 2 segments of T2) + NAB value column
    assert card["totals"]["series"] == m["samples"] == 2 + 9 + 3 + 1
    assert os.path.exists(f"{out}/DATA_CARD.md") and "skipped_short" in open(f"{out}/DATA_CARD.md").read()
    assert any(d["file"].endswith("long.csv.gz") and "long" in d["reason"] for d in card["skipped_files"])
    assert any(d["file"].endswith("X_TEST.tsv.gz") for d in card["not_read"])
    assert card["per_frequency"]["daily"]["series"] == 3


def test_no_test_data_and_disjoint_splits(built):
    m, _ = built
    assert m["splits"]["available"] == ["train", "val"]
    vals, ids = _all_values(m)
    everything = np.concatenate(list(vals.values()))
    assert np.isfinite(everything).all() and np.abs(everything).max() < 100  # no TEST rows, no held-out rows
    assert set(vals) == {"train", "val"} and len(ids["val"]) >= 1
    assert not ids["train"] & ids["val"]
    lengths = sorted(a for e in m["shards"] for _, a, n in e["shapes"] for _ in range(n))
    assert min(lengths) >= 64 and 140 in lengths and 80 in lengths and 96 in lengths  # train rows, trim, horizon


def test_deterministic_and_memory(tree, built, tmp_path):
    m, _ = built
    m2 = build_corpus(str(tmp_path / "again"), tree, val_fraction=0.2, progress=False)
    assert m2["content_hash"] == m["content_hash"]
    assert [e["sha256"] for e in m2["shards"]] == [e["sha256"] for e in m["shards"]]
    m3 = build_corpus("memory://corpus-test/c", tree, val_fraction=0.2, fmt="webdataset", progress=False)
    assert m3["samples"] == m["samples"] and _fs.exists("memory://corpus-test/c/DATA_CARD.md")
    assert load_manifest("memory://corpus-test/c/manifest.json")["samples"] == m["samples"]


def test_policies(tree, tmp_path):
    m = build_corpus(str(tmp_path / "pad"), tree, short="pad", max_series_per_file=2, progress=False,
                     sources=["corpus/ucr_2018/*"])
    c = m["counts"]
    assert m["samples"] == 2 and c["skipped_cap"] == 8 and c["skipped_short"] == 0
    m = build_corpus(str(tmp_path / "one"), tree, val_fraction=0.0, progress=False, sources=["forecasting/*"])
    assert m["counts"]["val_series"] == 1 and m["counts"]["train_series"] == 1  # at least one val series


def test_forbidden_names_refused(tmp_path):
    for p in ("forecasting/ETT-small/ETTh2.csv", "x/ettm2.csv", "corpus/Weather/weather.csv.gz"):
        with pytest.raises(ForbiddenSourceError):
            guard(p)
    guard("forecasting/ETT-small/ETTh1.csv")
    root = tmp_path / "bad"
    make_tree(root)
    (root / "forecasting" / "ETT-small").mkdir(parents=True)
    (root / "forecasting" / "ETT-small" / "ETTh2.csv").write_text("date,a\n2020-01-01,1\n")
    with pytest.raises(ForbiddenSourceError):
        build_corpus(str(tmp_path / "out"), str(root), progress=False)
    with pytest.raises(ForbiddenSourceError):
        build_corpus(str(tmp_path / "out"), str(tmp_path / "shared"), progress=False, sources=["weather*"])
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_loader_reads_corpus(built):
    _, out = built
    for split in ("train", "val"):
        dc = DataConfig(source=out, channels="independent", normalize=False, series_norm=True, window_stride=8,
                        short_series="drop", split=split)
        ld = build_loader(dc, seq_len=64, batch_size=4, drop_last=False, shuffle=False)
        batches = list(ld)
        x = np.concatenate([b.numpy() for b in batches])
        assert x.shape[1:] == (1, 64) and len(x) > 0 and np.isfinite(x).all()
        assert abs(float(x.mean())) < 0.5


def test_cli(tree, tmp_path, capsys):
    assert main(["--out", str(tmp_path / "cli"), "--shared", tree, "--min-length", "200"]) == 2  # nothing left
    assert main(["--out", str(tmp_path / "cli"), "--shared", tree, "--sources", "corpus/monash_tsf/*"]) == 0
    assert "3 series" in capsys.readouterr().out
