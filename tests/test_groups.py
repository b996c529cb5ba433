import hashlib
import json

import pytest
from ray import tune
from ray.tune.search.variant_generator import generate_variants

from posthoc_tune import group_key, member_seed, with_seeds


def test_group_key_ignores_the_seed_and_tune_internal_keys() -> None:
    a = {"lr": 0.1, "width": 64, "seed": 0, "__trial_index__": 0}
    b = {"width": 64, "seed": 3, "lr": 0.1, "__trial_index__": 2}
    assert group_key(a) == group_key(b)
    assert group_key(a) != group_key({**a, "lr": 0.2})
    assert group_key({"lr": 0.1, "rng": 1}, seed_key="rng") == group_key(
        {"lr": 0.1, "rng": 2}, "rng"
    )
    # Independent recomputation of the documented definition.
    canonical = json.dumps({"lr": 0.1, "width": 64}, sort_keys=True)
    assert group_key(a) == hashlib.sha256(canonical.encode()).hexdigest()[:16]


def test_member_seed_requires_an_integer_seed() -> None:
    assert member_seed({"seed": 2}) == 2
    with pytest.raises(ValueError, match=r"config has no seed key 'seed'.*with_seeds"):
        member_seed({"lr": 0.1})
    with pytest.raises(ValueError, match=r"must be an int, got 0\.5"):
        member_seed({"seed": 0.5})


def test_with_seeds_gives_every_configuration_n_identical_members() -> None:
    space = with_seeds({"lr": tune.grid_search([0.01, 0.1]), "width": 32}, n=3)
    configs = [cfg for _, cfg in generate_variants(space)]
    assert len(configs) == 6
    groups: dict[str, list[int]] = {}
    for cfg in configs:
        groups.setdefault(group_key(cfg), []).append(cfg["seed"])
    assert sorted(map(sorted, groups.values())) == [[0, 1, 2], [0, 1, 2]]
    # The documented ordering: a seed key that sorts first makes members consecutive.
    ordered = [c for _, c in generate_variants(with_seeds({"lr": tune.grid_search([1, 2])}, 2))]
    assert [c["seed"] for c in ordered] == [0, 0, 1, 1]
    ordered = [
        c for _, c in generate_variants(with_seeds({"lr": tune.grid_search([1, 2])}, 2, "_seed"))
    ]
    assert [c["_seed"] for c in ordered] == [0, 1, 0, 1]


def test_with_seeds_warns_about_random_domains_and_the_fix_works() -> None:
    with pytest.warns(UserWarning, match="constant_grid_search=True"):
        space = with_seeds({"lr": tune.loguniform(1e-3, 1e-1), "opt": {"wd": 0.0}}, n=2)
    configs = [cfg for _, cfg in generate_variants(space, constant_grid_search=True)]
    assert len({group_key(c) for c in configs}) == 1 and [c["seed"] for c in configs] == [0, 1]


def test_with_seeds_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="already has the seed key 'seed'"):
        with_seeds({"seed": 1}, n=2)
    with pytest.raises(ValueError, match="int >= 1, got 0"):
        with_seeds({}, n=0)
    with pytest.raises(TypeError, match="must be a mapping"):
        with_seeds([1, 2], n=2)  # type: ignore[arg-type]
