from pathlib import Path

import pytest

from posthoc_tune import PredictionStore
from posthoc_tune.cli import main


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_a_real_search_end_to_end(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--dataset", "digits", "--epochs", "4", "--storage", str(tmp_path)]
    assert main([*argv, "--name", "small"]) == 0
    out = capsys.readouterr().out
    assert "naive epoch" in out and "post-hoc epoch" in out
    store = PredictionStore.open(tmp_path / "small")
    assert len(store.trials()) == 4  # 2 learning rates x 2 seeds
    assert all(store.epochs(t) for t in store.trials())
