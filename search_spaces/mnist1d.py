"""MNIST-1D MLP space (the demo's model), for noisy-label runs on a CPU.

Source: the project's offline reference study (``notes/offline-reversal.md``): a 2-hidden-layer
MLP trained with SGD + momentum 0.9 shows post-hoc reversal at 20-40% symmetric noise, with
lr around 0.03-0.1 and weight decay 5e-4; wider nets and more data make the effect larger.
Add seeds with ``posthoc_tune.with_seeds`` (4 per configuration as in the study).
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
