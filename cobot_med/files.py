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
DIGESTS_NAME = ".cobot-med-digests.json"  # an output folder's remembered input digests (Digests)


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
    """``content`` as JSON, atomically; credentials in any URI it holds are masked (:mod:`cobot_med.redact`):
    every record the project writes names a tracking store without its password."""
    from .redact import redact

    return write_text(path, json.dumps(redact(json.loads(json.dumps(content, default=json_default))), indent=2) + "\n")


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


class Digests:
    """SHA-256 of input files and folders (a DICOM series), for records that must name what they were made from.

    A file is hashed once per content: its digest is remembered by what changes whenever its bytes do
    (device, inode, size, modification and change times, as ``git``'s index does), in memory and, with
    ``store``, in a small JSON file kept between runs (a resume or a rerun does not hash a dataset again).
    A folder's digest is that of its files' names and digests (hidden files left out).
    """

    def __init__(self, store: str | Path | None = None) -> None:
        self.store = Path(store) if store else None
        self.known: dict[str, list] = {}
        self.changed = False
        if self.store is not None and self.store.is_file():
            try:
                content = json.loads(self.store.read_text())
                self.known = {k: v for k, v in content.items() if isinstance(v, list) and len(v) == 2}
            except (OSError, ValueError, AttributeError):
                self.known = {}  # a damaged cache is only a slower run

    def of(self, path: str | Path | None) -> str | None:
        """The digest of a file or a folder (``None`` for no path)."""
        if path is None or path == "":
            return None
        if isinstance(path, (list, tuple)):  # per-organ label files
            return self._combine([(str(i), self.of(p)) for i, p in enumerate(path)])
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            return self._combine([(p.name, self.of(p)) for p in files])
        info = path.stat()
        key = str(path.resolve())
        stamp = f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"
        seen = self.known.get(key)
        if seen is not None and seen[0] == stamp:
            return seen[1]
        digest = file_sha256(path)
        self.known[key] = [stamp, digest]
        self.changed = True
        return digest

    @staticmethod
    def _combine(parts: list[tuple[str, str | None]]) -> str:
        import hashlib

        digest = hashlib.sha256()
        for name, value in parts:
            digest.update(f"{name}\0{value}\n".encode())
        return digest.hexdigest()

    def save(self) -> None:
        """Keep what was hashed for the next run (only when something new was)."""
        if self.store is not None and self.changed:
            try:
                write_json(self.store, self.known)
            except OSError:
                pass  # a cache that cannot be written is only a slower next run
            self.changed = False


def file_sha256(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
