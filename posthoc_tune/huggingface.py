"""Hugging Face ``Trainer`` integration: a ``TrainerCallback`` that adds the post-hoc metrics to
each evaluation's metrics, so the Trainer's own Ray Tune report carries them.

Needs the ``huggingface`` extra (``transformers``); ``import posthoc_tune`` never imports it.

Why ``on_evaluate``: in transformers 5.x, ``Trainer._evaluate`` calls ``evaluate()``, which
prefixes the metric names with ``eval_``, logs them and then calls ``on_evaluate`` with the
metrics dict; ``_evaluate`` then hands that same dict to ``_report_to_hp_search``, which computes
``compute_objective`` and makes the evaluation's one ``ray.tune.report``. Keys added in
``on_evaluate`` therefore reach Tune once, in HF's report, and exactly as named
(``val/swa+ts/nll``), after the prefixing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import IntervalStrategy
except ImportError as error:
    raise ImportError(
        "posthoc_tune.huggingface needs transformers: pip install 'posthoc-tune[huggingface]'"
    ) from error

from posthoc_tune._arrays import output_logits
from posthoc_tune.keys import parse_metric_key
from posthoc_tune.reporter import PostHocReporter, reporter_options

IGNORE_INDEX = -100
"""The label Hugging Face models and collators use for "no label" (PyTorch's ``ignore_index``):
such rows are left out of the post-hoc metrics and the store."""


class _DictSplit:
    """A split read from dict batches, as the Trainer's collators build them: the model gets
    every key but the label's, and rows labelled ``IGNORE_INDEX`` are dropped. The labels are
    read once up front (the reporter needs them) and checked at every evaluation, so the same
    rows are dropped and stored every epoch."""

    def __init__(self, split: str, loader: Callable[[], Iterable[Any]], label_name: str) -> None:
        self.split = split
        self._loader = loader
        self._label_name = label_name
        self.labels = torch.cat([labels[keep] for _, labels, keep in self._batches()])

    def _batches(self) -> Iterable[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]:
        """(model inputs, labels, rows to keep) of each batch."""
        for batch in self._loader():
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"the {self.split} loader must yield dict batches, as Hugging Face collators "
                    f"do; got {type(batch).__name__}: pass {self.split}=(x, y) tensors or "
                    f"(predict, labels) instead"
                )
            if self._label_name not in batch:
                raise ValueError(
                    f"the {self.split} batches have no {self._label_name!r} key (keys: "
                    f"{sorted(batch)}): set TrainingArguments(label_names=[...])"
                )
            labels = torch.as_tensor(batch[self._label_name]).cpu()
            if labels.ndim != 1:
                raise ValueError(
                    f"the {self.split} labels have shape {tuple(labels.shape)}, not one label "
                    f"per row: PostHocTrainerCallback supports per-example classification; for "
                    f"token-level tasks pass {self.split}=(predict, labels) with the labelled "
                    f"positions as rows"
                )
            inputs = {k: v for k, v in batch.items() if k != self._label_name}
            yield inputs, labels, labels != IGNORE_INDEX

    def predict(self, model: torch.nn.Module, split: str) -> np.ndarray:
        """The logits of the kept rows (float32, rows x classes); ``PostHocReporter`` calls it
        under ``torch.no_grad`` in eval mode, for the live and the SWA model."""
        device = next(iter(model.parameters()), torch.empty(0)).device
        outs, ys = [], []
        for inputs, labels, keep in self._batches():
            on_device = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
            }
            logits = output_logits(
                model(**on_device), f"on the {split} batches", f"; pass {split}=(predict, labels)"
            )
            if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"the model's {split} logits have shape {tuple(logits.shape)} for "
                    f"{labels.shape[0]} labels; expected (rows, classes)"
                )
            outs.append(logits[keep.to(logits.device)].detach().to("cpu", torch.float32))
            ys.append(labels[keep])
        if not torch.equal(torch.cat(ys), self.labels):
            raise ValueError(
                f"the {split} loader yielded different labels than at the first evaluation; "
                f"evaluation loaders must not shuffle"
            )
        return torch.cat(outs).numpy()


class PostHocTrainerCallback(TrainerCallback):
    """Post-hoc metrics and stored logits for every evaluation of ``Trainer.train``.

    At each evaluation during ``train()`` it steps a :class:`PostHocReporter` with
    ``report=False`` (SWA update, evaluation of the live and SWA model, TS, store write) and
    merges the result into the evaluation's metrics. In ``Trainer.hyperparameter_search(
    backend="ray")`` HF's own report then carries them, once per evaluation. The reporter's
    ``epoch`` (evaluations so far: the store's epoch, which ``PostHocASHA`` and the driver's
    ensembles use) replaces HF's fractional ``epoch``, which is kept as ``trainer_epoch``.
    With several eval datasets the reporter steps at an evaluation's first ``on_evaluate``
    (``val=None``: on the first dataset) and its metrics go into every dataset's.

    Refused, each with its reason: ``eval_strategy="no"`` (no evaluation, nothing to report),
    ``eval_on_start`` (SWA would average the untrained weights, and that result, reported to
    Tune, could not hold the post-hoc keys), resuming from a checkpoint (the SWA average is not
    in Hugging Face checkpoints) and more than one process (every rank would write the epoch).

    Args:
        config: the trial's config (stored with its group key and seed). None: the trial's
            hyperparameters from ``hyperparameter_search`` (``TrainerState.trial_params``; with
            the Ray backend, the Tune config).
        val: None for the trainer's eval dataloader; a loader of dict batches (e.g.
            ``DataLoader(dataset, batch_size=64, collate_fn=collator)``, not shuffled); or a form
            ``PostHocReporter`` takes as it is: ``(x, y)`` tensors or ``(predict, labels)``.
            From dict batches the label column is ``args.label_names`` (one name; default
            ``"labels"``), one integer label per row, and rows labelled -100 are dropped.
        test: the same forms but None, which means no test split.
        options: keyword arguments of :class:`PostHocReporter` (``store``, ``seed_key``,
            ``swa_start_epoch``, ``swa_trainable_only``, ``bn_loader``, ``eval_batch_size``,
            ``trial_id``, ``store_dtype``, ``transforms``); unknown names are refused here.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        val: Any = None,
        test: Any = None,
        **options: Any,
    ) -> None:
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping or None, got {type(config).__name__}")
        self.config = config
        self._val = val
        self._test = test
        self._reporter_kwargs = reporter_options(options, "PostHocTrainerCallback")
        self._reporter: PostHocReporter | None = None
        self._trial_config: Mapping[str, Any] | None = None
        self._eval_loader: Iterable[Any] | None = None
        self._stepped_at: int | None = None  # the global step of the last reporter step
        self.metrics: dict[str, float] = {}
        """The last evaluation's post-hoc metrics, as merged."""

    @property
    def reporter(self) -> PostHocReporter | None:
        """The reporter of the current ``train()`` (its ``swa.model`` is the SWA model), built
        at the first evaluation; None before."""
        return self._reporter

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.world_size > 1:
            raise RuntimeError(
                f"PostHocTrainerCallback runs in a single process, but this run has "
                f"world_size={args.world_size}: every rank would evaluate and write the same "
                f"epoch. Train each Tune trial in one process"
            )
        if args.eval_strategy == IntervalStrategy.NO:
            raise ValueError(
                "PostHocTrainerCallback computes the post-hoc metrics at each evaluation, but "
                "eval_strategy='no': set TrainingArguments(eval_strategy='epoch')"
            )
        if args.eval_on_start:
            raise ValueError(
                "eval_on_start=True evaluates the untrained weights: SWA would average them in, "
                "and that result, reported to Tune, could not hold the post-hoc keys; drop it"
            )
        if state.global_step > 0:
            raise RuntimeError(
                f"train() resumes from a checkpoint at step {state.global_step}, but the SWA "
                f"average and temperatures of the steps before are not in Hugging Face "
                f"checkpoints: train from scratch"
            )
        config = self.config if self.config is not None else state.trial_params
        if config is None:
            raise ValueError(
                "PostHocTrainerCallback needs the trial's config: pass config= (in a Tune "
                "function, its config), or run Trainer.hyperparameter_search, which provides it"
            )
        self._trial_config = config
        self._reporter = None
        self._stepped_at = None
        self.metrics = {}

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._trial_config is None or metrics is None:  # evaluate() outside train()
            return
        if state.global_step != self._stepped_at:
            self._eval_loader = kwargs.get("eval_dataloader")
            reporter = self._reporter or self._build(args, kwargs["model"])
            self.metrics = {**reporter.step(), "trainer_epoch": float(state.epoch or 0.0)}
            self._stepped_at = state.global_step
        metrics.update(self.metrics)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._trial_config = None  # later evaluate() calls are left as they are

    def _build(self, args: TrainingArguments, model: torch.nn.Module) -> PostHocReporter:
        names = args.label_names or ["labels"]
        if len(names) != 1:
            raise ValueError(
                f"PostHocTrainerCallback reads one label per row, but label_names={names}"
            )
        assert self._trial_config is not None
        self._reporter = PostHocReporter(
            model,
            self._trial_config,
            val=self._split("val", self._val, names[0]),
            test=None if self._test is None else self._split("test", self._test, names[0]),
            report=False,
            **self._reporter_kwargs,
        )
        return self._reporter

    def _split(self, split: str, spec: Any, label_name: str) -> Any:
        """The reporter's form of a split: loaders of dict batches (None: the trainer's eval
        dataloader of the current evaluation) become ``(predict, labels)``; pairs, and what
        the reporter refuses, go as they are."""
        if spec is None:
            source = _DictSplit(split, self._trainer_eval_loader, label_name)
        elif isinstance(spec, (tuple, list, str, bytes, Mapping)) or not isinstance(spec, Iterable):
            return spec
        else:
            source = _DictSplit(split, lambda: spec, label_name)
        return source.predict, source.labels

    def _trainer_eval_loader(self) -> Iterable[Any]:
        if self._eval_loader is None:
            raise ValueError(
                "PostHocTrainerCallback(val=None) evaluates on the trainer's eval dataloader, "
                "but the evaluation passed none: pass val= explicitly"
            )
        return self._eval_loader


