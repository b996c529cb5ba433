"""PyTorch Lightning integration: a ``Callback`` that runs a :class:`PostHocReporter` in ``fit``.

Needs the ``lightning`` extra (``lightning.pytorch``, the package Ray Train integrates with);
``import posthoc_tune`` never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as error:
    raise ImportError(
        "posthoc_tune.lightning needs Lightning: pip install 'posthoc-tune[lightning]'"
    ) from error

from posthoc_tune.reporter import PostHocReporter, reporter_options

BatchToXY = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


class _Batches:
    """A loader's batches as the reporter evaluates them: converted to the trainer's precision
    (as Lightning converts its own batches), then mapped to ``(x, y)``. The loader is looked up
    at each pass because Lightning creates its val dataloader after ``on_fit_start``."""

    def __init__(
        self,
        loader: Callable[[], Iterable[Any]],
        convert: Callable[[Any], Any],
        batch_to_xy: BatchToXY | None,
    ) -> None:
        self._loader = loader
        self._convert = convert
        self._batch_to_xy = batch_to_xy

    def __iter__(self) -> Iterator[Any]:
        for raw in self._loader():
            batch = self._convert(raw)
            yield batch if self._batch_to_xy is None else self._batch_to_xy(batch)


def _val_dataloader(trainer: pl.Trainer) -> Iterable[Any]:
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)) and len(loaders) == 1:
        loaders = loaders[0]
    if loaders is None or isinstance(loaders, (list, tuple, Mapping)):
        found = "none" if loaders is None else f"{len(loaders)}"
        raise ValueError(
            f"PostHocLightningCallback(val=None) evaluates on the trainer's val dataloader, but "
            f"the trainer has {found} at this epoch: pass val= explicitly"
        )
    return loaders


class PostHocLightningCallback(pl.Callback):
    """Post-hoc metrics and stored logits for every epoch of ``Trainer.fit``, one Tune result each.

    It steps a :class:`PostHocReporter` in ``on_train_epoch_end``: Lightning calls that hook
    once per epoch, after the epoch's validation, never for the sanity check, and, on resume
    from a checkpoint saved at an epoch's validation end (before the step), for that epoch
    again. Inside Tune each
    step makes one ``tune.report`` holding the post-hoc metrics and ``trainer.callback_metrics``
    (what the module logged, e.g. ``val_loss``). Do not add Ray's ``RayTrainReportCallback``
    too: that reports each epoch twice.

    The reporter is built in ``on_fit_start``, once Lightning has moved the module to its
    device, so the SWA copy lives there too; :attr:`reporter` is None until then. Its state
    (SWA average, epoch, temperatures) goes into Lightning's checkpoints through
    :meth:`state_dict`, so ``fit(..., ckpt_path=...)`` continues the average exactly.
    Single-process only: with ``world_size > 1`` every rank would write the same epoch.

    Args:
        config: the trial's config; stored with its group key and seed.
        val: None for the trainer's val dataloader (the only one; not shuffled), or any form
            ``PostHocReporter`` takes: ``(x, y)``, ``(predict, labels)`` or a loader.
        test: a form ``PostHocReporter`` takes, or None for no test split.
        batch_to_xy: turns a loader's batch into ``(inputs, labels)``, e.g.
            ``lambda b: (b["x"], b["y"])`` for dict batches; applied to the val and test
            loaders (the trainer's included), not to ``(x, y)`` or ``(predict, labels)`` pairs.
            Loader batches are first converted to the trainer's precision, as Lightning does.
        options: keyword arguments of :class:`PostHocReporter` (``store``, ``seed_key``,
            ``swa_start_epoch``, ``swa_trainable_only``, ``bn_loader``, ``eval_batch_size``,
            ``trial_id``, ``store_dtype``, ``transforms``); unknown names are refused here.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        val: Any = None,
        test: Any = None,
        batch_to_xy: BatchToXY | None = None,
        **options: Any,
    ) -> None:
        if batch_to_xy is not None and not callable(batch_to_xy):
            raise TypeError(f"batch_to_xy must be callable, got {batch_to_xy!r}")
        self.config = config
        self._val = val
        self._test = test
        self._batch_to_xy = batch_to_xy
        self._reporter_kwargs = reporter_options(options, "PostHocLightningCallback")
        self._reporter: PostHocReporter | None = None
        self._restored: dict[str, Any] | None = None
        self.metrics: dict[str, float] = {}
        """The last epoch's metrics, as reported."""

    @property
    def reporter(self) -> PostHocReporter | None:
        """The reporter of the current fit (its ``swa.model`` is the SWA model), or None."""
        return self._reporter

    def _split(self, spec: Any, trainer: pl.Trainer) -> Any:
        """The reporter's form of a split: loaders (None: the trainer's val dataloader) go
        through ``_Batches``; pairs, and what the reporter refuses, go as they are."""
        if spec is not None and (
            isinstance(spec, (tuple, list, str, bytes, Mapping)) or not isinstance(spec, Iterable)
        ):
            return spec
        loader = (lambda: _val_dataloader(trainer)) if spec is None else (lambda: spec)
        return _Batches(loader, trainer.precision_plugin.convert_input, self._batch_to_xy)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            raise RuntimeError(
                f"PostHocLightningCallback runs in a single process, but this trainer has "
                f"world_size={trainer.world_size} (global rank {trainer.global_rank}): every "
                f"rank would evaluate and write the same epoch. Train with devices=1 and "
                f"num_nodes=1 in each Tune trial"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = self._restored
        if state is None and self._reporter is not None and self._reporter.model is pl_module:
            state = self.state_dict()  # a further fit() of the same module continues
        val = self._split(self._val, trainer)
        test = None if self._test is None else self._split(self._test, trainer)
        self._reporter = PostHocReporter(
            pl_module, self.config, val=val, test=test, **self._reporter_kwargs
        )
        if state is not None:
            # The reporter restores the weights too: Lightning already has, so give it the
            # module's own (the callback's state leaves them out of the checkpoint).
            self._reporter.load_state_dict({**state, "model": pl_module.state_dict()})
        self._restored = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reporter = self._built()
        if reporter.epoch != trainer.current_epoch:
            raise RuntimeError(
                f"the post-hoc reporter has {reporter.epoch} epochs but the trainer starts at "
                f"epoch {trainer.current_epoch}: resume from a checkpoint saved with this "
                f"callback (its state holds the SWA average), or start from scratch"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metrics = self._built().step(trainer.callback_metrics)

    def state_dict(self) -> dict[str, Any]:
        """The reporter's state without the model weights, which the checkpoint holds already."""
        if self._reporter is None:
            return {}
        state = self._reporter.state_dict()
        del state["model"]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state for ``on_fit_start``: Lightning restores it before the reporter
        exists (the module is not on its device yet)."""
        self._restored = dict(state_dict)

    def _built(self) -> PostHocReporter:
        if self._reporter is None:
            raise RuntimeError("PostHocLightningCallback is used outside Trainer.fit")
        return self._reporter


__all__ = ["PostHocLightningCallback"]
