"""PostHocReporter: per-epoch naive and post-hoc metrics from inside a Ray Tune trial.

One ``step()`` per epoch folds the weights into the SWA average, evaluates the live and the SWA
model on val and test, fits temperature scaling on val, reports
``{split}/{transform}/{metric}`` for every transform (ensemble keys are NaN here; the driver
fills them in), stores all logits in the experiment's prediction store, and calls
``tune.report``. The store write happens before ``tune.report`` because report is the barrier
after which the driver may read the epoch.

In a multi-worker trial (Ray Train workers, see :mod:`posthoc_tune.ray_train`) rank 0 alone
evaluates, writes and reports metrics, unless an evaluation loader is sharded with a
``DistributedSampler``: then every rank evaluates its shard and rank 0 gathers the logits in
the split's row order. Every rank calls ``step()`` once per epoch (Ray Train's report is a
barrier).
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from posthoc_tune import tokens as tok
from posthoc_tune._arrays import ArrayLike, integer_tensor, output_logits, to_numpy
from posthoc_tune._session import TRIAL_KEY, current_session
from posthoc_tune.groups import check_seed_key
from posthoc_tune.keys import (
    TOKEN_TRANSFORMS,
    TRIAL_TRANSFORMS,
    VARIANTS,
    metric_keys,
    parse_transform,
    token_metric_keys,
    token_temperature_key,
)
from posthoc_tune.scoring import score, window
from posthoc_tune.store import Dtype, PartKey, PredictionStore, VariantParts
from posthoc_tune.transforms import TemperatureScaler, WeightAverager, evaluating, unwrap_model

STATE_FILE = "posthoc_state.pt"


class Stateful(Protocol):
    """Anything checkpointable the torch way: optimizers, LR schedulers, GradScalers."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


Predict = Callable[[torch.nn.Module, str], ArrayLike]