def _objective_value(metric: str, metrics: Mapping[str, float]) -> float:
    if metric not in metrics:
        raise KeyError(
            f"no {metric!r} in the evaluation metrics: add PostHocTrainerCallback to the "
            f"trainer's callbacks"
        )
    return float(metrics[metric])


def posthoc_objective(metric: str = "val/swa+ts/nll") -> Callable[[Mapping[str, float]], float]:
    """A ``compute_objective`` for ``Trainer.hyperparameter_search``: the evaluation's value of a
    per-trial post-hoc key.

    Group keys (``ens``) are refused: a trial's own result holds them as NaN (the driver
    computes them), and HF picks its ``BestRun`` by this objective. Prune on a group key with
    ``PostHocASHA`` and rank groups with ``posthoc_tune.leaderboard`` instead.
    """
    _, transform, _ = parse_metric_key(metric)
    if transform.ens:
        raise ValueError(
            f"{metric!r} is a group key, NaN in a trial's own metrics (the driver computes "
            f"ensembles): use a per-trial key such as 'val/swa+ts/nll' as the objective, and "
            f"PostHocASHA or posthoc_tune.leaderboard for group keys"
        )
    return functools.partial(_objective_value, metric)


__all__ = ["IGNORE_INDEX", "PostHocTrainerCallback", "posthoc_objective"]
