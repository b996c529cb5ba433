"""A start-up check for multi-node clusters: the store must be reachable from every node."""

from __future__ import annotations

import os

import ray

from posthoc_tune.store import PredictionStore, StoreError

SHARED_STORAGE_ENV = "POSTHOC_TUNE_SHARED_STORAGE"


def check_shared_storage(store: PredictionStore) -> None:
    """Fail when a cluster of several Ray nodes uses a node-local store path.

    Trials on other nodes would write their logits where the driver, which scores ensembles
    and tables from the store, cannot read them. A local path is fine when it is a mount that
    every node shares (NFS): say so with ``POSTHOC_TUNE_SHARED_STORAGE=1`` in the
    environment of the driver and the workers (e.g. ``runtime_env={"env_vars": ...}``).
    """
    if not store.is_local or os.environ.get(SHARED_STORAGE_ENV) == "1":
        return
    if not ray.is_initialized():
        return
    alive = [node for node in ray.nodes() if node.get("Alive")]
    if len(alive) > 1:
        raise StoreError(
            f"the prediction store {store.root!r} is on a node-local filesystem, but the Ray "
            f"cluster has {len(alive)} nodes: trials on other nodes would write where the "
            "driver cannot read. Give Tune a storage_path every node can reach (s3://..., "
            f"gs://..., or a shared mount and {SHARED_STORAGE_ENV}=1 on every node)."
        )
