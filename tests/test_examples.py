import importlib.util
import sys
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
        trial_id, last = result.metrics["trial_id"], result.metrics["epoch"]
        # A trial ASHA stopped may have stored one epoch Tune never processed.
        epochs = store.epochs(trial_id)
        assert epochs == list(range(1, len(epochs) + 1)) and last <= len(epochs) <= last + 1
        assert result.checkpoint is not None  # the reporter checkpointed every epoch


def test_cifar10n_example_help_says_it_downloads_without_torchvision(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        _load("cifar10n").main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "OPTIONAL EXAMPLE: it downloads data and needs network access" in out
    assert "pip install torchvision" in out and "GPU" in out


def test_cifar10n_example_without_torchvision_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    argv = ["--epochs", "2", "--grace-period", "1", "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"needs torchvision.*pip install torchvision"):
        _load("cifar10n").main(argv)
    assert not any(tmp_path.iterdir())  # nothing was downloaded


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--label-set", "aggre"], "unknown label_set 'aggre'; expected one of ['worst', "),
        (["--dataset", "cifar100n", "--label-set", "worst"], "unknown label_set 'worst'"),
        (["--dataset", "cifar10"], "invalid choice: 'cifar10'"),
        (["--gpus-per-trial", "1.5"], "a whole number of GPUs, got 1.5"),
        (["--epochs", "0"], "must be an int >= 1, got 0"),
        (["--epochs", "5", "--grace-period", "6"], "--grace-period (6) must be <= --epochs (5)"),
    ],
)
def test_cifar10n_example_rejects_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _load("cifar10n").main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_example_runs_with_a_small_budget(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--configs", "2", "--seeds", "2", "--epochs", "5", "--samples", "2000"]
    results = _load("quickstart").main([*argv, "--storage", str(tmp_path)])
    assert len(results) == 4 and not results.errors
    out = capsys.readouterr().out
    assert "posthoc/test/nll" in out and "val/swa+ens+ts/nll" in out
    seeds = sorted(r.config["seed"] for r in results)
    assert seeds == [0, 0, 1, 1]  # PostHocSearch: 2 configurations x seeds 0 and 1


@pytest.mark.slow
def test_compare_strategies_example_runs_with_a_small_budget(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--dataset", "digits", "--lrs", "0.03", "0.3", "--widths", "32", "--seeds", "2"]
    argv += ["--epochs", "6", "--grace-period", "1", "--storage", str(tmp_path)]
    table = _load("compare_strategies").main(argv)
    full = 2 * 2 * 6  # configurations x seeds x epochs
    assert list(table["compute"][:2]) == [full, full]  # the full-budget rows
    assert (table["compute"][2:] <= full).all()
    assert "PostHocASHA on val/swa+ens+ts/nll" in capsys.readouterr().out


def test_gpu_overhead_script_measures_the_reporter_on_cpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """benchmarks/gpu_overhead.py (run by gpu_check.sh on a GPU) works end to end on the CPU."""
    spec = importlib.util.spec_from_file_location(
        "gpu_overhead", EXAMPLES.parent / "benchmarks" / "gpu_overhead.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sizes = ["--train", "64", "--val", "40", "--test", "30", "--width", "4", "--epochs", "2"]
    out = module.main(["--device", "cpu", *sizes])
    assert out["reporter / train"] == pytest.approx(out["reporter s"] / out["train s"])
    assert out["reporter s"] > 0 and out["store MB per epoch"] > 0
    # float32 logits of 10 classes, base and SWA, val and test: at least 4 bytes per value
    assert out["store MB per epoch"] * 2**20 >= 4 * 10 * 2 * (40 + 30)
    assert "| reporter / train |" in capsys.readouterr().out
