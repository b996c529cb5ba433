"""The integrations are optional extras: the core never imports them, and a missing one says
what to install."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

EXTRAS = {  # module: (the package it needs, as imported; the extra to install)
    "posthoc_tune.lightning": ("lightning.pytorch", "lightning"),
    "posthoc_tune.huggingface": ("transformers", "huggingface"),
}


def test_importing_posthoc_tune_imports_no_integration() -> None:
    code = (
        "import sys, posthoc_tune as pht; pht.PostHocReporter, pht.PostHocASHA; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'transformers', 'peft', 'accelerate')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", list(EXTRAS))
def test_without_its_package_an_integration_says_what_to_install(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    package, extra = EXTRAS[module]
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'posthoc-tune\[{extra}\]'"):
        importlib.import_module(module)
