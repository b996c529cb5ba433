"""The companion Tune callback of PostHocASHA: state across restores, values into results.

Ray Tune checkpoints callbacks but never schedulers, so the callback carries the scheduler's
rungs and groups through ``Tuner.restore``. Callbacks run after the scheduler on each result,
so it also writes the ensemble values the scheduler just computed into that result, where
``ResultGrid`` dataframes and the logs show them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.tune import Callback
from ray.tune.experiment import Trial

if TYPE_CHECKING:
    from posthoc_tune.schedulers import PostHocASHA


class PostHocCallback(Callback):
    """Add to ``RunConfig(callbacks=[...])``; get it as ``PostHocASHA(...).callback``."""

    def __init__(self, scheduler: PostHocASHA) -> None:
        self.scheduler = scheduler

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        self.scheduler._callback_attached = True

    def on_trial_result(
        self,
        iteration: int,
        trials: list[Trial],
        trial: Trial,
        result: dict[str, Any],
        **info: Any,
    ) -> None:
        self.scheduler.annotate(trial, result)

    def get_state(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.scheduler.set_state(state["scheduler"])
