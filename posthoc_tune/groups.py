"""Seed groups: trials whose configs differ only in the seed key are one configuration.

A group is the unit that ensembles, PostHocASHA and PostHocSearch reason about. The group key
is a stable hash of the config without the seed and without Tune-internal keys (top-level
names starting with ``__``, such as ``__trial_index__``, the only place Tune adds them), so it
is identical on every node and across restarts. :class:`SeedGroup` is how PostHocASHA and
PostHocSearch follow a group while it runs: its members' status and progress.

A seed key may be a path: ``"train_loop_config/seed"`` is ``config["train_loop_config"]["seed"]``
("/" separates levels, as in the nested paths of Tune and Optuna), for Ray Train's
``TorchTrainer`` whose trainable receives ``train_loop_config``. A top-level key spelled
exactly like the path wins: a flat config keeps meaning what it meant before paths.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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


def unflatten_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b": 1}`` -> ``{"a": {"b": 1}}``: Tune's nested spaces, as Optuna names them."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        out = with_path(out, name, value)
    return out


def check_seed_key(key: object) -> None:
    """Refuse a key that cannot name a seed: a non-empty name or "a/b" path is expected."""
    if not isinstance(key, str) or "" in key.split("/"):
        raise ValueError(
            f"seed_key must be a non-empty name or 'a/b' path without empty levels, got {key!r}"
        )


def _levels(config: Mapping[str, Any], key: str) -> list[str]:
    """The levels of the seed key ``key`` in ``config``: the literal top-level key when
    ``config`` has it, else the "/"-separated parts."""
    return [key] if key in config else key.split("/")


def _find(config: Mapping[str, Any], key: str) -> tuple[bool, Any, str]:
    """(found, the value at ``key``, where the path broke when not found)."""
    node: Any = config
    levels = _levels(config, key)
    for depth, level in enumerate(levels):
        where = repr("/".join(levels[:depth])) if depth else "config"
        if not isinstance(node, Mapping):
            return False, None, f"{where} holds {node!r}, not a dict"
        if level not in node:
            return False, None, f"{where} has keys {sorted(map(str, node))}"
        node = node[level]
    return True, node, ""


def has_path(config: Mapping[str, Any], key: str) -> bool:
    """Whether ``config`` has a value at the seed key ``key`` (a name or an "a/b" path)."""
    return _find(config, key)[0]


def get_path(config: Mapping[str, Any], key: str) -> Any:
    """The value at the seed key ``key`` (a name or an "a/b" path), or None."""
    return _find(config, key)[1]


def without_path(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A copy of ``config`` without the value at ``key`` and without the dicts that held only
    it (as :func:`with_path` creates them); an unchanged copy when ``config`` has none. Only
    the dicts along the path are copied."""
    if not has_path(config, key):
        return dict(config)
    levels = _levels(config, key)
    out = dict(config)
    parents = [out]
    for level in levels[:-1]:
        child = dict(parents[-1][level])
        parents[-1][level] = child
        parents.append(child)
    del parents[-1][levels[-1]]
    for depth in range(len(levels) - 1, 0, -1):  # innermost first
        if parents[depth]:
            break
        del parents[depth - 1][levels[depth - 1]]
    return out


