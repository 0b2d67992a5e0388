"""Masking statistics: fraction, stretch lengths (geometric law), determinism, views differ."""

import pytest
import torch

from models.masking import bernoulli_mask, geometric_mask, make_views


def stretches(mask: torch.Tensor, value: bool, interior_only: bool = True) -> torch.Tensor:
    """Lengths of runs equal to `value`; interior runs only (not cut by either end) when asked."""
    m = (mask == value).int()
    d = torch.diff(torch.nn.functional.pad(m, (1, 1)), dim=1)
    starts, ends = (d == 1).nonzero(), (d == -1).nonzero()
    lens = ends[:, 1] - starts[:, 1]
    if interior_only:
        keep = (starts[:, 1] > 0) & (ends[:, 1] < mask.shape[1])
        lens = lens[keep]
    return lens


@pytest.mark.parametrize("ratio", [0.125, 0.5, 0.75])
@pytest.mark.parametrize("length", [336, 97])
def test_geometric_mask_statistics(ratio, length):
    g = torch.Generator().manual_seed(0)
    lm = 3.0
    mask = geometric_mask(20000, length, ratio, lm, g)
    assert mask.shape == (20000, length) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - ratio) < 0.02
    masked = stretches(mask, True).float()
    assert abs(masked.mean().item() - lm) / lm < 0.10
    # Stretch lengths on long series, where cutting at the ends does not bias the sample.
    long = geometric_mask(100, 20000, ratio, lm, g)
    assert abs(stretches(long, True).float().mean().item() - lm) / lm < 0.05
    lu = lm * (1 - ratio) / ratio
    assert abs(stretches(long, False).float().mean().item() - lu) / lu < 0.05


def test_masked_stretches_follow_geometric_pmf():
    g = torch.Generator().manual_seed(1)
    lm = 3.0
    lens = stretches(geometric_mask(200, 20000, 0.5, lm, g), True)  # long: no end effects
    p = 1 / lm
    counts = torch.bincount(lens, minlength=16).float()
    freq = counts / counts.sum()
    for k in range(1, 10):
        pmf = (1 - p) ** (k - 1) * p
        assert abs(freq[k].item() - pmf) < 0.01, (k, freq[k].item(), pmf)
    # chi-square over the first 8 lengths (+ tail) against the pmf
    n = counts.sum().item()
    expected = [n * (1 - p) ** (k - 1) * p for k in range(1, 9)] + [n * (1 - p) ** 8]
    observed = counts[1:9].tolist() + [counts[9:].sum().item()]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    assert chi2 < 27.9  # 8 degrees of freedom, p = 0.0005


def test_kept_mean_one_is_deterministic_length():
    g = torch.Generator().manual_seed(2)
    mask = geometric_mask(1000, 200, 0.75, 3.0, g)  # kept mean 3 * 0.25 / 0.75 = 1
    assert stretches(mask, False).unique().tolist() == [1]


def test_same_seed_same_masks_and_views_differ():
    a = geometric_mask(64, 101, 0.5, 3.0, torch.Generator().manual_seed(7))
    b = geometric_mask(64, 101, 0.5, 3.0, torch.Generator().manual_seed(7))
    c = geometric_mask(64, 101, 0.5, 3.0, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    x = torch.randn(5, 101) + 10.0
    series, keep = make_views(x, 3, 0.5, 3.0, generator=torch.Generator().manual_seed(3))
    assert series.shape == (20, 101)
    assert torch.equal(series[:5], x) and keep[:5].all()
    views = keep[5:].view(3, 5, 101)
    for v in range(3):
        for w in range(v + 1, 3):
            assert not torch.equal(views[v], views[w])
    assert torch.equal(series[5:], x.repeat(3, 1) * keep[5:])


def test_bernoulli_mask():
    g = torch.Generator().manual_seed(4)
    m = bernoulli_mask(2000, 333, 0.3, g)
    assert abs(m.float().mean().item() - 0.3) < 0.01
    lens = stretches(m, True).float()
    assert abs(lens.mean().item() - 1 / 0.7) < 0.05  # i.i.d.: runs geometric with p = 1 - r
    x = torch.randn(3, 50)
    s, keep = make_views(x, 2, 0.3, kind="bernoulli", generator=g)
    assert s.shape == (9, 50) and keep.shape == (9, 50)
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_views(x, 2, 0.3, kind="zeros")


def test_long_series_are_covered():
    # Long series exercise the stretch budget; every position must get a state.
    g = torch.Generator().manual_seed(5)
    m = geometric_mask(8, 50000, 0.5, 3.0, g)
    assert abs(m.float().mean().item() - 0.5) < 0.02
    assert stretches(m, True).max() < 100  # no artificial giant stretch at the end


def test_large_batch_fraction_per_position():
    # Stationary start: the masked fraction is r at every position, not just on average.
    g = torch.Generator().manual_seed(6)
    m = geometric_mask(100_000, 336, 0.5, 3.0, g)
    per_position = m.float().mean(0)
    assert (per_position - 0.5).abs().max().item() < 0.01
