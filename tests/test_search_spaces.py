"""The search spaces, resolved by Ray's own sampler, against the ranges their docstrings state.

The expected values are written out here independently of the modules, so that a change to a
space that its documentation does not follow fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from ray.tune.search.variant_generator import generate_variants

import posthoc_tune as pht
import search_spaces
from search_spaces import cifar_n, digits, llm_lora, mnist1d, tabular

N_DRAWS = 200

# name -> (space function, {key: (low, high) log-uniform | set of choices | constant})
Spec = dict[str, Any]
EXPECTED: dict[str, tuple[Callable[..., dict[str, Any]], Spec]] = {
    "mnist1d": (
        mnist1d.mlp_space,
        {
            "lr": (0.01, 0.3),
            "width": {64, 128, 256},
            "weight_decay": (1e-5, 1e-3),
            "batch_size": 128,
            "epochs": 100,
        },
    ),
    "digits": (
        digits.mlp_space,
        {
            "lr": (0.01, 0.2),
            "width": {64, 128, 256},
            "weight_decay": (1e-5, 1e-3),
            "batch_size": 64,
            "epochs": 30,
        },
    ),
    "tabular": (
        tabular.mlp_space,
        {
            "lr": (2e-3, 5e-2),
            "width": {128, 256, 512, 1024},
            "layers": {2, 3, 4},
            "weight_decay": {0.0, 1e-4, 1e-3, 1e-2},
            "batch_size": 256,
            "epochs": 50,
        },
    ),
    "cifar_n": (
        cifar_n.resnet_space,
        {
            "dataset": "cifar10n",
            "label_set": "worst",
            "lr": (0.02, 0.5),
            "weight_decay": (1e-4, 2e-3),
            "width": {32, 64, 128},
            "momentum": 0.9,
            "batch_size": 500,
            "epochs": 100,
        },
    ),
    "llm_lora": (
        llm_lora.lora_space,
        {
            "model": "meta-llama/Llama-2-7b-hf",
            "lora_r": {8, 16, 32, 64},
            "lora_alpha": {8, 16, 32},
            "lora_dropout": {0.0, 0.05, 0.1},
            "lr": (5e-5, 5e-4),
            "batch_size": 16,
            "warmup_ratio": 0.03,
            "weight_decay": 0.0,
            "max_grad_norm": 0.3,
            "epochs": 3,
        },
    ),
}
NAMES = sorted(EXPECTED)


def _draw(space: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """N_DRAWS configurations resolved by Tune's variant generator from one seeded RNG."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(N_DRAWS):
        ((_, config),) = generate_variants(space, random_state=rng)
        draws.append(config)
    return draws


def test_spaces_lists_every_module() -> None:
    assert set(search_spaces.SPACES) == set(EXPECTED)
    for name, (function, _) in EXPECTED.items():
        assert search_spaces.SPACES[name] is function


@pytest.mark.parametrize("name", NAMES)
def test_sampled_values_lie_in_the_documented_ranges(name: str) -> None:
    function, expected = EXPECTED[name]
    draws = _draw(function())
    for config in draws:
        assert set(config) == set(expected), "keys differ from the documented ones"
    for key, spec in expected.items():
        values = [config[key] for config in draws]
        if isinstance(spec, tuple):  # log-uniform on [low, high]
            low, high = spec
            assert all(isinstance(v, float) and low <= v <= high for v in values), key
            # log-uniform, not uniform: the median sits near the geometric mean, and both
            # ends of the range are reached
            logs = (np.log(values) - math.log(low)) / (math.log(high) - math.log(low))
            assert 0.35 < float(np.median(logs)) < 0.65, key
            assert logs.min() < 0.1 and logs.max() > 0.9, key
        elif isinstance(spec, set):  # every documented choice, and nothing else, comes up
            assert set(values) == spec, key
        else:
            assert all(v == spec for v in values), key


@pytest.mark.parametrize("name", NAMES)
def test_sampling_is_reproducible_for_a_seed(name: str) -> None:
    function, _ = EXPECTED[name]
    assert _draw(function(), seed=3) == _draw(function(), seed=3)
    assert _draw(function(), seed=3) != _draw(function(), seed=4)


@pytest.mark.parametrize("name", NAMES)
def test_no_seed_key_and_with_seeds_adds_one(name: str) -> None:
    function, expected = EXPECTED[name]
    space = function()
    assert "seed" not in space
    with pytest.warns(UserWarning, match="random domains"):
        seeded = pht.with_seeds(space, n=4)
    assert seeded["seed"] == {"grid_search": [0, 1, 2, 3]}
    assert "seed" not in space  # the input is left alone
    # With constant grid search, the four seeds of one configuration share its values.
    variants = [c for _, c in generate_variants(seeded, constant_grid_search=True, random_state=0)]
    assert [c["seed"] for c in variants] == [0, 1, 2, 3]
    assert all(
        {k: c[k] for k in expected} == {k: variants[0][k] for k in expected} for c in variants
    )


