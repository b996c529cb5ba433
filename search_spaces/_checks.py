"""Argument checks shared by the search-space functions (clear errors before Tune sees them)."""

from __future__ import annotations

from collections.abc import Collection


def check_epochs(epochs: int) -> int:
    """``epochs`` if it is an int >= 1; a ValueError naming it otherwise."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    return epochs


def check_choice(name: str, value: str, allowed: Collection[str]) -> str:
    """``value`` if it is one of ``allowed``; a ValueError naming it and the choices otherwise."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
    return value
