import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from posthoc_tune import PredictionStore

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_custom_trainable_example_runs_with_a_small_budget(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _load("custom_trainable").main(["--epochs", "3", "--storage", str(tmp_path)])
    assert len(results) == 4 and not results.errors
    assert "selected by val/swa+ts/nll" in capsys.readouterr().out
    store = PredictionStore.open(results.experiment_path)
    for result in results:
        trial_id = result.metrics["trial_id"]
        assert store.epochs(trial_id) == list(range(1, result.metrics["epoch"] + 1))
        assert result.checkpoint is not None  # the reporter checkpointed every epoch
