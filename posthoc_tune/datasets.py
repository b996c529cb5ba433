"""Offline noisy-label datasets for the demo, examples and tests (never downloads anything).

MNIST-1D comes from ``mnist1d``'s ``make_dataset`` generator (its default loader downloads, so
it is not used); digits is scikit-learn's bundled copy. Spirals are generated here with numpy:
they are 2-D, so decision boundaries can be drawn (as in the paper's appendix figure), and
they are a negative control (the project's notes found no reversal on them at 30% noise: a
plain MLP barely memorises the flipped labels). Symmetric label noise follows the paper's
CIFAR-N protocol: train, val and test all carry noisy labels (val and test share the noise),
and the clean test labels are kept alongside for reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from posthoc_tune.keys import DATASETS

SPIRAL_ARMS = 3


@dataclass(frozen=True)
class NoisyDataset:
    """Train/val/test tensors with noisy labels, plus the clean test labels."""

    name: str
    noise: float
    n_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_test_clean: torch.Tensor


def symmetric_noise(
    labels: np.ndarray, rate: float, n_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Flip exactly ``round(rate * n)`` labels, each to a uniformly chosen *other* class."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate!r}")
    noisy = labels.copy()
    flip = rng.choice(labels.size, size=round(rate * labels.size), replace=False)
    offset = rng.integers(1, n_classes, size=flip.size)
    noisy[flip] = (labels[flip] + offset) % n_classes
    return noisy


def load(
    name: str = "mnist1d",
    *,
    noise: float = 0.4,
    n_samples: int = 8000,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> NoisyDataset:
    """Generate a dataset offline and split it into noisy train/val/test.

    ``n_samples`` applies to MNIST-1D and spirals (training-set size is the main lever on
    post-hoc reversal, see the project notes); digits always has its 1,797 bundled images.
    """
    rng = np.random.default_rng(seed)
    if name == "mnist1d":
        x, y = _mnist1d(n_samples, seed)
    elif name == "spirals":
        # A stream of its own, so that the points do not depend on how the split draws.
        x, y = _spirals(n_samples, np.random.default_rng([seed, 1]))
    elif name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.data / 16.0, bunch.target
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    n_classes = int(y.max()) + 1
    order = rng.permutation(len(y))
    n_val, n_test = round(val_fraction * len(y)), round(test_fraction * len(y))
    parts = np.split(order, [len(y) - n_val - n_test, len(y) - n_test])
    noisy = [symmetric_noise(y[idx], noise, n_classes, rng) for idx in parts]

    def xt(idx: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x[idx], dtype=torch.float32)

    def yt(labels: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(labels, dtype=torch.int64)

    return NoisyDataset(
        name=name,
        noise=noise,
        n_classes=n_classes,
        x_train=xt(parts[0]),
        y_train=yt(noisy[0]),
        x_val=xt(parts[1]),
        y_val=yt(noisy[1]),
        x_test=xt(parts[2]),
        y_test=yt(noisy[2]),
        y_test_clean=yt(y[parts[2]]),
    )


def _mnist1d(n_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = n_samples
    args.train_split = 1.0  # we split ourselves
    args.seed = seed
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    return np.asarray(data["x"]), np.asarray(data["y"])


def _spirals(n_samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``SPIRAL_ARMS`` interleaved arms of one turn each, radius uniform in [0, 1], jittered by
    Gaussian noise (sd 0.05) so that the arms touch near the centre; classes as balanced as
    ``n_samples`` allows (counts differ by at most one)."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < SPIRAL_ARMS:
        # fewer points would leave a class out, and the class count is read from the labels
        raise ValueError(f"spirals need n_samples >= {SPIRAL_ARMS} (an int), got {n_samples!r}")
    y = np.arange(n_samples) % SPIRAL_ARMS
    radius = rng.uniform(0.0, 1.0, n_samples)
    angle = 2 * np.pi * (radius + y / SPIRAL_ARMS)
    x = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return x + rng.normal(0.0, 0.05, x.shape), y
