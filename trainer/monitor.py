"""Rank-0 monitoring: a progress bar, log lines, TensorBoard scalars/images, peak memory.

Every method is a no-op on other ranks, so the training loop never branches on rank.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from typing import Optional

import torch


def peak_memory_gb(device: torch.device) -> float:
    """Peak device memory on GPUs; peak resident set of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "step"):
    """A tqdm bar on stderr, or (disabled: another rank, or train.progress=false) one whose methods do
    nothing, so loops update it without branching."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, mininterval=1.0,
                disable=not enabled)


class Monitor:
    def __init__(self, is_main: bool, log_dir: Optional[str], total_steps: int, progress: bool = True,
                 tensorboard: bool = True, start_step: int = 0):
        self.is_main = is_main
        self.writer = None
        self.bar = None
        if not is_main:
            return
        if tensorboard and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            # Events an earlier attempt logged after `start_step` (a crash after the resumed checkpoint,
            # or a run replaced with ckpt.overwrite) are purged, so every step's curve is one line.
            self.writer = SummaryWriter(log_dir=os.path.join(log_dir, "tb"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def print(self, *args) -> None:
        if self.is_main:
            msg = " ".join(str(a) for a in args)
            if self.bar is not None:
                self.bar.write(msg, file=sys.stdout)
            else:
                print(msg, flush=True)

    def step(self, step: int, postfix: Optional[dict] = None) -> None:
        """Advance the bar to `step`; `postfix` (losses, rates: read only at log steps) when given."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if postfix is not None:
                self.bar.set_postfix(postfix, refresh=False)

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, float(v), step)

    def hparams(self, flat: dict, metrics: dict) -> None:
        if self.writer is not None:
            clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}
            self.writer.add_hparams(clean, metrics, run_name=".")

    def reconstruction_image(self, step: int, original: torch.Tensor, recon: torch.Tensor, weights: torch.Tensor):
        """Original (blue) vs reconstructed (red) series, and a block of the similarity weights."""
        if self.writer is None:
            return
        self.writer.add_image("reconstruction", plot_series(original[:3], recon[:3]), step)
        w = weights[:32, :32].float().cpu()
        self.writer.add_image("similarity_weights", (w / w.max().clamp(min=1e-12))[None], step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class Throughput:
    """Series/s and points/s over the run, and the share of wall time spent waiting for data."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.series = 0
        self.points = 0
        self.data_wait = 0.0

    def add(self, series: int, points: int, wait: float) -> None:
        self.series += series
        self.points += points
        self.data_wait += wait

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)

    def rates(self) -> dict:
        e = self.elapsed
        return {"series_per_s": self.series / e, "points_per_s": self.points / e, "data_wait_fraction": self.data_wait / e}


def plot_series(original: torch.Tensor, recon: torch.Tensor, height: int = 64) -> torch.Tensor:
    """A [3, k*height, L] RGB line plot of k series pairs, drawn without a plotting library."""
    k, length = original.shape
    img = torch.ones(3, k * height, length)
    cols = torch.arange(length)
    for i in range(k):
        pair = torch.stack([original[i], recon[i]]).float().cpu()
        lo, hi = pair.min(), pair.max()
        rows = ((hi - pair) / (hi - lo).clamp(min=1e-12) * (height - 1)).round().long() + i * height
        for series, colour in ((0, (0.1, 0.3, 0.9)), (1, (0.9, 0.1, 0.1))):
            for ch, c in enumerate(colour):
                img[ch, rows[series], cols] = c
    return img