class _EvalSplit:
    """One evaluation split: ``(x, y)`` tensors, a loader of ``(x, y)``, or ``(predict, y)``."""

    def __init__(self, split: str, spec: Any, batch_size: int) -> None:
        self.split = split
        self.batch_size = batch_size
        self._labels: np.ndarray | None = None
        self._predict: Predict | None = None
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._loader: Iterable[Any] | None = None
        if isinstance(spec, (tuple, list)) and len(spec) == 2 and callable(spec[0]):
            self._predict = spec[0]
            self._labels = self._checked_labels(spec[1])
        elif isinstance(spec, (tuple, list)) and len(spec) == 2:
            x, y = torch.as_tensor(spec[0]), self._checked_labels(spec[1])
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{split} inputs have {x.shape[0]} rows but {split} labels have {y.shape[0]}"
                )
            self._tensors = (x, torch.from_numpy(y))
            self._labels = y
        elif isinstance(spec, Iterable) and not isinstance(spec, (str, bytes, Mapping)):
            self._loader = spec
            self._check_sampler()
        else:
            raise TypeError(
                f"{split} must be an (x, y) tuple of tensors, a DataLoader yielding (x, y), or a "
                f"(predict, labels) pair with predict(model, split) -> logits; "
                f"got {type(spec).__name__}"
            )
        if self._labels is not None and (self._labels.ndim != 1 or self._labels.size == 0):
            raise ValueError(
                f"{split} labels must be a non-empty 1-D array, got shape {self._labels.shape}"
            )

    def _checked_labels(self, labels: Any) -> np.ndarray:
        """Integer class labels as int64; a float, bool or object dtype is refused (a cast
        would silently turn 9.5 into 9 and every metric would be wrong)."""
        if not isinstance(labels, (np.ndarray, torch.Tensor)):
            labels = np.asarray(labels)
        return integer_tensor(labels, f"{self.split} labels").numpy().astype(np.int64)

    @property
    def sharded(self) -> bool:
        """Whether each rank holds a shard of the split (a loader over a
        ``DistributedSampler`` across several replicas): every rank must then evaluate."""
        sampler = getattr(self._loader, "sampler", None)
        distributed = isinstance(sampler, torch.utils.data.DistributedSampler)
        return distributed and int(getattr(sampler, "num_replicas", 1)) > 1

    def _check_sampler(self) -> None:
        """A sharded split is gathered back in row order: refuse samplers that reorder or
        drop rows, naming the attribute."""
        sampler = getattr(self._loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            if sampler.shuffle:
                raise ValueError(
                    f"the {self.split} loader's DistributedSampler shuffles: evaluation loaders "
                    f"must not shuffle (DistributedSampler(..., shuffle=False))"
                )
            if sampler.drop_last:
                raise ValueError(
                    f"the {self.split} loader's DistributedSampler drops the last rows "
                    f"(drop_last=True): every {self.split} row must be evaluated"
                )

    def inputs(self) -> Iterable[Any] | None:
        """Model inputs for re-estimating BatchNorm statistics (None for ``predict`` splits)."""
        if self._tensors is not None:
            x = self._tensors[0]
            return [x[i : i + self.batch_size] for i in range(0, x.shape[0], self.batch_size)]
        return self._loader

    def predict(self, model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray] | None:
        """Logits (float32, N x C) and labels (int64) for this split; for a sharded split,
        gathered on rank 0 in the split's row order (None on the other ranks)."""
        if self._predict is not None:
            logits = to_numpy(self._predict(model, self.split))
            assert self._labels is not None
            return logits, self._labels
        device = next(iter(model.parameters()), torch.empty(0)).device
        outs, ys = [], []
        for x, y in self._batches():
            output = output_logits(
                model(x.to(device)),
                f"on the {self.split} inputs",
                f"; pass {self.split}=(predict, labels) with "
                f"predict(model, {self.split!r}) -> logits",
            )
            outs.append(output.detach().to("cpu", torch.float32))
            ys.append(self._checked_labels(y))
        logits = torch.cat(outs).numpy()
        labels = np.concatenate(ys)
        if self.sharded:
            gathered = _gather_rows(list(iter(self._loader.sampler)), logits, labels)  # type: ignore[union-attr]
            if gathered is None:
                return None
            logits, labels = gathered
        if self._labels is None:
            self._labels = labels
        elif not np.array_equal(self._labels, labels):
            raise ValueError(
                f"the {self.split} loader yielded different labels than in the first epoch; "
                f"evaluation loaders must not shuffle (use shuffle=False)"
            )
        return logits, labels

    def _batches(self) -> Iterator[tuple[torch.Tensor, Any]]:
        if self._tensors is not None:
            x, y = self._tensors
            for i in range(0, x.shape[0], self.batch_size):
                yield x[i : i + self.batch_size], y[i : i + self.batch_size]
            return
        assert self._loader is not None
        for batch in self._loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(
                    f"the {self.split} loader must yield (inputs, labels) batches, "
                    f"got {type(batch).__name__}"
                )
            yield batch[0], batch[1]


def _gather_rows(
    indices: list[int], logits: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Gather every rank's shard on rank 0 and put its rows back in the split's order: a
    ``DistributedSampler`` deals rows out round-robin and pads the last round with rows from
    the start, which appear twice and are kept once. None on the other ranks."""
    dist = torch.distributed
    shard = (np.asarray(indices, dtype=np.int64), logits, labels)
    shards: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(shard, shards, dst=0)
    if shards is None:
        return None
    index = np.concatenate([s[0] for s in shards])
    if len(index) != sum(len(s[1]) for s in shards):
        raise ValueError("a sharded loader yielded a different number of rows than its sampler")
    rows, first = np.unique(index, return_index=True)  # sorted rows, first occurrence of each
    if not np.array_equal(rows, np.arange(len(rows))):
        raise ValueError(f"the sharded split's sampler skipped rows: {len(rows)} rows seen")
    logits = np.concatenate([s[1] for s in shards])[first]
    return logits, np.concatenate([s[2] for s in shards])[first]


class PostHocReporter:
    """Report naive and post-hoc metrics for every epoch of a Tune trial, and store the logits.

    Args:
        model: the model being trained (evaluated on its own device).
        config: the trial's config; stored as metadata with its group key and seed.
        val: ``(x, y)`` tensors, a DataLoader of ``(x, y)`` (no shuffling), or a
            ``(predict, labels)`` pair where ``predict(model, "val")`` returns logits (e.g.
            :class:`posthoc_tune.llm.MultipleChoice`'s ``split``). Optional when ``tokens``
            are given.
        test: same forms as ``val``; optional (test keys are then NaN).
        tokens: a language model's token-level splits: ``{"val": loader, "test": loader}``
            (test optional), each loader yielding causal-LM batches (mappings with
            ``input_ids``, ``labels`` with -100 at positions not scored, optionally
            ``attention_mask``; see :class:`posthoc_tune.tokens.TokenSplit`). Every epoch the
            reporter then also reports ``{split}/{transform}/{token_nll, perplexity,
            token_error, token_ece, token_brier}`` for base, ts, swa and swa+ts, and
            ``token_temperature/{base,swa}``, computed batch by batch on the model's device,
            and stores 60 numbers per token instead of the logits (rank 0 evaluates them).
        store: a :class:`PredictionStore`, an experiment path/URI (the logits go to its
            ``posthoc/`` folder, created on the first write), or None: inside Tune the
            experiment's own storage (``storage_path``/``storage_filesystem``), outside Tune
            no store.
        seed_key: config key, or "a/b" path (``"train_loop_config/seed"``), holding the seed;
            trials differing only in it form a group.
        swa_start_epoch: first epoch in the SWA average (1 = whole trajectory, as the paper).
            Before it the ``swa*`` metrics are NaN and no SWA logits are stored.
        swa_trainable_only: average only the parameters that require gradients when the
            reporter is built, sharing the frozen ones with the model (a LoRA model's SWA then
            costs its adapters' bytes, not a second model); False averages every parameter,
            for training that unfreezes parameters later.
        bn_loader: inputs for re-estimating the SWA model's BatchNorm statistics: ``"val"``
            (the val inputs, as the paper), another iterable, or None to skip.
        checkpoint: objects to checkpoint with the model, e.g. ``{"optimizer": opt}``. When
            given (even empty), every ``checkpoint_every`` epochs the reporter passes a
            checkpoint of model, SWA state and these objects to ``tune.report``, and on a retry
            it restores them from ``tune.get_checkpoint()`` at construction, so the loop
            continues from ``reporter.epoch`` with an exact SWA average.
        checkpoint_every: epochs between checkpoints.
        eval_batch_size: batch size for ``(x, y)`` tensor splits.
        trial_id: trial id outside Tune (inside Tune, Tune's trial id is used).
        store_dtype: ``"float32"`` or ``"float16"`` for the store opened by the reporter.
        report: inside Tune, pass each step's metrics to ``tune.report``. False: compute,
            store and return them only, for trainers that report themselves (Lightning, the
            Hugging Face Trainer) and users who report their own way; the checkpoints are
            then theirs too (``checkpoint=`` is refused; save :meth:`state_dict`).
        transforms: the trial-scope transforms to compute (default: all of
            ``posthoc_tune.TRIAL_TRANSFORMS``); the others' keys are reported as NaN. The
            checkpoint ensembles (``ckpt*``) keep their window's past logits in memory (and in
            the checkpoint): drop them to save that memory.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: Mapping[str, Any],
        *,
        val: Any = None,
        test: Any = None,
        tokens: Mapping[str, Iterable[Any]] | None = None,
        store: PredictionStore | str | os.PathLike[str] | None = None,
        seed_key: str = "seed",
        swa_start_epoch: int = 1,
        swa_trainable_only: bool = True,
        bn_loader: Iterable[Any] | str | None = "val",
        checkpoint: Mapping[str, Stateful] | None = None,
        checkpoint_every: int = 1,
        eval_batch_size: int = 1024,
        trial_id: str = "local",
        store_dtype: Dtype = "float32",
        report: bool = True,
        transforms: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(report, bool):
            raise TypeError(f"report must be a bool, got {report!r}")
        check_seed_key(seed_key)
        if not report and checkpoint is not None:
            raise ValueError(
                "checkpoint= passes checkpoints to tune.report, which report=False never "
                "calls: checkpoint PostHocReporter.state_dict() with your trainer's checkpoints"
            )
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        for name, value in (
            ("checkpoint_every", checkpoint_every),
            ("eval_batch_size", eval_batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.model = unwrap_model(model)  # DDP's forward is a collective; SWA needs no prefix
        self.splits: dict[str, _EvalSplit] = {}
        if val is not None:
            self.splits["val"] = _EvalSplit("val", val, eval_batch_size)
        if test is not None:
            if val is None:
                raise ValueError("test= needs val= too: temperatures are fit on val")
            self.splits["test"] = _EvalSplit("test", test, eval_batch_size)
        self.token_splits = _token_splits(tokens)
        if not self.splits and not self.token_splits:
            raise ValueError(
                "nothing to evaluate: pass val= (class logits) and/or tokens= (a language "
                "model's token-level splits)"
            )
        self.swa = WeightAverager(
            self.model, start_epoch=swa_start_epoch, trainable_only=swa_trainable_only
        )
        self._scalers = {v: TemperatureScaler(warm_start=True) for v in VARIANTS}
        self.transforms = _reported(transforms)
        self._depth = max(parse_transform(t).window for t in self.transforms)
        # The last epochs' logits by variant, as long as a checkpoint window needs them.
        self._history: dict[int, dict[str, VariantParts]] = {}
        self._checkpoint = dict(checkpoint) if checkpoint is not None else None
        self.checkpoint_every = checkpoint_every
        self.report = report
        self.epoch = 0
        self._labels_written = False

        self.session = current_session(config, store, trial_id, store_dtype)
        self.in_tune = self.session.kind != "local"
        self.trial_id = self.session.trial_id
        self.store: PredictionStore | None = self.session.store
        # Every rank evaluates when a split is sharded; otherwise rank 0 alone.
        self._evaluates = self.session.is_writer or any(s.sharded for s in self.splits.values())
        self._bn_inputs = self._resolve_bn_loader(bn_loader)
        if self.store is not None and self.session.is_writer:
            if self.in_tune:
                self.store.discard_partial_writes(self.trial_id)  # of a killed attempt
                self.store.clear_processed_epoch(self.trial_id)  # of an earlier attempt
            stored = {k: v for k, v in config.items() if k != TRIAL_KEY}
            self.store.write_metadata(self.trial_id, stored, seed_key)
        if self._checkpoint is not None:
            with self.session.restored() as directory:
                if directory is not None:
                    self.load_state_dict(self._load(os.path.join(directory, STATE_FILE)))

    def _resolve_bn_loader(self, bn_loader: Iterable[Any] | str | None) -> Iterable[Any] | None:
        if bn_loader is None or not self.swa.has_batchnorm:
            return None
        if bn_loader == "val":
            if "val" not in self.splits:
                raise ValueError(
                    "the model has BatchNorm layers and there is no val= split whose inputs "
                    "could re-estimate SWA's BatchNorm statistics: pass bn_loader= an iterable "
                    "of input batches, or bn_loader=None to skip re-estimation"
                )
            if self.splits["val"].sharded:
                raise ValueError(
                    "the model has BatchNorm layers and the val loader is sharded across ranks, "
                    "so SWA's BatchNorm statistics would differ between ranks: pass bn_loader= "
                    "an unsharded iterable of input batches (the same on every rank), or "
                    "bn_loader=None, or an unsharded val loader (rank 0 then evaluates alone)"
                )
            inputs = self.splits["val"].inputs()
            if inputs is None:
                raise ValueError(
                    "the model has BatchNorm layers and val is a (predict, labels) pair, so SWA "
                    "has no val inputs to re-estimate BatchNorm statistics on: pass bn_loader="
                    "an iterable of input batches, or bn_loader=None to skip re-estimation"
                )
            return inputs
        if isinstance(bn_loader, str) or not isinstance(bn_loader, Iterable):
            raise TypeError(
                f"bn_loader must be 'val', an iterable of input batches, or None; got {bn_loader!r}"
            )
        return bn_loader

    # -- the per-epoch step -------------------------------------------------------------------

    def step(self, metrics: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Finish one epoch: SWA update, evaluation, TS, store write, ``tune.report`` (unless
        ``report=False``).

        ``metrics`` are extra values to report (e.g. the training loss). Returns everything
        reported, as floats; ``{}`` on the ranks other than 0 of a multi-worker trial (every
        rank must call it, once per epoch).
        """
        extra = self._extra_metrics(metrics)
        self.epoch += 1
        result: dict[str, float] = {}
        if self._evaluates:
            logits, labels, records = self._evaluate()
            if self.session.is_writer:
                result = {"epoch": self.epoch}
                if self.splits:
                    result.update(self._metrics(logits, labels))
                if self.token_splits:
                    result.update(self._token_metrics(records))
                result.update(extra)
                if self.store is not None:  # before reporting: the driver may then read it
                    with self.session.writing(self.epoch):
                        self._write(logits, labels, records, result)
        if self.in_tune and self.report:
            self._report(result)
        return result

    def _evaluate(
        self,
    ) -> tuple[dict[PartKey, np.ndarray], dict[str, np.ndarray], dict[PartKey, np.ndarray]]:
        """SWA update, then every split's logits of the base and SWA model (all of them on
        rank 0, the sharded splits' gathered there; other ranks keep nothing) and, on rank 0,
        their token records."""
        self.swa.update(self.model)
        variants = {"base": self.model}
        if self.swa.active:
            if self._bn_inputs is not None:
                self.swa.update_bn(self._bn_inputs)
            variants["swa"] = self.swa.model
        logits: dict[PartKey, np.ndarray] = {}
        labels: dict[str, np.ndarray] = {}
        records: dict[PartKey, np.ndarray] = {}
        for variant, module in variants.items():
            with evaluating(module):
                for split, source in self.splits.items():
                    if source.sharded or self.session.is_writer:
                        predicted = source.predict(module)
                        if predicted is not None:
                            logits[(split, variant)], labels[split] = predicted
                if self.session.is_writer:
                    for split, tokens in self.token_splits.items():
                        records[(split, variant)] = tokens.records(module)
        return logits, labels, records

    def _metrics(
        self, logits: Mapping[tuple[str, str], np.ndarray], labels: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        """Fit each variant's temperature (warm-started from the last epoch), remember the
        epoch's logits for checkpoint windows, and score the reported transforms."""
        result = dict.fromkeys(metric_keys(), math.nan)
        parts = {}
        for variant in VARIANTS:
            result[f"temperature/{variant}"] = math.nan
            if ("val", variant) not in logits:
                continue
            scaler = self._scalers[variant].fit(logits[("val", variant)], labels["val"])
            result[f"temperature/{variant}"] = scaler.temperature_
            by_split = {split: logits[(split, variant)] for split in self.splits}
            parts[variant] = VariantParts(by_split, scaler.temperature_)
        self._history = {e: h for e, h in self._history.items() if e > self.epoch - self._depth}
        self._history[self.epoch] = parts
        if len(self._history) == 1 and self._depth > 1:
            _warn_window_memory(self._depth * sum(z.nbytes for z in logits.values()))
        for transform in self.transforms:
            members = window(transform, self.epoch, self._history)
            if members is not None:
                result.update(score(transform, members, labels))
        return result

    def _token_metrics(self, records: Mapping[PartKey, np.ndarray]) -> dict[str, float]:
        """Each variant's token temperature (fit on its val records) and the token metrics
        of the reported single-model transforms."""
        result = dict.fromkeys(token_metric_keys(), math.nan)
        parts = {}
        for variant in VARIANTS:
            result[token_temperature_key(variant)] = math.nan
            if ("val", variant) in records:
                by_split = {s: records[(s, variant)] for s in self.token_splits}
                temperature = tok.fit_temperature(by_split["val"])
                result[token_temperature_key(variant)] = temperature
                parts[variant] = tok.TokenParts(by_split, temperature)
        for transform in self.transforms:
            variant = parse_transform(transform).variant
            if transform in TOKEN_TRANSFORMS and variant in parts:
                result.update(tok.score(transform, parts[variant]))
        return result

    def _write(
        self,
        logits: Mapping[PartKey, np.ndarray],
        labels: Mapping[str, np.ndarray],
        records: Mapping[PartKey, np.ndarray],
        result: Mapping[str, float],
    ) -> None:
        assert self.store is not None
        if not self._labels_written:
            for split, y in labels.items():
                self.store.write_labels(split, y)
            self._labels_written = True
        if logits:
            variants = {v for _, v in logits}
            temperatures = {v: result[f"temperature/{v}"] for v in variants}
            self.store.write_epoch(self.trial_id, self.epoch, logits, temperatures)
        if records:
            variants = {v for _, v in records}
            vocab = self.token_splits["val"].vocab_size
            assert vocab is not None  # set by the evaluation
            self.store.write_tokens(
                self.trial_id,
                self.epoch,
                records,
                {v: result[token_temperature_key(v)] for v in variants},
                vocab_size=vocab,
            )

    def _extra_metrics(self, metrics: Mapping[str, Any] | None) -> dict[str, float]:
        if metrics is None:
            return {}
        reserved = {"epoch", *metric_keys(), *token_metric_keys()}
        reserved |= {f"temperature/{v}" for v in VARIANTS} | set(
            map(token_temperature_key, VARIANTS)
        )
        clash = sorted(set(metrics) & reserved)
        if clash:
            raise ValueError(f"extra metrics {clash} clash with keys the reporter sets")
        out = {}
        for key, value in metrics.items():
            try:
                out[str(key)] = float(value.item() if isinstance(value, torch.Tensor) else value)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"extra metric {key!r} must be a scalar, got {value!r}") from None
        return out

    def _report(self, result: dict[str, float]) -> None:
        """Report through the session; rank 0 passes the checkpoint when one is due."""
        due = self._checkpoint is not None and self.epoch % self.checkpoint_every == 0
        if not (due and self.session.is_writer):
            self.session.report(result)
            return
        with tempfile.TemporaryDirectory() as directory:
            torch.save(self.state_dict(), os.path.join(directory, STATE_FILE))
            self.session.report(result, checkpoint_dir=directory)

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Model (its trained state: a LoRA model's adapters, not its frozen base), SWA average,
        epoch, warm-start temperatures, the checkpoint windows' logits and the ``checkpoint``
        objects."""
        return {
            "epoch": self.epoch,
            "model": self.swa.trained_state(self.model),
            "swa": self.swa.state_dict(),
            "temperatures": {v: getattr(s, "temperature_", None) for v, s in self._scalers.items()},
            "window": {
                epoch: {
                    v: {"logits": _tensors(p.logits), "temperature": p.temperature}
                    for v, p in parts.items()
                }
                for epoch, parts in self._history.items()
            },
            "objects": {k: obj.state_dict() for k, obj in (self._checkpoint or {}).items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next :meth:`step` is epoch ``state['epoch'] + 1``."""
        names = set(self._checkpoint or {})
        if set(state["objects"]) != names:
            raise ValueError(
                f"checkpoint holds objects {sorted(state['objects'])}, the reporter was given "
                f"{sorted(names)}"
            )
        self.swa.load_trained_state(self.model, state["model"])
        self.swa.load_state_dict(state["swa"])
        for name, obj in (self._checkpoint or {}).items():
            obj.load_state_dict(state["objects"][name])
        for variant, temperature in state["temperatures"].items():
            if temperature is not None:
                self._scalers[variant] = TemperatureScaler.from_temperature(
                    temperature, warm_start=True
                )
        self._history = {
            int(epoch): {
                v: VariantParts(
                    {k: z.cpu().numpy() for k, z in p["logits"].items()}, p["temperature"]
                )
                for v, p in parts.items()
            }
            for epoch, parts in state.get("window", {}).items()
        }
        self.epoch = int(state["epoch"])
        self._labels_written = False

    def _load(self, path: str) -> dict[str, Any]:
        device = next(iter(self.model.parameters()), torch.empty(0)).device
        state: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
        return state


_MANAGED = ("model", "config", "val", "test", "checkpoint", "checkpoint_every", "report")


def reporter_options(options: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """The :class:`PostHocReporter` keyword arguments a trainer integration passes through
    (``store``, ``seed_key``, ``swa_start_epoch``, ``swa_trainable_only``, ``bn_loader``,
    ``eval_batch_size``, ``trial_id``, ``store_dtype``, ``transforms``): checked when the
    integration is built, not at the trainer's first epoch."""
    allowed = [n for n in inspect.signature(PostHocReporter).parameters if n not in _MANAGED]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{owner} got unknown reporter options {unknown}; it takes {allowed}")
    return dict(options)


def _token_splits(tokens: Mapping[str, Iterable[Any]] | None) -> dict[str, tok.TokenSplit]:
    """The validated ``tokens=`` splits (val required, test optional)."""
    if tokens is None:
        return {}
    if not isinstance(tokens, Mapping) or "val" not in tokens:
        raise ValueError(
            f"tokens must be a mapping with a 'val' loader (and optionally 'test'), got {tokens!r}"
        )
    return {split: tok.TokenSplit(split, loader) for split, loader in tokens.items()}


def _reported(transforms: Sequence[str] | None) -> tuple[str, ...]:
    """The trial-scope transforms a reporter computes, validated."""
    if transforms is None:
        return TRIAL_TRANSFORMS
    if isinstance(transforms, str) or not transforms:
        raise ValueError(f"transforms must be a non-empty list of names, got {transforms!r}")
    names = tuple(dict.fromkeys(parse_transform(t).name for t in transforms))
    group = [t for t in names if parse_transform(t).ens]
    if group:
        raise ValueError(
            f"transforms {group} combine a seed group, which only the driver sees: a trial "
            f"reports its own, any of {list(TRIAL_TRANSFORMS)}"
        )
    return names


WINDOW_WARNING_BYTES = 1 << 30


def _warn_window_memory(nbytes: int) -> None:
    """Say what the checkpoint ensembles' window costs when it is large (many classes)."""
    if nbytes > WINDOW_WARNING_BYTES:
        warnings.warn(
            f"the checkpoint ensembles (ckpt*) keep {nbytes / 2**30:.1f} GiB of past logits in "
            f"memory and in each checkpoint; pass transforms=['base', 'ts', 'swa', 'swa+ts'] "
            f"to leave them out (a stored experiment can score them later from its logits)",
            UserWarning,
            stacklevel=4,
        )


def _tensors(logits: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {split: torch.from_numpy(z) for split, z in logits.items()}


__all__ = ["PostHocReporter"]
