"""Streaming data pipeline: shards (Parquet / WebDataset) + manifest -> windows for SimMTM.

See data_pipeline/README.md for the formats and the guarantees (splitting, shuffling, resume).
"""
from .config import DataConfig
from .convert import (convert, convert_csv, convert_numpy, convert_pt, convert_tsv, ensure_converted,
                      write_series)
from .errors import DataError, ShardError
from .loader import StreamLoader, build_loader, load_split_array, resolve_manifest, scan_shards, to_device
from .shards import Series, load_manifest
from .stream import ShardStream, ShardUnreachable

__all__ = ["DataConfig", "build_loader", "to_device", "StreamLoader", "ShardStream", "load_split_array",
           "resolve_manifest", "scan_shards", "convert", "convert_csv", "convert_pt", "convert_numpy", "convert_tsv",
           "ensure_converted", "write_series", "load_manifest", "Series", "DataError", "ShardError", "ShardUnreachable"]
