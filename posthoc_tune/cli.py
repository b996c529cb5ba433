"""The ``posthoc-tune`` command.

The parser is built from :mod:`posthoc_tune.keys` alone; each subcommand imports what it runs
(pandas, pyarrow, Ray, PyTorch) inside its handler, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from posthoc_tune import __version__
from posthoc_tune.keys import (
    DATASETS,
    FORMATS,
    METRICS,
    PLOT_TRANSFORMS,
    TABLE_TRANSFORMS,
    TRANSFORMS,
)

EXPERIMENT_HELP = "experiment folder or URI (Tune's storage_path/name)"
ENSEMBLE_HELP = (
    "how ensemble members are combined: average their temperature-scaled logits, or their "
    "probabilities (default: %(default)s)"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posthoc-tune",
        description="Post-hoc selection (TS, SWA, seed ensembles) for Ray Tune.",
    )
    parser.add_argument("--version", action="version", version=f"posthoc-tune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run an offline Tune search on noisy-label data, selected post hoc",
        description="Run a real Ray Tune search on offline noisy-label data: PostHocSearch "
        "proposes MLP configurations (width, lr, weight decay), each trained as several seeds "
        "with the PostHocReporter; PostHocASHA prunes whole seed groups on "
        "val/swa+ens+ts/nll. Then print and write the naive vs post-hoc selection table, the "
        "leaderboard and plots.",
    )
    demo.add_argument(
        "--dataset", choices=DATASETS, default="mnist1d", help="dataset (default: %(default)s)"
    )
    demo.add_argument(
        "--noise", type=float, default=0.4, help="symmetric label-noise rate (default: %(default)s)"
    )
    demo.add_argument(
        "--samples",
        type=int,
        default=12000,
        help="MNIST-1D samples to generate (default: %(default)s)",
    )
    demo.add_argument(
        "--configs", type=int, default=8, help="configurations to try (default: %(default)s)"
    )
    demo.add_argument(
        "--seeds", type=int, default=4, help="seeds (ensemble members) each (default: %(default)s)"
    )
    demo.add_argument(
        "--epochs", type=int, default=30, help="epochs per trial at most (default: %(default)s)"
    )
    demo.add_argument(
        "--grace-period",
        type=int,
        default=4,
        help="PostHocASHA's first rung (default: %(default)s)",
    )
    demo.add_argument(
        "--cpus-per-trial",
        type=float,
        default=0.5,
        help="CPUs per trial (Tune resources; default: %(default)s)",
    )
    demo.add_argument(
        "--storage",
        default="demo_output/ray_results",
        help="Tune storage_path or URI (default: %(default)s)",
    )
    demo.add_argument(
        "--out", default="demo_output", help="folder for tables and plots (default: %(default)s)"
    )
    demo.add_argument("--name", default="demo", help="experiment name (default: %(default)s)")
    demo.add_argument("--no-plots", action="store_true", help="skip the plots")

    table = commands.add_parser(
        "table",
        help="naive vs post-hoc selection for every transform, from a stored experiment",
        description="Compare naive selection (epochs chosen by the base model's val metric) "
        "with post-hoc selection (by the transformed model's val metric) for each transform, "
        "computed from the experiment's prediction store alone (no Ray needed).",
    )
    table.add_argument("experiment", help=EXPERIMENT_HELP)
    table.add_argument(
        "--over",
        choices=("epochs", "configs+epochs"),
        default="epochs",
        help="epochs: a block per configuration; configs+epochs: choose the configuration too, "
        "naive by the base val metric, post-hoc by the transformed one (default: %(default)s)",
    )
    table.add_argument(
        "--select-by",
        choices=("same", "nll"),
        default="same",
        help="same: loss columns selected by val nll, error columns by val error (the "
        "paper); nll: both by val nll (default: %(default)s)",
    )
    _transforms_option(table, TABLE_TRANSFORMS, f"rows, any of {', '.join(TRANSFORMS)}")
    table.add_argument(
        "--greedy",
        action="store_true",
        help="add a greedy-ensemble row (needs --over configs+epochs): forward selection over "
        "every stored model, naive and post hoc",
    )
    _output_options(table)

    board = commands.add_parser(
        "leaderboard",
        help="configurations ranked by a post-hoc objective, naive rank beside",
        description="Rank the configurations of a stored experiment by a post-hoc metric key "
        "at their best common epoch, with the rank naive selection would give.",
    )
    board.add_argument("experiment", help=EXPERIMENT_HELP)
    board.add_argument(
        "--metric",
        default="val/swa+ens+ts/nll",
        help="post-hoc key split/transform/metric to rank by (default: %(default)s)",
    )
    board.add_argument(
        "--mode",
        choices=("min", "max"),
        default="min",
        help="whether lower or higher values of the metric are better (default: %(default)s)",
    )
    board.add_argument(
        "--greedy", action="store_true", help="add the greedy ensemble over every stored model"
    )
    _output_options(board)

    greedy = commands.add_parser(
        "greedy",
        help="greedy ensemble selection over every stored model (Caruana et al., 2004)",
        description="Forward selection with replacement over every stored (trial, epoch, "
        "variant) model of an experiment, on the val objective, then one temperature fit on "
        "the ensemble: naive (each trial at its base-best epoch) and post hoc (any epoch). "
        "Prints each flavour's val and test metrics and its members (trial, epoch, variant, "
        "weight, temperature, configuration), enough to rebuild it.",
    )
    greedy.add_argument("experiment", help=EXPERIMENT_HELP)
    greedy.add_argument(
        "--objective",
        choices=("nll", "error"),
        default="nll",
        help="val metric minimised (default: %(default)s)",
    )
    greedy.add_argument(
        "--size", type=int, default=20, help="picks with replacement (default: %(default)s)"
    )
    greedy.add_argument(
        "--pool", type=int, default=5, help="candidates per trial (default: %(default)s)"
    )
    greedy.add_argument(
        "--max-candidates",
        type=int,
        default=1000,
        help="candidates in all, at most (default: %(default)s)",
    )
    _format_options(greedy, "md or latex: each flavour's members and metrics")

    replay = commands.add_parser(
        "replay",
        help="compare pruning strategies on a stored full-budget experiment, no retraining",
        description="Replay a stored full-budget experiment through real schedulers (FIFO, "
        "stock ASHA on val/base/nll, PostHocASHA on the ensemble and on the SWA+TS key) on "
        "a simulated cluster, and report each strategy's selected configuration and epoch, "
        "the test loss and error of its TRANSFORM model, and the compute it spent (epochs).",
    )
    replay.add_argument("experiment", help=EXPERIMENT_HELP)
    replay.add_argument(
        "--transform",
        choices=TRANSFORMS,
        default="swa+ens+ts",
        metavar="TRANSFORM",
        help=f"the model every strategy ships, one of {', '.join(TRANSFORMS)} "
        "(default: %(default)s)",
    )
    replay.add_argument("--max-t", type=int, help="ASHA's max_t (default: the longest trial)")
    replay.add_argument(
        "--grace-period", type=int, default=1, help="ASHA's first rung, in epochs (default: 1)"
    )
    replay.add_argument(
        "--reduction-factor",
        type=float,
        default=3,
        help="ASHA's reduction factor: the top 1/factor of a rung continues (default: 3)",
    )
    replay.add_argument(
        "--concurrency", type=int, help="simulated trial slots (default: every trial at once)"
    )
    _format_options(replay, "md or latex: numbers rounded for reading")

    compact = commands.add_parser(
        "compact",
        help="delete stored predictions that no later selection can use",
        description="Shrink a finished experiment's prediction store: keep only the logits of "
        "the epochs some naive or post-hoc selection can pick, after storing every epoch's "
        "scores, so selection tables, leaderboards and plots stay the same (a replay needs "
        "the deleted logits); and drop given trials entirely (e.g. pruned ones), which "
        "removes them from every table.",
    )
    compact.add_argument("experiment", help=EXPERIMENT_HELP)
    compact.add_argument(
        "--keep",
        choices=("selectable", "all"),
        default="selectable",
        help="selectable: only the epochs some naive or post-hoc selection can pick; all: every "
        "epoch (with --drop-trials: only drop those trials) (default: %(default)s)",
    )
    compact.add_argument(
        "--drop-trials", nargs="+", default=[], metavar="TRIAL_ID", help="trial ids to delete"
    )
    _transforms_option(
        compact,
        TABLE_TRANSFORMS,
        "transforms whose selected models keep their logits (a checkpoint ensemble its whole "
        "window); every transform's scores are stored either way",
    )
    compact.add_argument("--dry-run", action="store_true", help="report, delete nothing")

    plot = commands.add_parser(
        "plot",
        help="curves per configuration and a leaderboard chart (PNG and SVG)",
        description="For each configuration, plot val and test curves over epochs for the "
        "base model and each transform, mark the naive and post-hoc epochs and shade the "
        "reversal region; also write a leaderboard chart.",
    )
    plot.add_argument("experiment", help=EXPERIMENT_HELP)
    plot.add_argument("--out", required=True, help="folder for the figures")
    _transforms_option(
        plot,
        PLOT_TRANSFORMS,
        "curves to draw beside the base model; the leaderboard chart ranks by the last",
    )
    plot.add_argument(
        "--metric",
        choices=("nll", "error"),
        default="nll",
        help="the metric on the y axis and of the leaderboard (default: %(default)s)",
    )
    plot.add_argument(
        "--formats",
        nargs="+",
        choices=("png", "svg", "pdf"),
        default=["png", "svg"],
        help="file formats, each figure in each (default: png svg)",
    )
    plot.add_argument(
        "--ensemble", choices=("logits", "probs"), default="logits", help=ENSEMBLE_HELP
    )
    return parser


def _transforms_option(
    parser: argparse.ArgumentParser, default: Sequence[str], help_text: str
) -> None:
    parser.add_argument(
        "--transforms",
        nargs="+",
        choices=TRANSFORMS,
        default=list(default),
        metavar="TRANSFORM",
        help=f"{help_text} (default: {' '.join(default)})",
    )


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ensemble", choices=("logits", "probs"), default="logits", help=ENSEMBLE_HELP
    )
    _format_options(
        parser, "md or latex: the headline columns for reading, configurations by label"
    )


def _format_options(parser: argparse.ArgumentParser, readable: str) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="md",
        help=f"{readable}; csv or parquet: every column in full (default: %(default)s)",
    )
    parser.add_argument("--out", help="write to this file instead of standard output")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line message for bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    from posthoc_tune.store import StoreError  # pyarrow: only once there is work to do

    try:
        return _run(args)
    except (StoreError, ValueError, KeyError, TypeError) as err:
        parser.exit(2, f"posthoc-tune {args.command}: error: {err}\n")


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "format", None) == "parquet" and args.out is None:  # before a long scan
        raise ValueError("--format parquet needs --out FILE (Parquet is binary)")
    if args.command == "table":
        from posthoc_tune.curves import configurations
        from posthoc_tune.display import selection_view
        from posthoc_tune.selection import open_store, selection_table, write_frame

        store = open_store(args.experiment)
        frame = selection_table(
            store,
            transforms=args.transforms,
            over=args.over,
            select_by=args.select_by,
            ensemble=args.ensemble,
            greedy=args.greedy,
        )
        view = selection_view(frame, configurations(store))
        write_frame(frame, args.format, args.out, readable=view)
    elif args.command == "leaderboard":
        from posthoc_tune.curves import configurations
        from posthoc_tune.display import leaderboard_view
        from posthoc_tune.selection import leaderboard, open_store, write_frame

        store = open_store(args.experiment)
        frame = leaderboard(
            store, args.metric, args.mode, ensemble=args.ensemble, greedy=args.greedy
        )
        view = leaderboard_view(frame, configurations(store))
        write_frame(frame.set_index("rank"), args.format, args.out, readable=view)
    elif args.command == "greedy":
        import pandas as pd

        from posthoc_tune.greedy import FLAVOURS, greedy_ensemble
        from posthoc_tune.selection import write_frame

        frames = []
        for flavour in FLAVOURS:
            result = greedy_ensemble(
                args.experiment,
                flavour=flavour,
                objective=args.objective,
                size=args.size,
                pool=args.pool,
                max_candidates=args.max_candidates,
            )
            scores = {f"{s}/{m}": result.value(s, m) for s in ("val", "test") for m in METRICS}
            members = result.members.assign(flavour=flavour, **scores)
            members.insert(0, "ensemble_temperature", result.temperature)
            frames.append(members)
        frame = pd.concat(frames, ignore_index=True).set_index(["flavour", "trial_id"])
        write_frame(frame, args.format, args.out)
    elif args.command == "replay":
        from posthoc_tune.curves import configurations
        from posthoc_tune.display import replay_view
        from posthoc_tune.replay import Experiment, compare, default_strategies
        from posthoc_tune.selection import write_frame

        experiment = Experiment(args.experiment, transforms=[args.transform])
        max_t = args.max_t or max(experiment.max_epochs.values())
        strategies = default_strategies(
            max_t,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            transform=args.transform,
            seed_key=experiment.seed_key,  # as the reporter recorded it
        )
        frame = compare(
            experiment, strategies, transform=args.transform, concurrency=args.concurrency
        )
        view = replay_view(frame, configurations(experiment.store))
        frame["config"] = [json.dumps(c, sort_keys=True) for c in frame["config"]]
        write_frame(frame, args.format, args.out, readable=view)
    elif args.command == "compact":
        from posthoc_tune.retention import compact

        report = compact(
            args.experiment,
            keep=args.keep,
            drop_trials=args.drop_trials,
            transforms=args.transforms,
            dry_run=args.dry_run,
        )
        verb = "would delete" if args.dry_run else "deleted"
        print(
            f"{verb} {len(report.dropped_trials)} trials and {report.n_dropped_files} epoch "
            f"files; {sum(map(len, report.kept_epochs.values()))} epoch files kept"
        )
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
            configs=args.configs,
            seeds=args.seeds,
            epochs=args.epochs,
            grace_period=args.grace_period,
            cpus_per_trial=args.cpus_per_trial,
            storage=args.storage,
            out=args.out,
            name=args.name,
            plots=not args.no_plots,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
