"""The ``posthoc-tune`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from posthoc_tune import __version__
from posthoc_tune.datasets import DATASETS
from posthoc_tune.plots import PLOT_TRANSFORMS
from posthoc_tune.selection import (
    FORMATS,
    TABLE_TRANSFORMS,
    leaderboard,
    selection_table,
    write_frame,
)
from posthoc_tune.store import StoreError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posthoc-tune",
        description="Post-hoc selection (TS, SWA, seed ensembles) for Ray Tune.",
    )
    parser.add_argument("--version", action="version", version=f"posthoc-tune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run a small offline Tune search on noisy-label data",
        description="Run a real Ray Tune search (grid of learning rates x seeds) with the "
        "PostHocReporter on offline noisy-label data, and compare naive with post-hoc epoch "
        "selection per trial.",
    )
    demo.add_argument("--dataset", choices=DATASETS, default="mnist1d")
    demo.add_argument("--noise", type=float, default=0.4, help="symmetric label-noise rate")
    demo.add_argument("--samples", type=int, default=6000, help="MNIST-1D samples to generate")
    demo.add_argument("--epochs", type=int, default=20)
    demo.add_argument("--seeds", type=int, default=2, help="seeds per configuration")
    demo.add_argument("--storage", default="demo_output", help="Tune storage_path")
    demo.add_argument("--name", default="demo", help="experiment name")

    table = commands.add_parser(
        "table",
        help="naive vs post-hoc selection for every transform, from a stored experiment",
        description="Compare naive selection (epochs chosen by the base model's val metric) "
        "with post-hoc selection (by the transformed model's val metric) for each transform, "
        "computed from the experiment's prediction store alone (no Ray needed).",
    )
    table.add_argument("experiment", help="experiment folder or URI (Tune's storage_path/name)")
    table.add_argument("--over", choices=("epochs", "configs+epochs"), default="epochs")
    table.add_argument(
        "--select-by",
        choices=("same", "nll"),
        default="same",
        help="same: loss columns selected by val nll, error columns by val error (the "
        "paper); nll: both by val nll",
    )
    table.add_argument("--transforms", nargs="+", default=list(TABLE_TRANSFORMS))
    _output_options(table)

    board = commands.add_parser(
        "leaderboard",
        help="configurations ranked by a post-hoc objective, naive rank beside",
        description="Rank the configurations of a stored experiment by a post-hoc metric key "
        "at their best common epoch, with the rank naive selection would give.",
    )
    board.add_argument("experiment", help="experiment folder or URI (Tune's storage_path/name)")
    board.add_argument("--metric", default="val/swa+ens+ts/nll", help="post-hoc key to rank by")
    board.add_argument("--mode", choices=("min", "max"), default="min")
    _output_options(board)

    plot = commands.add_parser(
        "plot",
        help="curves per configuration and a leaderboard chart (PNG and SVG)",
        description="For each configuration, plot val and test curves over epochs for the "
        "base model and each transform, mark the naive and post-hoc epochs and shade the "
        "reversal region; also write a leaderboard chart.",
    )
    plot.add_argument("experiment", help="experiment folder or URI (Tune's storage_path/name)")
    plot.add_argument("--out", required=True, help="folder for the figures")
    plot.add_argument("--transforms", nargs="+", default=list(PLOT_TRANSFORMS))
    plot.add_argument("--metric", choices=("nll", "error"), default="nll")
    plot.add_argument("--formats", nargs="+", default=["png", "svg"])
    plot.add_argument("--ensemble", choices=("logits", "probs"), default="logits")
    return parser


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ensemble", choices=("logits", "probs"), default="logits")
    parser.add_argument("--format", choices=FORMATS, default="md", help="output format")
    parser.add_argument("--out", help="write to this file instead of standard output")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line message for bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (StoreError, ValueError, KeyError, TypeError) as err:
        parser.exit(2, f"posthoc-tune {args.command}: error: {err}\n")


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "format", None) == "parquet" and args.out is None:  # before a long scan
        raise ValueError("--format parquet needs --out FILE (Parquet is binary)")
    if args.command == "table":
        frame = selection_table(
            args.experiment,
            transforms=args.transforms,
            over=args.over,
            select_by=args.select_by,
            ensemble=args.ensemble,
        )
        write_frame(frame, args.format, args.out)
    elif args.command == "leaderboard":
        frame = leaderboard(args.experiment, args.metric, args.mode, ensemble=args.ensemble)
        write_frame(frame.set_index("rank"), args.format, args.out)
    elif args.command == "plot":
        from posthoc_tune.plots import plot_experiment

        files = plot_experiment(
            args.experiment,
            args.out,
            transforms=args.transforms,
            metric=args.metric,
            formats=args.formats,
            ensemble=args.ensemble,
        )
        print(f"wrote {len(files)} files to {args.out}")
    elif args.command == "demo":
        from posthoc_tune import demo

        demo.run(
            dataset=args.dataset,
            noise=args.noise,
            n_samples=args.samples,
            epochs=args.epochs,
            seeds=args.seeds,
            storage=args.storage,
            name=args.name,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
