"""Writing files so that a killed process never leaves a half-written file under a final name.

Every output is written under a hidden temporary name in its final folder and renamed when complete
(``os.replace`` is atomic within a folder). Temporary files are opened like any other file, so they
get the user's umask (``tempfile`` would make them 0600); several processes may write the same file
(every rank of a distributed run), each through its own temporary name.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

TEMP_PREFIX = ".tmp-"


def absolute(path: str | Path) -> Path:
    """``path`` from the root, normalised (``repo/../seg`` is ``seg``), symbolic links kept: how the project
    prints and records every path it is given."""
    return Path(os.path.abspath(path))


def temporary_path(path: Path) -> Path:
    """A hidden, unique name in the same folder with the same extension (writers choose the format by it)."""
    return path.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def user_mode(path: str | Path) -> None:
    """Give a file the mode the user's umask makes (some writers, e.g. safetensors, create theirs 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # not the locale's: ITK may switch a process to the C locale
    return Path(path)


def write_json(path: str | Path, content: Any) -> Path:
    return write_text(path, json.dumps(content, indent=2, default=json_default) + "\n")


def json_default(value: Any) -> Any:
    """JSON for the numpy scalars and arrays, paths and tensors that outputs carry."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporary files a killed run left behind in ``folder`` (only this module's own names)."""
    count = 0
    for tmp in Path(folder).glob(f"{TEMP_PREFIX}*"):
        if tmp.is_file():
            tmp.unlink()
            count += 1
    return count
