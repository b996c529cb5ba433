"""One Ray instance per test process; Tune helpers with a hang guard; per-test time limits
that hold even when a test hangs inside C code."""

from __future__ import annotations

import faulthandler
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train's controller polls its workers every 2 s, and a torch_trainable epoch waits for
# Tune's answer to the last one: 0.25 s polls shorten the multi-worker tests' tiny epochs.
# Read by the controllers, which inherit this process's environment through ray.init.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

import pytest
import ray
from ray import tune

TIME_BUDGET_S = 180  # a run that hangs fails instead of stalling the suite
RAY_TEST_TIMEOUT_S = 360  # tests on the Ray cluster; pyproject's ``timeout`` for the rest
_stderr: dict[str, int] = {}  # the terminal's stderr, duplicated before tests capture it


def pytest_configure(config: pytest.Config) -> None:
    _stderr["fd"] = os.dup(2)  # capturing is suspended while plugins configure


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real Ray runs (tests on the session's cluster) get a longer limit unless they set
    their own."""
    for item in items:
        uses_ray = "ray_session" in getattr(item, "fixturenames", ())
        if uses_ray and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(RAY_TEST_TIMEOUT_S))


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool:
    """A test past its limit (pytest-timeout's ``timeout``) prints every thread's traceback
    and ends its process, which pytest-xdist reports as that test's failure before it starts
    a new worker. faulthandler's watchdog thread fires even while the test is stuck in C code
    (a oneDNN barrier was), where SIGALRM's Python handler never runs."""
    faulthandler.dump_traceback_later(settings.timeout, exit=True, file=_stderr["fd"])
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> bool:
    faulthandler.cancel_dump_traceback_later()
    return True


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """This process's Ray (each pytest-xdist worker starts its own)."""
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
