"""Tabular MLP space, after the paper's Folktables (ACSIncome) setting.

Source of the fixed values and of the centre of each range: the paper's code defaults
(rishabh-ranjan/post-hoc-reversal ``src/expt/folktables_.py``; see ``docs/sources.md``):
PyG ``MLP`` with 3 layers (3 linear layers: 2 hidden of width 512, BatchNorm and ReLU), AdamW,
lr 1e-2, weight decay 0, constant lr (exponential decay factor 1.0), 50 epochs, batch size 256;
data: ACSIncome, California, 2018 1-year person survey, one-hot categoricals, standardised,
shuffled with seed 42 and split 80/10/10. The ranges around those values (lr log-uniform in
[2e-3, 5e-2], width {128, 256, 512, 1024}, layers {2, 3, 4}, weight decay {0, 1e-4, 1e-3,
1e-2}) are our choice. No numbers from the paper's Folktables results were used, so this space
makes no claim about how strong reversal is here. The model has BatchNorm: pass the val loader
to ``PostHocReporter`` so that SWA's BatchNorm statistics are re-estimated (its default), as the
paper's code does. Add seeds with ``posthoc_tune.with_seeds``.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from search_spaces._checks import check_epochs


def mlp_space(epochs: int = 50) -> dict[str, Any]:
    """lr log-uniform in [2e-3, 5e-2] (AdamW), width in {128, 256, 512, 1024}, layers (linear
    layers, output included) in {2, 3, 4}, weight decay in {0, 1e-4, 1e-3, 1e-2}, batch size
    256, ``epochs`` epochs."""
    return {
        "lr": tune.loguniform(2e-3, 5e-2),
        "width": tune.choice([128, 256, 512, 1024]),
        "layers": tune.choice([2, 3, 4]),
        "weight_decay": tune.choice([0.0, 1e-4, 1e-3, 1e-2]),
        "batch_size": 256,
        "epochs": check_epochs(epochs),
    }
