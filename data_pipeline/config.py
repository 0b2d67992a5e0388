"""Data knobs of the streaming pipeline; part of the trainer's one config tree (`data.*`)."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    # A manifest (.json), a folder with manifest.json, a shard URL or glob (local, s3://, memory://, hf://, any
    # fsspec URL), or a raw file (TSLib CSV, TF-C .pt, .npy/.npz, UCR .tsv) converted under `cache_dir` on
    # first use. See data_pipeline/README.md.
    source: str = "data/ETTh1.csv"
    format: Literal["auto", "parquet", "webdataset"] = "auto"
    split: Literal["train", "val", "test"] = "train"
    cache_dir: str = "data/shards"
    window_stride: int = 1  # stride between consecutive windows of one series
    channels: Literal["multivariate", "independent"] = "multivariate"  # [C, L] windows or [1, L] per channel
    short_series: Literal["drop", "pad", "error"] = "drop"
    normalize: bool = True  # z-score with the manifest's train-split per-channel statistics
    # z-score every series (each channel) by its own statistics over the split's rows instead: for corpora
    # that mix data sets of different scales and channel counts, which share no manifest statistics
    series_norm: bool = False
    shuffle: bool = True
    # windows shuffled together: consecutive shards are grouped until a group holds this many; a group is
    # permuted exactly (a small set such as ETTh1 is one group: a full shuffle)
    shuffle_buffer: int = 1024
    # ... and holds at least this many shards, so batches mix shards (and the data sets they come from)
    # even when one shard alone exceeds the buffer; a group's shards are decoded in memory together
    shuffle_shards: int = 4
    infinite: bool = False  # resample forever (step-based training)
    num_workers: int = 0
    # items read ahead per worker (DataLoader prefetch_factor; an item is up to 16 batches, ~4 MB);
    # with num_workers 0: batches queued by the producer thread
    prefetch: int = 4
    read_ahead: int = 2  # shards fetched + decoded ahead by a background thread in each worker
    on_bad_sample: Literal["error", "skip"] = "error"
    verify_checksums: bool = True  # check each shard's sha256 against the manifest (catches silent corruption)
    retries: int = 3  # transient object-store errors
    retry_backoff: float = 0.2  # seconds before the first retry; doubles per attempt (capped at 10 s)
    # seconds one object-store read/write/listing may take in all, retries and backoff included: a frozen
    # endpoint (accepts connections, never answers) then fails naming the URL instead of stalling for ever
    io_timeout: float = 60.0
    storage_options: dict = field(default_factory=dict)  # passed to fsspec (e.g. endpoint_url, key, secret)

    def validate(self) -> None:
        if self.window_stride < 1:
            raise ValueError(f"window_stride must be >= 1, got {self.window_stride}")
        if self.num_workers < 0 or self.prefetch < 1 or self.shuffle_buffer < 1 or self.retries < 0:
            raise ValueError("num_workers >= 0, prefetch >= 1, shuffle_buffer >= 1, retries >= 0 required")
        if self.shuffle_shards < 1:
            raise ValueError(f"shuffle_shards must be >= 1, got {self.shuffle_shards}")
        for name, tp in typing.get_type_hints(DataConfig).items():  # the choices, for direct API use
            if typing.get_origin(tp) is Literal and getattr(self, name) not in typing.get_args(tp):
                raise ValueError(f"{name} must be one of {list(typing.get_args(tp))}, got {getattr(self, name)!r}")
        import math

        if self.read_ahead < 0:
            raise ValueError(f"read_ahead must be >= 0, got {self.read_ahead}")
        if not (math.isfinite(self.retry_backoff) and self.retry_backoff >= 0):
            raise ValueError(f"retry_backoff must be a finite number >= 0, got {self.retry_backoff}")
        if not (math.isfinite(self.io_timeout) and self.io_timeout > 0):
            raise ValueError(f"io_timeout must be a finite number of seconds > 0, got {self.io_timeout}")
        if not self.source:
            raise ValueError("source must name a manifest, shard URL/glob or a raw data file")
