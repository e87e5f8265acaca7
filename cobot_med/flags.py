"""Yes/no settings that may arrive as text from a command line ('false' must not be truthy)."""

from __future__ import annotations

from typing import Any

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off", "", "none")


def as_flag(value: Any, name: str = "setting", error: type[Exception] = ValueError) -> bool:
    """A bool from a bool, a number or text; anything else raises ``error`` naming the setting."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
        raise error(f"{name} must be true or false, got {value!r}")
    return bool(value)
