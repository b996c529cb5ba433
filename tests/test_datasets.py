"""Offline datasets: the spirals generator, the splits, and exact symmetric label noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posthoc_tune.datasets import DATASETS, NoisyDataset, load, symmetric_noise

SPLITS = ("train", "val", "test")


def _labels(data: NoisyDataset, split: str) -> np.ndarray:
    return getattr(data, f"y_{split}").numpy()


def test_spirals_shapes_and_splits() -> None:
    data = load("spirals", n_samples=1000, seed=0)
    assert "spirals" in DATASETS
    assert (data.name, data.n_classes, data.noise) == ("spirals", 3, 0.4)
    assert data.x_train.shape == (700, 2) and data.x_val.shape == (150, 2)
    assert data.x_test.shape == (150, 2)
    for split in SPLITS:
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert len(y) == len(x) and set(np.unique(y.numpy())) <= {0, 1, 2}
    assert data.y_test_clean.shape == data.y_test.shape
    # points around the unit disc, jittered: nothing far outside it
    assert torch.cat([data.x_train, data.x_val, data.x_test]).norm(dim=1).max() < 1.5


@pytest.mark.parametrize("n_samples", [999, 1000, 1001])
def test_spirals_classes_are_balanced(n_samples: int) -> None:
    data = load("spirals", noise=0.0, n_samples=n_samples, seed=3)
    counts = np.bincount(np.concatenate([_labels(data, s) for s in SPLITS]), minlength=3)
    assert counts.sum() == n_samples and counts.max() - counts.min() <= 1


def test_spirals_are_deterministic_for_a_seed() -> None:
    a, b = load("spirals", n_samples=600, seed=7), load("spirals", n_samples=600, seed=7)
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "y_test_clean"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    other = load("spirals", n_samples=600, seed=8)
    assert not torch.equal(a.x_train, other.x_train)


@pytest.mark.parametrize("name", ["spirals", "digits"])
@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_each_split_has_exactly_round_rate_n_flipped_labels(name: str, rate: float) -> None:
    # The split is drawn before the noise, so noise=0 gives the same split with clean labels.
    clean = load(name, noise=0.0, n_samples=1000, seed=5)
    noisy = load(name, noise=rate, n_samples=1000, seed=5)
    assert torch.equal(noisy.y_test_clean, clean.y_test)
    for split in SPLITS:
        assert torch.equal(getattr(noisy, f"x_{split}"), getattr(clean, f"x_{split}"))
        y_clean, y_noisy = _labels(clean, split), _labels(noisy, split)
        assert int((y_noisy != y_clean).sum()) == round(rate * len(y_clean)), split


@pytest.mark.parametrize(("n", "rate"), [(100, 0.4), (101, 0.25), (7, 0.5), (50, 0.0)])
def test_symmetric_noise_flips_exactly_round_rate_n_to_other_classes(n: int, rate: float) -> None:
    labels = np.arange(n) % 4
    noisy = symmetric_noise(labels, rate, 4, np.random.default_rng(0))
    flipped = 0
    for before, after in zip(labels.tolist(), noisy.tolist(), strict=True):
        assert 0 <= after < 4
        flipped += before != after
    assert flipped == round(rate * n)
    assert np.array_equal(labels, np.arange(n) % 4)  # the input is left alone


def test_symmetric_noise_targets_every_other_class_alike() -> None:
    labels = np.zeros(30_000, dtype=np.int64)
    noisy = symmetric_noise(labels, 0.5, 4, np.random.default_rng(1))
    counts = np.bincount(noisy, minlength=4)
    assert counts[0] == 15_000
    assert np.all(np.abs(counts[1:] - 5_000) < 300)  # ~5 sd of a binomial(15000, 1/3)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_symmetric_noise_rejects_a_bad_rate(rate: float) -> None:
    with pytest.raises(ValueError, match=f"noise rate must be in \\[0, 1\\), got {rate}"):
        symmetric_noise(np.zeros(10, dtype=np.int64), rate, 3, np.random.default_rng(0))


def test_an_unknown_dataset_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar-7'.*'spirals'"):
        load("cifar-7")


@pytest.mark.parametrize("n_samples", [2, 0, 2.5, True])
def test_spirals_reject_too_few_samples(n_samples: object) -> None:
    with pytest.raises(ValueError, match=f"n_samples >= 3 .*got {n_samples!r}"):
        load("spirals", n_samples=n_samples)  # type: ignore[arg-type]
