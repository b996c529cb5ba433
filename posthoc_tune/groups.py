"""Seed groups: trials whose configs differ only in the seed key are one configuration.

A group is the unit that ensembles, PostHocASHA and PostHocSearch reason about. The group key
is a stable hash of the config without the seed key and without Tune-internal keys (names
starting with ``__``, such as ``__trial_index__``), so it is identical on every node and
across restarts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of a config value: containers recursed, numpy scalars unwrapped,
    anything else (classes, functions, search-space objects) replaced by its ``repr``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    return repr(value)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``, the "/" paths Tune and Optuna use."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{prefix}{name}/"))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _group_part(config: Mapping[str, Any], seed_key: str) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != seed_key and not str(k).startswith("__")}


def group_key(config: Mapping[str, Any], seed_key: str = "seed") -> str:
    """Stable 16-hex-digit hash of ``config`` minus ``seed_key`` and Tune-internal keys."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    canonical = json.dumps(jsonable(_group_part(config, seed_key)), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def member_seed(config: Mapping[str, Any], seed_key: str = "seed") -> int:
    """The member index of a trial in its group: its integer seed."""
    if seed_key not in config:
        raise ValueError(
            f"config has no seed key {seed_key!r} (keys: {sorted(map(str, config))}); "
            f"build the param_space with posthoc_tune.with_seeds(space, n, key={seed_key!r})"
        )
    seed = config[seed_key]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed {seed_key!r} must be an int, got {seed!r}")
    return int(seed)


def with_seeds(param_space: Mapping[str, Any], n: int, key: str = "seed") -> dict[str, Any]:
    """Return a copy of ``param_space`` in which every configuration runs as ``n`` seeds.

    Adds ``key: tune.grid_search([0, ..., n-1])``. Tune orders grid trials by sorted key
    path, the first path varying fastest; group decisions (PostHocASHA) come soonest when a
    configuration's members run together, so name the seed key to sort first (e.g.
    ``key="_seed"``) or use PostHocSearch, which launches them consecutively. Tune's default
    variant generator draws
    random domains afresh for each grid point, which would give the seeds of one
    "configuration" different hyperparameters; with random domains in the space, pass
    ``search_alg=BasicVariantGenerator(constant_grid_search=True)`` (a warning says so) or use
    PostHocSearch.
    """
    from ray import tune
    from ray.tune.search.sample import Domain

    if not isinstance(param_space, Mapping):
        raise TypeError(f"param_space must be a mapping, got {type(param_space).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (seeds per configuration) must be an int >= 1, got {n!r}")
    if not isinstance(key, str) or not key:
        raise ValueError(f"seed key must be a non-empty string, got {key!r}")
    if key in param_space:
        raise ValueError(
            f"param_space already has the seed key {key!r}; with_seeds adds it, so remove it "
            f"or pass another key"
        )

    def has_random(space: Any) -> bool:
        if isinstance(space, Domain):
            return True
        if isinstance(space, Mapping):
            return any(has_random(v) for k, v in space.items() if k != "grid_search")
        return False

    if has_random(param_space):
        warnings.warn(
            "param_space has random domains: Tune samples them anew for every seed unless the "
            "Tuner uses search_alg=BasicVariantGenerator(constant_grid_search=True) "
            "(or posthoc_tune's PostHocSearch)",
            UserWarning,
            stacklevel=2,
        )
    space = copy.deepcopy(dict(param_space))
    space[key] = tune.grid_search(list(range(n)))
    return space
