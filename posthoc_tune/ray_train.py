"""Multi-worker trials: a Ray Train ``TorchTrainer`` per Tune trial, in Ray 2.60's pattern.

Ray 2.60 runs Ray Train V2, which refuses ``tune.Tuner(TorchTrainer(...))``: a Tune trainable
builds the ``TorchTrainer`` and forwards rank 0's reports to Tune. Tune's context (the trial
id, the experiment's storage) does not reach the workers, so :func:`with_trial` adds it to the
``train_loop_config``; a :class:`~posthoc_tune.PostHocReporter` built from that config in
``train_loop_per_worker`` writes to the experiment's store from rank 0 alone and reports on
every rank. :func:`torch_trainable` is that Tune trainable, ready made, and it keeps the Train
run in step with Tune:

* **Rank 0 stays one epoch ahead at most.** Ray's ``TuneReportCallback`` hands results on
  through three queues (worker, controller, Tune), so the workers of a trial that Tune had
  already pruned trained and stored up to four more epochs. Here each result waits until Tune
  has taken it, and rank 0 writes epoch ``N + 1`` only once Tune went on from epoch ``N``: a
  pruned trial's store ends at its last result.
* **A stopped trial stops its workers.** When Tune stops or pauses the trial, the trainable
  waits for a store write in progress, then aborts the Train run: its workers exit and Train
  removes their placement group at once (a run left to die with its Tune actor keeps the
  group until Ray's State API notices the dead controller).

Two facts of Ray 2.60 to plan for. A trial reserves only its Tune trainable's resources (1 CPU
unless ``tune.with_resources`` says otherwise); the workers' come from the ``ScalingConfig``
through Train's own placement group, which Tune does not count, so cap
``max_concurrent_trials`` at what fits, or Train waits for workers that cannot start. And after
a Tune-level retry ``training_iteration`` restarts at 1: schedulers should count the
reporter's ``epoch`` (``PostHocASHA(time_attr="epoch")``).
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import ray
from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.tune.result import RESULT_DUPLICATE

from posthoc_tune._session import TRIAL_KEY, TrialContext

__all__ = [
    "TRIAL_KEY",
    "TorchTrial",
    "TrialChannel",
    "TrialContext",
    "torch_trainable",
    "with_trial",
]

CHECKPOINT_PATH_KEY = "checkpoint_path"
"""The result key of a Train checkpoint's path, as Ray's ``TuneReportCallback`` names it."""

WRITE_PATIENCE_S = 60.0
"""How long a stopping trial waits for rank 0 to finish an epoch's store write."""


