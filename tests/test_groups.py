import hashlib
import json
import re
from typing import Any

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


# -- seed keys that are "a/b" paths ----------------------------------------------------------

NESTED = "train_loop_config/seed"


def _hash(part: dict[str, Any]) -> str:
    """The documented definition, computed here: sha256 of the sorted JSON, 16 hex digits."""
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def test_group_keys_of_flat_keys_are_the_ones_existing_stores_hold() -> None:
    # Pinned values, computed with posthoc_tune/groups.py of commit d3bbc1f (before seed
    # paths): the group keys that stores written until then hold.
    nested_config = {"lr": 0.1, "opt": {"wd": 1e-4, "name": "sgd"}, "seed": 3, "__trial_index__": 5}
    assert group_key(nested_config) == "ad29f60db505779a"
    assert group_key({"lr": 0.1, "rng": 2}, "rng") == "c924a5f4ab3bf1f6"
    # A literal top-level key spelled like a path wins over the path (as before paths).
    assert group_key({"a/seed": 1, "a": {"seed": 5}}, "a/seed") == "628e99cfdc96b78e"
    assert member_seed({"a/seed": 1, "a": {"seed": 5}}, "a/seed") == 1


def test_group_key_of_a_nested_seed_leaves_out_the_seed_at_its_path() -> None:
    members = [
        {"train_loop_config": {"lr": 0.1, "width": 64, "seed": s}, "__trial_index__": s}
        for s in range(3)
    ]
    expected = _hash({"train_loop_config": {"lr": 0.1, "width": 64}})
    assert {group_key(m, NESTED) for m in members} == {expected}
    assert [member_seed(m, NESTED) for m in members] == [0, 1, 2]
    assert members[2] == {
        "train_loop_config": {"lr": 0.1, "width": 64, "seed": 2},
        "__trial_index__": 2,
    }
    other = {"train_loop_config": {"lr": 0.2, "width": 64, "seed": 0}}
    assert group_key(other, NESTED) == _hash({"train_loop_config": {"lr": 0.2, "width": 64}})
    # A dict that only held the seed goes with it: the config as it was before with_seeds.
    assert group_key({"lr": 0.1, "run": {"seed": 4}}, "run/seed") == _hash({"lr": 0.1})
    # Tune-internal keys are dropped at the top level only, where Tune adds them.
    deep = {"train_loop_config": {"__x": 1, "seed": 0}}
    assert group_key(deep, NESTED) == _hash({"train_loop_config": {"__x": 1}})


def test_a_missing_seed_path_names_where_it_broke() -> None:
    message = (
        "config has no seed key 'train_loop_config/seed': 'train_loop_config' has keys "
        "['lr', 'width']; build the param_space with "
        "posthoc_tune.with_seeds(space, n, key='train_loop_config/seed')"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        member_seed({"train_loop_config": {"width": 64, "lr": 0.1}}, NESTED)
    with pytest.raises(ValueError, match=r"no seed key 'a/seed': config has keys \['lr'\]"):
        member_seed({"lr": 0.1}, "a/seed")
    with pytest.raises(ValueError, match=r"'train_loop_config' holds 3, not a dict"):
        member_seed({"train_loop_config": 3}, NESTED)
    with pytest.raises(ValueError, match=r"seed 'train_loop_config/seed' must be an int"):
        member_seed({"train_loop_config": {"seed": "0"}}, NESTED)


def test_with_seeds_nests_the_grid_and_tune_expands_it_at_the_path() -> None:
    space = {"train_loop_config": {"lr": tune.grid_search([0.01, 0.1]), "width": 32}}
    seeded = with_seeds(space, n=3, key=NESTED)
    assert seeded["train_loop_config"]["seed"] == {"grid_search": [0, 1, 2]}
    assert "seed" not in space["train_loop_config"]  # the input is left as it was
    configs = [cfg for _, cfg in generate_variants(seeded)]
    assert sorted(
        (c["train_loop_config"]["lr"], c["train_loop_config"]["seed"]) for c in configs
    ) == [(lr, s) for lr in (0.01, 0.1) for s in range(3)]
    groups: dict[str, list[int]] = {}
    for cfg in configs:
        groups.setdefault(group_key(cfg, NESTED), []).append(member_seed(cfg, NESTED))
    assert groups == {
        _hash({"train_loop_config": {"lr": lr, "width": 32}}): [0, 1, 2] for lr in (0.01, 0.1)
    }
    # Missing levels are created.
    created = [c for _, c in generate_variants(with_seeds({"lr": 1}, 2, "run/seed"))]
    assert created == [{"lr": 1, "run": {"seed": 0}}, {"lr": 1, "run": {"seed": 1}}]


def test_with_seeds_refuses_a_path_it_cannot_add() -> None:
    with pytest.raises(ValueError, match="already has the seed key 'train_loop_config/seed'"):
        with_seeds({"train_loop_config": {"seed": 1}}, 2, NESTED)
    with pytest.raises(ValueError, match="already has the seed key 'a/seed'"):
        with_seeds({"a/seed": 1}, 2, "a/seed")  # the literal flat key
    with pytest.raises(ValueError, match=r"'train_loop_config' holds 0\.1, where a dict"):
        with_seeds({"train_loop_config": 0.1}, 2, NESTED)
    for bad in ("", "a//seed", "seed/", 3):
        with pytest.raises(ValueError, match=f"seed_key must be .*, got {re.escape(repr(bad))}"):
            with_seeds({}, 2, bad)  # type: ignore[arg-type]
