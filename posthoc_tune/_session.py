"""Where a reporter runs: outside Tune, in a Tune trial, or in a Ray Train worker of one.

The reporter needs its trial's id, the experiment's store, its rank, and how to report and
checkpoint. A Tune function trial has them from ``ray.tune``. A Ray Train worker launched
from a Tune trial (Ray 2.60's pattern for multi-worker trials: a Tune trainable builds a
``TorchTrainer`` and forwards rank 0's reports to Tune) has neither Tune's context nor its
storage, so the Tune trainable passes them in ``train_loop_config`` under :data:`TRIAL_KEY`
(:func:`posthoc_tune.ray_train.with_trial`); every rank then reports through
``ray.train.report`` (a barrier: each rank once per epoch; Tune receives rank 0's metrics)
and only rank 0 writes to the store.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow.fs as pafs

from posthoc_tune._cluster import check_shared_storage
from posthoc_tune.store import Dtype, PredictionStore

TRIAL_KEY = "__posthoc_trial__"
"""The ``train_loop_config`` key carrying a Tune trial's context into Ray Train workers
(Tune-internal ``__`` keys are left out of group keys and stored configs)."""

Kind = Literal["local", "tune", "train"]


@dataclass(frozen=True)
class TrialContext:
    """What a Ray Train worker needs of its Tune trial (picklable: it travels in the
    ``train_loop_config``)."""

    trial_id: str
    experiment_path: str
    filesystem: pafs.FileSystem
    gate: Any = None  # the trial's posthoc_tune.ray_train.TrialChannel actor, if it has one


class WriteGate:
    """Rank 0's pace in a :func:`~posthoc_tune.ray_train.torch_trainable` trial: it writes
    epoch ``N + 1`` only once Tune went on from epoch ``N``, as a Tune function trial does
    (its report returns when Tune asks for the next result). A first write in a process (a
    start, or a restart after a failure) goes at once."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.written: int | None = None  # the last epoch this process wrote

    @contextlib.contextmanager
    def writing(self, epoch: int) -> Iterator[None]:
        """Wait for Tune, then hold the trial open while the store is written."""
        import ray

        ray.get(self.channel.acquire.remote(self.written))
        try:
            yield
        finally:
            self.channel.release.remote()
            self.written = epoch


@dataclass(frozen=True)
class Session:
    """The reporter's trial, store and rank, and how it reports and restores."""

    kind: Kind
    trial_id: str
    store: PredictionStore | None
    rank: int = 0
    world_size: int = 1
    gate: WriteGate | None = None

    def writing(self, epoch: int) -> contextlib.AbstractContextManager[None]:
        """Around a store write: paced by the trial's gate, if it has one."""
        return contextlib.nullcontext() if self.gate is None else self.gate.writing(epoch)

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes to the store and reports metrics: one writer per epoch."""
        return self.rank == 0

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        """Report once for this rank (``ray.train.report`` needs every rank, each once)."""
        if self.kind == "tune":
            from ray import tune

            ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            tune.report(metrics, checkpoint=ckpt)
        elif self.kind == "train":
            import ray.train

            writer = self.is_writer
            ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics if writer else {}, checkpoint=ckpt if writer else None)

    @contextlib.contextmanager
    def restored(self) -> Iterator[str | None]:
        """The directory of the checkpoint to resume from (a retry), or None."""
        ckpt = None
        if self.kind == "tune":
            from ray import tune

            ckpt = tune.get_checkpoint()
        elif self.kind == "train":
            import ray.train

            ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as directory:
            yield os.fspath(directory)


def current_session(
    config: Mapping[str, Any],
    store: PredictionStore | str | os.PathLike[str] | None,
    trial_id: str,
    dtype: Dtype,
) -> Session:
    """The session the reporter runs in, with its store (an explicit ``store`` wins)."""
    given: PredictionStore | None
    if store is None or isinstance(store, PredictionStore):
        given = store
    else:
        given = PredictionStore.open(store, dtype=dtype)
    context = config.get(TRIAL_KEY)
    if context is not None:
        if not isinstance(context, TrialContext):
            raise TypeError(
                f"config[{TRIAL_KEY!r}] must be a posthoc_tune TrialContext (from "
                f"posthoc_tune.ray_train.with_trial), got {type(context).__name__}"
            )
        rank, world_size = _train_rank()
        experiment = PredictionStore(context.filesystem, context.experiment_path, dtype=dtype)
        gate = WriteGate(context.gate) if context.gate is not None and rank == 0 else None
        session = Session("train", context.trial_id, given or experiment, rank, world_size, gate)
    elif _tune_trial_id() is not None:
        from ray import tune

        storage = tune.get_context().get_storage()
        experiment = PredictionStore(
            storage.storage_filesystem, storage.experiment_fs_path, dtype=dtype
        )
        session = Session("tune", str(_tune_trial_id()), given or experiment)
    else:
        worker = _train_worker()
        if worker is not None and given is None:
            rank, world_size = worker
            raise RuntimeError(
                f"PostHocReporter runs in a Ray Train worker (rank {rank} of {world_size}) "
                f"without its Tune trial: in the Tune function, pass train_loop_config="
                f"posthoc_tune.ray_train.with_trial(config) to the TorchTrainer (or use "
                f"posthoc_tune.ray_train.torch_trainable), or give the reporter store= and "
                f"trial_id="
            )
        rank, world_size = worker or _process_group_rank()
        return Session("local", trial_id, given, rank, world_size)
    if session.kind != "local" and session.store is not None and session.is_writer:
        check_shared_storage(session.store)
    return session


def _tune_trial_id() -> str | None:
    from ray import tune

    with warnings.catch_warnings():  # Ray warns when asked outside a trial: that is the question
        warnings.simplefilter("ignore")
        trial_id = tune.get_context().get_trial_id()
    return None if trial_id is None else str(trial_id)


def _train_worker() -> tuple[int, int] | None:
    """(rank, world size) inside a Ray Train worker, None elsewhere. Ray raises outside a
    training function (and, as an exception, a DeprecationWarning in a Tune function)."""
    try:
        return _train_rank()
    except (RuntimeError, DeprecationWarning, ImportError):
        return None


def _process_group_rank() -> tuple[int, int]:
    """(rank, world size) of a torch.distributed job started without Ray (e.g. torchrun):
    rank 0 alone writes there too."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _train_rank() -> tuple[int, int]:
    import ray.train

    context = ray.train.get_context()
    return int(context.get_world_rank()), int(context.get_world_size())
