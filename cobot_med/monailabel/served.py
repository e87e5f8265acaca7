"""Which adapter a model serves now, read at every request, so that a switch or a rollback is served from the
next request on without a restart.

The served version is the versions record's (``MODEL_DIR/versions.json``, :mod:`cobot_med.monailabel.versions`):
replaced in one step, after the version's folder is complete, so a half-written adapter is never loaded.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from . import versions


class ServedModel:
    """The network of one served model: the served version of its record (version 0, the adapter it started
    with or the base, until a round is judged better or another version is asked for).

    ``load(adapter_or_None, device) -> (network, info)`` builds a network (anything the caller needs with it;
    ``info`` is JSON-friendly); it is called again only when the adapter to serve (or the device) changed.
    ``version``: ``--conf adapter_version``, served from the start.
    """

    def __init__(self, model_dir: str | Path, start_adapter: str | None,
                 load: Callable[[str | None, str], tuple[Any, dict]], version: int | None = None) -> None:
        self.model_dir, self.start_adapter, self._load = Path(model_dir), start_adapter, load
        versions.open_versions(self.model_dir, start_adapter, version)
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._network: Any = None
        self._info: dict[str, Any] = {}

    def current(self) -> dict[str, Any]:
        """What is served now: ``{"adapter": folder or None, "version": n, "round": the round that made it
        (0 for version 0), "served_by": why}``."""
        record = versions.read(self.model_dir)
        served = versions.served_entry(record)
        return {"adapter": served["adapter"], "version": served["version"], "round": served.get("round") or 0,
                "served_by": record.get("served_by")}

    def get(self, device: str) -> tuple[Any, dict[str, Any]]:
        record = self.current()
        key = (record["adapter"], record["version"], str(device))
        with self._lock:  # concurrent requests load once
            if key != self._key:
                network, info = self._load(record["adapter"], device)
                self._network, self._key = network, key
                self._info = {**info, "round": record["round"], "version": record["version"]}
            return self._network, dict(self._info)
