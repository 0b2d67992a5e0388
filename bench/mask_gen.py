"""Geometric mask generation: our vectorised sampler vs the authors' per-element Markov-chain loop.

Shape: the ETTh1 reference batch, 16 windows x 7 channels x 336 points x 3 views.
Writes bench/results/mask_gen.json: {"ours_s", "loop_s", "ratio"} (seconds per batch).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from bench.results_io import write_result
from models.masking import geometric_mask

B, C, L, M = 16, 7, 336, 3
RATIO, LM = 0.5, 3.0


def authors_geom_noise_mask_single(length: int, lm: float, masking_ratio: float) -> np.ndarray:
    """The reference implementation's two-state Markov chain, one Python iteration per element."""
    keep_mask = np.ones(length, dtype=bool)
    p_m = 1 / lm
    p_u = p_m * masking_ratio / (1 - masking_ratio)
    p = [p_m, p_u]
    state = int(np.random.rand() > masking_ratio)
    for i in range(length):
        keep_mask[i] = state
        if np.random.rand() < p[state]:
            state = 1 - state
    return keep_mask


def loop_batch() -> torch.Tensor:
    masks = [authors_geom_noise_mask_single(L, LM, RATIO) for _ in range(B * C * M)]
    return ~torch.from_numpy(np.stack(masks))


def ours_batch(g: torch.Generator) -> torch.Tensor:
    return geometric_mask(B * C * M, L, RATIO, LM, g)


def timeit(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t) / repeats)
    return best


def main() -> dict:
    np.random.seed(0)
    g = torch.Generator().manual_seed(0)
    ours = timeit(lambda: ours_batch(g), 200)
    loop = timeit(loop_batch, 3)
    frac_ours = ours_batch(g).float().mean().item()
    frac_loop = loop_batch().float().mean().item()
    result = {"ours_s": ours, "loop_s": loop, "ratio": loop / ours, "shape": [B, C, L, M],
              "masked_fraction": {"ours": frac_ours, "loop": frac_loop}, "threads": torch.get_num_threads(),
              "target_ratio": 1000}
    print(f"mask generation, batch {B}x{C}x{L}x{M} views (r={RATIO}, lm={LM}):")
    print(f"  ours (vectorised, torch): {ours * 1e3:9.3f} ms/batch  (masked fraction {frac_ours:.3f})")
    print(f"  authors' per-element loop: {loop * 1e3:8.1f} ms/batch  (masked fraction {frac_loop:.3f})")
    print(f"  ratio: {loop / ours:.0f}x (target >= 1000x: {'met' if loop / ours >= 1000 else 'NOT met'})")
    write_result("mask_gen", result)
    return result


if __name__ == "__main__":
    import argparse

    # no options: only --help
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
