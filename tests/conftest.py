"""One Ray instance for the whole session; Tune helpers with a hang guard."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest
import ray
from ray import tune

TIME_BUDGET_S = 180  # a run that hangs fails instead of stalling the suite


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def run_tune(ray_session: None, tmp_path: Path) -> Callable[..., tune.ResultGrid]:
    """Run a real Tuner under ``tmp_path``, with reuse_actors=True unless told otherwise."""

    def run(
        trainable: Callable[..., Any],
        param_space: dict[str, Any],
        *,
        name: str = "exp",
        tune_config: dict[str, Any] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> tune.ResultGrid:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                **{"reuse_actors": True, "time_budget_s": TIME_BUDGET_S, **(tune_config or {})}
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=str(tmp_path / "ray"), verbose=0, **(run_config or {})
            ),
        )
        return tuner.fit()

    return run
