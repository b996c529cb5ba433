"""The ``posthoc-tune`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from posthoc_tune import __version__
from posthoc_tune.datasets import DATASETS


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
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