@pytest.mark.parametrize("name", NAMES)
def test_posthoc_search_accepts_each_space(name: str) -> None:
    function, expected = EXPECTED[name]
    search = pht.PostHocSearch(function(), metric="val/swa+ens+ts/nll", mode="min", n_seeds=4)
    config = search.suggest("trial-0")
    assert config is not None and config["seed"] == 0
    searched = {k for k, spec in expected.items() if isinstance(spec, (tuple, set))}
    assert set(config) == searched | {"seed"}  # Tune merges the constants in itself


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("epochs", [0, -5, 2.5, True, "10"])
def test_a_bad_epoch_count_is_named(name: str, epochs: Any) -> None:
    function, _ = EXPECTED[name]
    with pytest.raises(ValueError, match=f"epochs must be an int >= 1, got {epochs!r}"):
        function(epochs=epochs)


@pytest.mark.parametrize("epochs", [1, 7])
def test_epochs_argument_is_used(epochs: int) -> None:
    for name in NAMES:
        assert EXPECTED[name][0](epochs=epochs)["epochs"] == epochs, name


# -- CIFAR-N ---------------------------------------------------------------------------------

CIFAR10N_SETS = {"worst", "aggregate", "random1", "random2", "random3", "clean"}
CIFAR100N_SETS = {"noisy_fine", "clean_fine", "noisy_coarse", "clean_coarse"}


def test_cifar_n_label_sets_map_to_the_cifar_n_file_keys() -> None:
    assert set(cifar_n.LABEL_SETS["cifar10n"]) == CIFAR10N_SETS
    assert set(cifar_n.LABEL_SETS["cifar100n"]) == CIFAR100N_SETS
    assert set(cifar_n.LABEL_FILE_KEYS["cifar10n"].values()) == {
        "worse_label",
        "aggre_label",
        "random_label1",
        "random_label2",
        "random_label3",
        "clean_label",
    }
    assert cifar_n.LABEL_FILE_KEYS["cifar10n"]["worst"] == "worse_label"
    assert cifar_n.LABEL_FILE_KEYS["cifar100n"] == {
        "noisy_fine": "noisy_label",
        "clean_fine": "clean_label",
        "noisy_coarse": "noisy_coarse_label",
        "clean_coarse": "clean_coarse_label",
    }


@pytest.mark.parametrize(
    ("dataset", "label_set", "chosen", "classes"),
    [
        ("cifar10n", None, "worst", 10),
        ("cifar10n", "aggregate", "aggregate", 10),
        ("cifar100n", None, "noisy_fine", 100),
        ("cifar100n", "noisy_coarse", "noisy_coarse", 20),
    ],
)
def test_cifar_n_dataset_and_label_set(
    dataset: str, label_set: str | None, chosen: str, classes: int
) -> None:
    space = cifar_n.resnet_space(dataset, label_set)
    assert (space["dataset"], space["label_set"]) == (dataset, chosen)
    assert cifar_n.n_classes(dataset, chosen) == classes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "cifar10"}, "unknown dataset 'cifar10'; expected one of \\['cifar10n', "),
        ({"dataset": "CIFAR100N"}, "unknown dataset 'CIFAR100N'"),
        ({"label_set": "aggre"}, "unknown label_set 'aggre'; expected one of \\['worst', "),
        ({"dataset": "cifar100n", "label_set": "worst"}, "unknown label_set 'worst'.*'noisy_fine'"),
        ({"dataset": "cifar10n", "label_set": "noisy_fine"}, "unknown label_set 'noisy_fine'"),
    ],
)
def test_cifar_n_rejects_unknown_names(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cifar_n.resnet_space(**kwargs)


def test_cifar_n_class_count_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        cifar_n.n_classes("cifar10", "worst")
    with pytest.raises(ValueError, match="unknown label_set 'noisy'"):
        cifar_n.n_classes("cifar100n", "noisy")


# -- LLM -------------------------------------------------------------------------------------


def test_llm_lora_takes_another_model() -> None:
    assert llm_lora.lora_space("mistralai/Mistral-7B-v0.1")["model"] == "mistralai/Mistral-7B-v0.1"


@pytest.mark.parametrize("model", ["", "  ", None, 7])
def test_llm_lora_rejects_a_bad_model(model: Any) -> None:
    with pytest.raises(
        ValueError, match=f"model must be a Hugging Face model id or path, got {model!r}"
    ):
        llm_lora.lora_space(model)
