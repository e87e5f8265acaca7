"""Names a package exports but imports on first use (PEP 562), so that a light path (the exported-model
runtime, ``cobot-med infer``'s overlays) can import one module of the package without the heavy ones."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(package: str, where: dict[str, str], loaded: dict[str, Any]
               ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: ``where`` maps each name to its module (relative,
    ``.build``); a name is imported once, then kept in ``loaded`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(importlib.import_module(where[name], package), name)
            loaded[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*loaded, *where})

    return __getattr__, __dir__
