"""Exception types of the data pipeline.

Both take a single message argument on purpose: DataLoader re-raises a worker's exception in the
main process by calling `type(msg)`, so a one-argument constructor keeps the type (and our message
naming the shard) intact across the process boundary instead of degrading to RuntimeError.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad input or configuration; the message names the file / shard and the problem."""


class ShardError(DataError):
    """A shard could not be read or holds bad data; the message starts with the shard URL."""


def shard_error(url: str, problem: str) -> ShardError:
    return ShardError(f"shard {url}: {problem}")
