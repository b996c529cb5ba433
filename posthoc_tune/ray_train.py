"""Multi-worker trials: a Ray Train ``TorchTrainer`` per Tune trial, in Ray 2.60's pattern.

Ray 2.60 runs Ray Train V2, which refuses ``tune.Tuner(TorchTrainer(...))``: a Tune function
trainable builds the ``TorchTrainer`` with Ray's ``TuneReportCallback``, which forwards rank
0's reports to Tune. Tune's context (the trial id, the experiment's storage) does not reach the
workers, so :func:`with_trial` adds it to the ``train_loop_config``; a
:class:`~posthoc_tune.PostHocReporter` built from that config in ``train_loop_per_worker``
writes to the experiment's store from rank 0 alone and reports on every rank.
:func:`torch_trainable` is that Tune function, ready made.

Two facts of Ray 2.60 to plan for. A trial reserves only its Tune function's resources (1 CPU
unless ``tune.with_resources`` says otherwise); the workers' come from the ``ScalingConfig``
through Train's own placement group, which Tune does not count, so cap
``max_concurrent_trials`` at what fits, or Train waits for workers that cannot start. And after
a Tune-level retry ``training_iteration`` restarts at 1: schedulers should count the
reporter's ``epoch`` (``PostHocASHA(time_attr="epoch")``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping
from typing import Any

from posthoc_tune._session import TRIAL_KEY, TrialContext

__all__ = ["TRIAL_KEY", "TrialContext", "torch_trainable", "with_trial"]


def with_trial(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` plus the current Tune trial's context, to pass as a ``TorchTrainer``'s
    ``train_loop_config``; call it in the Tune function."""
    from ray import tune

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


def torch_trainable(
    train_loop_per_worker: Callable[[dict[str, Any]], None],
    *,
    scaling_config: Any,
    failure_config: Any = None,
    torch_config: Any = None,
) -> Callable[[dict[str, Any]], None]:
    """A Tune function trainable that runs each trial as a ``TorchTrainer`` of
    ``train_loop_per_worker``, its config carrying the trial (:func:`with_trial`).

    Args:
        train_loop_per_worker: the function every worker runs, given the trial's config.
        scaling_config: ``ray.train.ScalingConfig`` (workers, GPUs, resources per worker).
        failure_config: ``ray.train.FailureConfig``: worker restarts within the trial.
        torch_config: ``ray.train.torch.TorchConfig`` (e.g. the process-group backend).

    The Train run is named after the trial and stored in the experiment folder
    (``<experiment>/train/<trial_id>``), so a trial that Tune retries
    (``tune.FailureConfig``) finds its Train run and resumes from its last checkpoint.
    """

    def trainable(config: dict[str, Any]) -> None:
        import ray.train
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        loop_config = with_trial(config)
        trial: TrialContext = loop_config[TRIAL_KEY]
        TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=scaling_config,
            torch_config=torch_config,
            run_config=ray.train.RunConfig(
                name=trial.trial_id,
                storage_path=posixpath.join(trial.experiment_path, "train"),
                storage_filesystem=trial.filesystem,
                failure_config=failure_config,
                callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # Ray's own types
            ),
        ).fit()

    trainable.__name__ = getattr(train_loop_per_worker, "__name__", "torch_trainable")
    trainable.__qualname__ = trainable.__name__
    return trainable
