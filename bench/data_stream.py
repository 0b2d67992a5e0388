"""Streaming throughput: windows/s and points/s for one training epoch of ETTh1- and ETTm1-shaped
windows (train split, L=336, stride 1, batch 16, shuffled, z-scored), from local Parquet, local
WebDataset and a loopback S3 server (moto, in its own process), with 0 and 2 DataLoader workers, against the authors'
way: the whole CSV read with pandas, a map-style sliding-window Dataset (TSLib's Dataset_ETT_*:
float64 [L, C] windows plus time-feature marks), DataLoader(shuffle=True, drop_last=True).

Timed: loader construction (manifest read) + one full epoch; also the time to the first batch
(worker start-up, first shard fetch) and the steady rate after it. Not timed: the one-off conversion.
Best of `--repeats` runs (the machine is shared). Writes bench/results/data_stream.json.

    .venv/bin/python bench/data_stream.py [--repeats 2] [--datasets ETTh1 ETTm1]
"""
from __future__ import annotations

import argparse
import runpy
import time
from pathlib import Path

import numpy as np
import torch

from bench.results_io import write_result
from data_pipeline import DataConfig, build_loader, convert

REPO = Path(__file__).resolve().parents[1]
CSV = {"ETTh1": REPO / "data" / "ETTh1.csv",
       "ETTm1": REPO.parent / "shared" / "data" / "forecasting" / "ETT-small" / "ETTm1.csv"}
L, BATCH, SEED = 336, 16, 2023
OUT = REPO / "bench" / "results"


class AuthorsETT(torch.utils.data.Dataset):
    """TSLib's Dataset_ETT_hour/minute for the train split (features='M', timeenc=1), trimmed to what
    pre-training consumes: seq_x and seq_x_mark."""

    def __init__(self, path: Path, minute: bool):
        import pandas as pd

        df = pd.read_csv(path)
        k = 4 if minute else 1
        b1, b2 = 0, 12 * 30 * 24 * k
        data = df[df.columns[1:]].values
        train = data[b1:b2]
        mean, std = train.mean(0), train.std(0)
        self.data_x = ((data - mean) / std)[b1:b2]
        dates = pd.to_datetime(df["date"][b1:b2])
        marks = [dates.dt.hour / 23.0 - 0.5, dates.dt.dayofweek / 6.0 - 0.5, (dates.dt.day - 1) / 30.0 - 0.5,
                 (dates.dt.dayofyear - 1) / 365.0 - 0.5]
        self.data_stamp = np.stack([m.values for m in marks], axis=1)

    def __len__(self) -> int:
        return len(self.data_x) - L + 1

    def __getitem__(self, i: int):
        return self.data_x[i:i + L], self.data_stamp[i:i + L]


def run_pandas(name: str, workers: int, t0: float) -> tuple[int, int, float]:
    g = torch.Generator().manual_seed(SEED)
    ds = AuthorsETT(CSV[name], minute=name.startswith("ETTm"))
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
                                     generator=g)
    n = pts = 0
    first = None
    for x, _mark in dl:
        x = x.float().permute(0, 2, 1)  # the training loop's batch_x.float(), channels first
        first = first or time.perf_counter() - t0
        n += x.shape[0]
        pts += x.numel()
    return n, pts, first


def run_stream(source: str, workers: int, t0: float, so: dict | None = None,
               batch: int = BATCH) -> tuple[int, int, float]:
    cfg = DataConfig(source=source, num_workers=workers, storage_options=so or {})
    n = pts = 0
    first = None
    for x in build_loader(cfg, seq_len=L, batch_size=batch, seed=SEED):
        first = first or time.perf_counter() - t0
        n += x.shape[0]
        pts += x.numel()
    return n, pts, first


def best_of(fn, repeats: int) -> tuple[float, float, int, int]:
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        n, pts, first = fn(t0)
        dt = time.perf_counter() - t0
        if best is None or dt < best[0]:
            best = (dt, first)
    return best[0], best[1], n, pts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--datasets", nargs="+", default=list(CSV))
    args = ap.parse_args()
    torch.set_num_threads(1)
    # tests/ is no installed package: the S3 server helper by its path
    local_s3_server = runpy.run_path(str(REPO / "tests" / "s3_server.py"))["local_s3_server"]

    tmp = OUT / "tmp"
    records = []
    with local_s3_server(process=True) as s3:
        bucket, so = s3["new_bucket"]("bench"), s3["storage_options"]
        for name in args.datasets:
            if not CSV[name].exists():
                print(f"skip {name}: {CSV[name]} not found")
                continue
            sources = {}
            for fmt in ("parquet", "webdataset"):
                sources[fmt] = (convert(str(CSV[name]), str(tmp / f"{name}-{fmt}"), fmt, progress=False)["_url"], None)
                sources[f"s3-{fmt}"] = (convert(str(CSV[name]), f"s3://{bucket}/{name}-{fmt}", fmt,
                                                storage_options=so, progress=False)["_url"], so)
            for workers in (0, 2):
                jobs = {"pandas-csv": lambda t0, w=workers, n=name: run_pandas(n, w, t0)}
                for src, (url, opts) in sources.items():
                    jobs[src] = lambda t0, u=url, o=opts, w=workers: run_stream(u, w, t0, o)
                for src, job in jobs.items():
                    dt, first, n, pts = best_of(job, args.repeats)
                    rec = {"source": src, "workers": workers, "dataset": name, "windows_per_s": round(n / dt, 1),
                           "points_per_s": round(pts / dt, 1), "windows": n, "seconds": round(dt, 4),
                           "first_batch_s": round(first, 4),
                           # after the first batch: excludes worker start-up and the first shard fetch
                           "steady_windows_per_s": round((n - BATCH) / max(dt - first, 1e-9), 1)}
                    records.append(rec)
                    print(f"{name:6s} {src:14s} workers={workers}  {rec['windows_per_s']:>11,.0f} windows/s  "
                          f"{rec['points_per_s'] / 1e6:>8.1f} M points/s  first batch {first:.3f} s  "
                          f"steady {rec['steady_windows_per_s']:>11,.0f} windows/s", flush=True)
    path = write_result("data_stream", records)
    print()
    print("| dataset | source | workers | windows/s | M points/s | first batch s | steady windows/s | vs pandas-csv |")
    print("|---|---|---|---|---|---|---|---|")
    base = {(r["dataset"], r["workers"]): r["windows_per_s"] for r in records if r["source"] == "pandas-csv"}
    for r in records:
        ratio = r["windows_per_s"] / base[(r["dataset"], r["workers"])]
        print(f"| {r['dataset']} | {r['source']} | {r['workers']} | {r['windows_per_s']:,.0f} | "
              f"{r['points_per_s'] / 1e6:.1f} | {r['first_batch_s']:.3f} | {r['steady_windows_per_s']:,.0f} | "
              f"{ratio:.2f}x |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