def with_path(config: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``config`` with ``value`` at ``key``, creating the missing dicts along the
    path; only the dicts along it are copied."""
    levels = _levels(config, key)
    out = dict(config)
    node = out
    for depth, level in enumerate(levels[:-1]):
        child = node.get(level, {})
        if not isinstance(child, Mapping):
            path = "/".join(levels[: depth + 1])
            raise ValueError(
                f"cannot put {key!r} in the config: {path!r} holds {child!r}, where a dict "
                f"was expected"
            )
        node[level] = dict(child)
        node = node[level]
    node[levels[-1]] = value
    return out


def group_key(config: Mapping[str, Any], seed_key: str = "seed") -> str:
    """Stable 16-hex-digit hash of ``config`` minus the seed at ``seed_key`` (a name or an
    "a/b" path) and Tune-internal keys."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    part = {k: v for k, v in without_path(config, seed_key).items() if not str(k).startswith("__")}
    canonical = json.dumps(jsonable(part), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def member_seed(config: Mapping[str, Any], seed_key: str = "seed") -> int:
    """The member index of a trial in its group: its integer seed at ``seed_key``."""
    found, seed, broke = _find(config, seed_key)
    if not found:
        raise ValueError(
            f"config has no seed key {seed_key!r}: {broke}; build the param_space with "
            f"posthoc_tune.with_seeds(space, n, key={seed_key!r})"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed {seed_key!r} must be an int, got {seed!r}")
    return int(seed)


Status = Literal["live", "done", "error"]
LIVE: Status = "live"
DONE: Status = "done"  # finished, or stopped
ERROR: Status = "error"  # failed for good, or until Tune's retry re-adds it


@dataclass
class Member:
    """A member's progress: its furthest epoch, and its latest time (a scheduler's progress
    attribute; None until it reports after a (re)start, when it resumes from a checkpoint)."""

    status: Status = LIVE
    epoch: int = 0
    time: float | None = None


@dataclass
class SeedGroup:
    """A running seed group: its members (Tune trial ids), their status and progress.

    Failed members are never waited for: a group is judged on the members that can still
    report, as one would ship the ensemble of the members that trained.
    """

    members: dict[str, Member] = field(default_factory=dict)

    def join(self, trial_id: str, status: Status = LIVE) -> None:
        """Add a member, or add it again (a retried or restored trial): its time is unknown
        until it reports from its checkpoint."""
        member = self.members.setdefault(trial_id, Member())
        member.status, member.time = status, None

    def report(self, trial_id: str, epoch: int, time: float | None = None) -> None:
        """A member's result at ``epoch`` (and ``time``, where the caller tracks one)."""
        member = self.members[trial_id]
        member.epoch = max(member.epoch, epoch)
        member.time = time

    def ids(self, *statuses: Status) -> list[str]:
        """The members with one of ``statuses``, in the order they joined."""
        return [t for t, m in self.members.items() if m.status in statuses]

    def common_epoch(self) -> int:
        """The epoch every member that has not failed reached (0 before each has reported):
        finished members count, as an ensemble without them would be another model."""
        return min((m.epoch for m in self.members.values() if m.status != ERROR), default=0)

    def live_time(self) -> float | None:
        """The time every live member reached (the slowest one's), None while a live member
        has not reported since it (re)started; once none is live, the furthest finished
        member's time. A live group waits for its members, not for those that are done."""
        live = [m.time for m in self.members.values() if m.status == LIVE]
        if live:
            return None if None in live else min(t for t in live if t is not None)
        done = [m.time for m in self.members.values() if m.status == DONE and m.time is not None]
        return max(done) if done else None


def with_seeds(param_space: Mapping[str, Any], n: int, key: str = "seed") -> dict[str, Any]:
    """Return a copy of ``param_space`` in which every configuration runs as ``n`` seeds.

    Adds ``tune.grid_search([0, ..., n-1])`` at ``key``, a name or an "a/b" path (dicts
    created as needed, e.g. ``"train_loop_config/seed"`` for Ray Train's ``TorchTrainer``).
    Tune orders grid trials by sorted key path, the first path varying fastest; group
    decisions (PostHocASHA) come soonest when a configuration's members run together, so name
    the seed key to sort first (e.g. ``key="_seed"``) or use PostHocSearch, which launches them
    consecutively. Tune's default variant generator draws random domains afresh for each grid
    point, which would give the seeds of one "configuration" different hyperparameters; with
    random domains in the space, pass
    ``search_alg=BasicVariantGenerator(constant_grid_search=True)`` (a warning says so) or use
    PostHocSearch.
    """
    from ray import tune
    from ray.tune.search.sample import Domain

    if not isinstance(param_space, Mapping):
        raise TypeError(f"param_space must be a mapping, got {type(param_space).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (seeds per configuration) must be an int >= 1, got {n!r}")
    check_seed_key(key)
    if has_path(param_space, key):
        raise ValueError(
            f"param_space already has the seed key {key!r}; with_seeds adds it, so remove it "
            f"or pass another key"
        )
    space = with_path(copy.deepcopy(dict(param_space)), key, tune.grid_search(list(range(n))))

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
    return space
