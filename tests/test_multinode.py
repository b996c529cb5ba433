"""PostHocSearch + PostHocASHA on a simulated 2-node cluster (in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, *flags: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.multinode", str(out), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads((out / "result.json").read_text()))


def test_groups_span_nodes_and_their_ensembles_equal_the_recomputed_ones(
    tmp_path: Path,
) -> None:
    report = _run(tmp_path, "--shared")
    assert report["errors"] == []
    nodes, groups = report["nodes"], report["groups"]
    assert len(set(nodes.values())) == 2  # trials ran on both nodes
    for group in set(groups.values()):
        members = [t for t, g in groups.items() if g == group]
        assert len({nodes[m] for m in members}) == 2  # each ensemble spans both nodes
    assert report["ensembles"]
    for row in report["ensembles"]:
        assert len({nodes[m] for m in row["members"]}) == 2
        assert row["stored"] == pytest.approx(row["recomputed"], rel=1e-4)
    assert len(report["told"]) == 3 and all(v is not None for v in report["told"].values())


def test_a_node_local_store_on_several_nodes_fails_at_start_up(tmp_path: Path) -> None:
    report = _run(tmp_path)
    assert "node-local filesystem" in report["error"]
    assert "the Ray cluster has 2 nodes" in report["error"]
    assert "POSTHOC_TUNE_SHARED_STORAGE=1" in report["error"]
