"""Which adapter a model serves, and how a finished training round hands its adapter to the server.

A round ends by writing ``MODEL_DIR/served.json`` (atomically, after the adapter folder is complete);
the infer task reads that small file at every request and loads the adapter it names when it changed.
So a new adapter is served from the next request on, without restarting the server, and a half-written
adapter is never loaded.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

RECORD = "served.json"


def read_record(model_dir: str | Path) -> dict[str, Any]:
    """The last published round (``{"adapter": folder, "round": n, ...}``), or {} before the first."""
    path = Path(model_dir) / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) and record.get("adapter") else {}


def publish(model_dir: str | Path, record: dict[str, Any]) -> Path:
    """Make ``record["adapter"]`` the served adapter: the record is renamed into place in one step."""
    from ..files import write_json

    return write_json(Path(model_dir) / RECORD, dict(sorted(record.items())))  # atomic; credentials masked


class ServedModel:
    """The network of one served model: the newest published adapter, else the one it started with.

    ``load(adapter_or_None, device) -> (network, info)`` builds a network (anything the caller needs with it;
    ``info`` is JSON-friendly); it is called again only when the adapter to serve (or the device) changed.
    """

    def __init__(self, model_dir: str | Path, start_adapter: str | None,
                 load: Callable[[str | None, str], tuple[Any, dict]]) -> None:
        self.model_dir, self.start_adapter, self._load = Path(model_dir), start_adapter, load
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._network: Any = None
        self._info: dict[str, Any] = {}

    def current(self) -> dict[str, Any]:
        """The record of what should be served now: a published round, or the starting adapter (or none)."""
        record = read_record(self.model_dir)
        return record or {"adapter": self.start_adapter, "round": 0}

    def get(self, device: str) -> tuple[Any, dict[str, Any]]:
        record = self.current()
        key = (record.get("adapter"), record.get("published"), str(device))
        with self._lock:  # concurrent requests load once
            if key != self._key:
                network, info = self._load(record.get("adapter"), device)
                self._network, self._info, self._key = network, {**info, "round": record.get("round", 0)}, key
            return self._network, dict(self._info)
