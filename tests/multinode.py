"""A search on a simulated 2-node Ray cluster; run by tests/test_multinode.py in its own
process (a process holds one Ray connection, and the test session already has one).

    python -m tests.multinode OUT_DIR [--shared]

Node "a" and node "b" carry custom resources; even seeds must run on a, odd seeds on b, so
every configuration's ensemble is built from members on both nodes. Writes ``result.json``
to OUT_DIR: each trial's node, the ensemble values the driver persisted and the same values
recomputed here from the store, or the error that stopped the run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
from ray import tune
from ray.cluster_utils import Cluster

import posthoc_tune as pht
from posthoc_tune._cluster import SHARED_STORAGE_ENV
from tests import reference as ref

SEEDS, EPOCHS, CONFIGS = 2, 6, 3
METRIC = "val/swa+ens+ts/nll"


def train(config: dict[str, Any], out: str) -> None:
    def record_node(reporter: pht.PostHocReporter) -> None:
        node = ray.get_runtime_context().get_node_id()
        Path(out, f"{reporter.trial_id}.node").write_text(node)

    ref.teacher_trial(config, epochs=EPOCHS, rows=(300, 120, 100), on_start=record_node)


def _node_resources(config: dict[Any, Any]) -> tune.PlacementGroupFactory:
    return tune.PlacementGroupFactory(
        [{"CPU": 0.5, "node_a" if config["seed"] % 2 == 0 else "node_b": 1}]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--shared", action="store_true", help=f"set {SHARED_STORAGE_ENV}=1")
    args = parser.parse_args()
    out = Path(args.out)
    if args.shared:  # before the nodes start: their workers inherit the environment
        os.environ[SHARED_STORAGE_ENV] = "1"
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 4}}
    )
    cluster.add_node(num_cpus=1, resources={"node_b": 4})
    ray.init(address=cluster.address, log_to_driver=False)
    searcher = pht.PostHocSearch(
        space={"lr": tune.loguniform(0.01, 0.3)}, metric=METRIC, mode="min", n_seeds=SEEDS
    )
    scheduler = pht.PostHocASHA(
        metric=METRIC, mode="min", max_t=EPOCHS, grace_period=1, reduction_factor=3
    )
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train, out=str(out)), _node_resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=CONFIGS * SEEDS,
            max_concurrent_trials=2 * SEEDS,
            reuse_actors=True,  # a fresh actor costs seconds of imports
        ),
        run_config=tune.RunConfig(
            name="multinode",
            storage_path=str(out / "ray"),
            callbacks=[pht.PostHocCallback(scheduler, searcher)],
            failure_config=tune.FailureConfig(fail_fast=True),
            verbose=0,
        ),
    )
    report: dict[str, Any] = {}
    try:
        results = tuner.fit()
    except Exception as err:  # the node-local check must stop the run
        report["error"] = f"{type(err).__name__}: {err}"
    else:
        report["errors"] = [str(e) for e in results.errors]
        report["nodes"] = {p.stem: p.read_text() for p in out.glob("*.node")}
        store = pht.PredictionStore.open(results.experiment_path)
        groups = {t: store.metadata(t)["group"] for t in store.trials()}
        report["groups"] = groups
        ensembles = pht.ensemble_table(store)
        checked = []
        for (group, epoch), rows in ensembles.groupby(["group", "epoch"]):
            members = list(rows["members"].iloc[0])
            val = [store.read(m, int(epoch), "val", "swa") for m in members]
            ev, _ = ref.ensemble(val, val, store.labels("val"))
            values = dict(zip(rows["key"], rows["value"], strict=True))
            checked.append(
                {
                    "group": group,
                    "epoch": int(epoch),
                    "members": members,
                    "stored": values[METRIC],
                    "recomputed": ref.nll(ev, store.labels("val")),
                }
            )
        report["ensembles"] = checked
        report["told"] = {str(k): v for k, v in searcher.told_values().items()}
    (out / "result.json").write_text(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
