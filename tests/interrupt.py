"""A driver crash on cue, for restore tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune


class Interrupt(tune.Callback):
    """Aborts the run once ``after`` trials have completed, the first time only."""

    def __init__(self, marker: Path, after: int) -> None:
        self.marker, self.after, self.completed = marker, after, 0

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.completed += 1

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self.completed >= self.after and not self.marker.exists():
            self.marker.touch()
            raise RuntimeError("simulated driver crash")