def with_trial(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` plus the current Tune trial's context, to pass as a ``TorchTrainer``'s
    ``train_loop_config`` in a Tune function of your own (with Ray's ``TuneReportCallback``;
    such a run is not paced or aborted as :func:`torch_trainable`'s are)."""
    context = tune.get_context()
    trial_id = context.get_trial_id()
    if trial_id is None:
        raise RuntimeError(
            "posthoc_tune.ray_train.with_trial runs in a Tune trial (the Tune function that "
            "builds the TorchTrainer), where the trial's id and storage are known"
        )
    storage = context.get_storage()
    trial = TrialContext(str(trial_id), storage.experiment_fs_path, storage.storage_filesystem)
    return {**config, TRIAL_KEY: trial}


class TrialChannel:
    """One trial's meeting point (a Ray actor): the Train controller puts rank 0's results,
    the Tune trainable takes them and says which epoch Tune went on from, rank 0 waits for
    that before each store write, and a stopping trial shuts the door on further writes."""

    def __init__(self) -> None:
        self._results: deque[dict[str, Any]] = deque()
        self._closed = False  # the Train run has ended
        self._accepted: int | None = None  # the last epoch Tune went on from
        self._stopped = False
        self._writing = False
        self._changed = asyncio.Condition()
        self._controller: Any = None

    async def put(self, result: dict[str, Any], controller: Any) -> None:
        async with self._changed:
            self._results.append(result)
            self._controller = controller
            self._changed.notify_all()

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def get(self) -> dict[str, Any] | None:
        """The next result, or None once the run ended and every result was taken."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._results) or self._closed)
            return self._results.popleft() if self._results else None

    async def accept(self, epoch: int) -> None:
        async with self._changed:
            self._accepted = epoch if self._accepted is None else max(self._accepted, epoch)
            self._changed.notify_all()

    async def acquire(self, after: int | None) -> None:
        """Return once rank 0 may write: Tune went on from epoch ``after`` (at once for None).
        Never returns once the trial is stopped: the abort that follows ends the worker."""

        def ready() -> bool:
            went_on = after is None or (self._accepted is not None and self._accepted >= after)
            return went_on and not self._stopped

        async with self._changed:
            await self._changed.wait_for(ready)
            self._writing = True

    async def release(self) -> None:
        async with self._changed:
            self._writing = False
            self._changed.notify_all()

    async def stop(self) -> Any:
        """No more writes (after the one in progress, if any); the controller to abort."""
        async with self._changed:
            # Past the patience rank 0 died in its write, or is stuck: abort all the same.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: not self._writing), WRITE_PATIENCE_S
                )
            self._stopped = True
            self._changed.notify_all()
            return self._controller


class _Forward(UserCallback):
    """In the Train controller: rank 0's metrics (and the checkpoint's path, as Ray's
    ``TuneReportCallback`` adds it) to the trial's channel, without blocking the controller."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        result = dict(metrics[0])
        if checkpoint is not None:
            result[CHECKPOINT_PATH_KEY] = checkpoint.path
        self.channel.put.remote(result, ray.get_runtime_context().current_actor)


class TorchTrial(tune.Trainable):
    """A Tune trial that runs a ``TorchTrainer`` (see the module's docstring); build one with
    :func:`torch_trainable`."""

    train_loop_per_worker: ClassVar[Callable[[dict[str, Any]], None]]
    scaling_config: ClassVar[Any]
    failure_config: ClassVar[Any] = None
    torch_config: ClassVar[Any] = None

    def setup(self, config: dict[str, Any]) -> None:
        self._channel: Any = ray.remote(TrialChannel).options(num_cpus=0).remote()
        storage = self._storage  # Tune's StorageContext of this trial
        assert storage is not None, "Tune gives every trial its storage"
        trial = TrialContext(
            self.trial_id, storage.experiment_fs_path, storage.storage_filesystem, self._channel
        )
        self._last_epoch: int | None = None
        self._train_checkpoint: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._fit, args=({**config, TRIAL_KEY: trial}, trial), daemon=True
        )
        self._thread.start()

    def _fit(self, loop_config: dict[str, Any], trial: TrialContext) -> None:
        import ray.train
        from ray.train.torch import TorchTrainer

        try:
            TorchTrainer(
                type(self).train_loop_per_worker,  # a staticmethod
                train_loop_config=loop_config,
                scaling_config=self.scaling_config,
                torch_config=self.torch_config,
                run_config=ray.train.RunConfig(
                    name=trial.trial_id,
                    storage_path=posixpath.join(trial.experiment_path, "train"),
                    storage_filesystem=trial.filesystem,
                    failure_config=self.failure_config,
                    callbacks=[_Forward(self._channel)],  # type: ignore[list-item]  # Ray's types
                ),
            ).fit()
        except BaseException as error:  # raised by step(), in Tune's thread
            self._error = error
        finally:
            self._channel.close.remote()

    def step(self) -> dict[str, Any]:
        if self._last_epoch is not None:  # Tune asks for more: it went on from the last one
            self._channel.accept.remote(self._last_epoch)
        result: dict[str, Any] | None = ray.get(self._channel.get.remote())
        if result is None:  # the Train run ended: Tune marks its last result done
            self._thread.join()
            if self._error is not None:
                raise self._error
            return {RESULT_DUPLICATE: True}
        if isinstance(result.get("epoch"), int | float):
            self._last_epoch = int(result["epoch"])
        self._train_checkpoint = result.get(CHECKPOINT_PATH_KEY, self._train_checkpoint)
        return result

    def save_checkpoint(self, checkpoint_dir: str) -> dict[str, Any]:
        """Where the weights are: the Train run's latest checkpoint (Tune checkpoints class
        trainables at the end by default; a restarted trial's Train run restores itself)."""
        return {CHECKPOINT_PATH_KEY: self._train_checkpoint}

    def load_checkpoint(self, checkpoint: dict[str, Any] | None) -> None:
        self._train_checkpoint = (checkpoint or {}).get(CHECKPOINT_PATH_KEY)

    def cleanup(self) -> None:
        """Abort the Train run unless it ended: after rank 0's write in progress, before any
        other. A run stopped before its first result (its controller still unknown) fails at
        its first write, the channel gone, or dies with this actor."""
        if self._thread.is_alive():
            controller = ray.get(self._channel.stop.remote())
            if controller is not None:
                with contextlib.suppress(ray.exceptions.RayActorError):  # abort exits it
                    ray.get(controller.abort.remote())
                self._thread.join()  # fit() returns (raising) once the controller is gone
        ray.kill(self._channel)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """A reused actor aborts its previous trial's run, then starts the new trial's."""
        self.cleanup()
        self.setup(new_config)
        return True


def torch_trainable(
    train_loop_per_worker: Callable[[dict[str, Any]], None],
    *,
    scaling_config: Any,
    failure_config: Any = None,
    torch_config: Any = None,
) -> type[TorchTrial]:
    """A Tune trainable that runs each trial as a ``TorchTrainer`` of
    ``train_loop_per_worker``, its config carrying the trial (:func:`with_trial`).

    Args:
        train_loop_per_worker: the function every worker runs, given the trial's config.
        scaling_config: ``ray.train.ScalingConfig`` (workers, GPUs, resources per worker).
        failure_config: ``ray.train.FailureConfig``: worker restarts within the trial.
        torch_config: ``ray.train.torch.TorchConfig`` (e.g. the process-group backend).

    The Train run is named after the trial and stored in the experiment folder
    (``<experiment>/train/<trial_id>``), so a trial that Tune retries
    (``tune.FailureConfig``) finds its Train run and resumes from its last checkpoint.
    Tune cannot pause these trials (their checkpoints are Train's): under PostHocASHA pass
    ``run_ahead=None``.
    """
    name = getattr(train_loop_per_worker, "__name__", "torch_trainable")
    attributes = {
        "train_loop_per_worker": staticmethod(train_loop_per_worker),
        "scaling_config": scaling_config,
        "failure_config": failure_config,
        "torch_config": torch_config,
    }
    return type(name, (TorchTrial,), attributes)
