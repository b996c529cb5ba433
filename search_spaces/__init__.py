"""Ready Ray Tune search spaces for posthoc_tune, with documented defaults and sources.

Each function returns a ``param_space`` without a seed key (add seeds with
``posthoc_tune.with_seeds``, or let ``PostHocSearch`` assign them); each module's docstring says
where its values come from and which are our choice.

* ``mnist1d.mlp_space``: MNIST-1D MLP, CPU; the setting where the project saw reversal offline.
* ``digits.mlp_space``: scikit-learn digits MLP, CPU, seconds per trial; weak reversal.
* ``tabular.mlp_space``: tabular MLP after the paper's Folktables (ACSIncome) setting.
* ``cifar_n.resnet_space``: CIFAR-10-N / CIFAR-100-N ResNet-18, the paper's CIFAR-N setting (GPU).
* ``llm_lora.lora_space``: LoRA instruction tuning of a causal LLM, the paper's LLM setting (GPU).

``SPACES`` maps these names to the functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from search_spaces import cifar_n, digits, llm_lora, mnist1d, tabular

SPACES: dict[str, Callable[..., dict[str, Any]]] = {
    "mnist1d": mnist1d.mlp_space,
    "digits": digits.mlp_space,
    "tabular": tabular.mlp_space,
    "cifar_n": cifar_n.resnet_space,
    "llm_lora": llm_lora.lora_space,
}

__all__ = ["SPACES", "cifar_n", "digits", "llm_lora", "mnist1d", "tabular"]
