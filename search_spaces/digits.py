"""scikit-learn digits MLP space: the smallest offline setting, seconds per trial on a CPU.

Sources: the fixed values are those of ``examples/custom_trainable.py``, the project's digits
example (an MLP with one BatchNorm hidden layer of width 128, SGD + momentum 0.9, weight decay
5e-4, cosine schedule, batch size 64, 30 epochs, lr grid {0.02, 0.1}). The ranges searched
around them are our choice. Expect little: the project's offline reference study
(``docs/sources.md``) found only weak reversal on digits at 40% symmetric noise
(noisy-test NLL 1.755 -> 1.725 under post-hoc selection) and none at 0% noise, so this space is
for quick checks of a pipeline, not for showing the effect (use ``search_spaces.mnist1d``).
Add seeds with ``posthoc_tune.with_seeds``.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from search_spaces._checks import check_epochs


def mlp_space(epochs: int = 30) -> dict[str, Any]:
    """lr log-uniform in [0.01, 0.2], width in {64, 128, 256}, weight decay log-uniform in
    [1e-5, 1e-3], batch size 64, ``epochs`` epochs (digits has ~1,260 training images)."""
    return {
        "lr": tune.loguniform(0.01, 0.2),
        "width": tune.choice([64, 128, 256]),
        "weight_decay": tune.loguniform(1e-5, 1e-3),
        "batch_size": 64,
        "epochs": check_epochs(epochs),
    }
