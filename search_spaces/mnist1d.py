"""MNIST-1D MLP space (the demo's model), for noisy-label runs on a CPU.

Source: the project's offline reference study (``docs/sources.md``): an MLP with 2 hidden
layers of width 256, trained with SGD + momentum (lr 0.03 or 0.1, weight decay 5e-4, 100 epochs)
on 16,000 MNIST-1D samples, shows post-hoc reversal at 20% and 40% symmetric label noise; more
training data makes the effect larger. The ranges searched around those values and the batch
size are our choice. Add seeds with ``posthoc_tune.with_seeds`` (4 per configuration as in the
study).
"""

from __future__ import annotations

from typing import Any

from ray import tune

from search_spaces._checks import check_epochs


def mlp_space(epochs: int = 100) -> dict[str, Any]:
    """lr log-uniform in [0.01, 0.3], width in {64, 128, 256}, weight decay log-uniform
    in [1e-5, 1e-3], batch size 128, ``epochs`` epochs."""
    return {
        "lr": tune.loguniform(0.01, 0.3),
        "width": tune.choice([64, 128, 256]),
        "weight_decay": tune.loguniform(1e-5, 1e-3),
        "batch_size": 128,
        "epochs": check_epochs(epochs),
    }
