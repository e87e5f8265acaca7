"""One writer per output folder, for a run's whole life (training, evaluate, infer).

A run takes the folder's lock before it writes anything there (``RunSettings.check``, its first step) and
holds it until the process ends (or :func:`release`). The lock is the kernel's: ``fcntl.flock`` on
``OUTPUT/.cobot-med.lock``, which also holds who took it (pid, host, start time, command). A second run
into the folder gets one line naming that holder. The kernel drops the lock when its process dies, however
it dies (kill -9 included), so a lock left by a killed run is free: the next run takes it over and says
whose it was. The lock file is never deleted (deleting it while another process opens it would let two
runs hold two different files). Under torchrun the first process of the launch holds it for all. On
NFS, Linux maps ``flock`` to the server's byte-range locks.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from .errors import SettingsError
from .files import absolute
from .redact import redact

LOCK_NAME = ".cobot-med.lock"
logger = logging.getLogger(__name__)
_held: dict[str, int] = {}  # folder -> open descriptor holding its lock (this process)


class FolderInUse(SettingsError):
    """Another live run holds the output folder."""


def launch_rank() -> int:
    """This process's rank in a torchrun launch, also before the process group exists (0 alone)."""
    from . import distributed

    return distributed.rank() if distributed.initialized() else int(os.environ.get("RANK", "0") or 0)


def acquire(folder: str | Path, run: str) -> str:
    """Hold ``folder``'s lock for this process (``run``: what runs, e.g. ``training``); FolderInUse naming the
    holder when another process has it. Returns a note when a dead run's lock was taken over ('' otherwise).
    Taking a lock this process holds already is a no-op; other ranks of a launch take nothing."""
    folder = absolute(folder)
    key = str(folder)
    if key in _held or launch_rank() != 0:
        return ""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read(descriptor)
        os.close(descriptor)
        raise FolderInUse(f"output folder {folder} is in use by another run ({describe(holder)}); wait for it to "
                          "finish, or choose another output folder") from None
    previous = _read(descriptor)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "run": run,
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": redact(command_line())[:500]}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(descriptor)
    _held[key] = descriptor
    if previous.get("pid") and previous.get("released") is not True:
        note = (f"took over the lock of {folder}, left by a run that is no longer running ({describe(previous)})")
        logger.warning(note)
        return note
    return ""


def command_line() -> str:
    """This process's command as typed (``python -m monai.bundle run ...``, not the module file's path)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = f"python -m {spec.name.removesuffix('.__main__')}" if spec is not None else sys.argv[0]
    return " ".join([program, *sys.argv[1:]])


def release(folder: str | Path) -> None:
    """Give ``folder``'s lock back (a run that ends before its process does); the file says it was released."""
    descriptor = _held.pop(str(absolute(folder)), None)
    if descriptor is None:
        return
    try:
        record = _read(descriptor)
        record["released"] = True
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(record) + "\n").encode(), 0)
    finally:
        os.close(descriptor)  # closing drops the flock


def holds(folder: str | Path) -> bool:
    return str(absolute(folder)) in _held


def describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "holder unknown"
    return (f"{holder.get('run', 'a run')} by pid {holder['pid']} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}: {holder.get('command', '')}").rstrip(": ")


def _read(descriptor: int) -> dict:
    try:
        size = os.fstat(descriptor).st_size
        record = json.loads(os.pread(descriptor, min(size, 65536), 0).decode() or "{}")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
