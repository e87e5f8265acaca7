"""The project's errors reach a user as one named line and a non-zero exit, tracebacks only on request.

Every error a user can act on (a bad setting, a file that cannot be read, an adapter that does not
fit) derives from :class:`CobotMedError`. The edges of the program -- the ``cobot-med`` command and
a bundle run under ``python -m monai.bundle`` -- catch it, print ``cobot-med: <message>`` once and
exit non-zero; MONAI wraps errors raised inside a config expression, so the edge walks the chain of
causes to find ours. ``--debug`` or ``COBOT_MED_DEBUG=1`` keeps the full traceback.

:func:`explain` is the one place that decides what becomes one line: a project error; a full disk
(``ENOSPC``, ``EDQUOT``: nothing to fix in the program, space to free); Ctrl-C (what was kept, and that the
same command goes on: :func:`set_interrupt_note`). Anything else is a bug and keeps its traceback, shown
once: the engines' own exception logs are held back for what is explained here
(:class:`cobot_med.handlers.OneLineErrors`). Credentials in a message are masked (:mod:`cobot_med.redact`).

A crash also marks the MLflow run that was open as FAILED, so no run stays RUNNING.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable

from .redact import redact

DEBUG_ENV = "COBOT_MED_DEBUG"


class CobotMedError(Exception):
    """An error with a message that says what is wrong and what to do; ``exit_code`` is the process status."""

    exit_code = 2


class SettingsError(CobotMedError, ValueError):
    """A setting (bundle key, command-line flag) that cannot work, named with its value."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def find_in_chain(err: BaseException | None, kind: type[BaseException]) -> Any:
    """The first exception of ``kind`` in ``err``'s chain of causes (MONAI wraps errors raised inside a
    transform chain or a config expression in its own), or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def project_error(err: BaseException | None) -> CobotMedError | None:
    """The first :class:`CobotMedError` in ``err``'s chain of causes."""
    return find_in_chain(err, CobotMedError)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
FULL_DISK_WORDS = ("No space left on device", "database or disk is full", "Disk quota exceeded")
INTERRUPTED_EXIT = 130
_interrupt_note = ""


def set_interrupt_note(note: str) -> None:
    """What a Ctrl-C of the work under way leaves and how to go on (a training run: its last finished epoch
    is in ``resume.pt`` and the same command resumes it), said in the interrupt's one line."""
    global _interrupt_note
    _interrupt_note = note


def explain(err: BaseException | None) -> tuple[str, int] | None:
    """The one line (without the ``cobot-med:`` prefix) and the exit status for an error a user can act on,
    or None for a bug (whose traceback is kept)."""
    if err is None:
        return None
    if find_in_chain(err, KeyboardInterrupt) is not None:
        return "interrupted" + (f"; {_interrupt_note}" if _interrupt_note else ""), INTERRUPTED_EXIT
    ours = project_error(err)
    if ours is not None:
        return redact(str(ours)), ours.exit_code
    full = _no_space(err)
    if full is not None:
        where = f" writing {full.filename}" if full.filename else ""
        return (f"no space left on the device{where} ({os.strerror(full.errno)}): free some space or choose "
                "another output folder, then run the same command again"
                + (f"; {_interrupt_note}" if _interrupt_note else "")), 1
    return None


def _no_space(err: BaseException) -> OSError | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return err
        if any(words in str(err) for words in FULL_DISK_WORDS):  # torch.save's and SQLite's (MLflow) own wording
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


_on_failure: dict[str, Callable[[], None]] = {}


def on_failure(key: str, callback: Callable[[], None] | None) -> None:
    """Register (or, with None, drop) what to do if this process dies of an error: a training session marks
    its MLflow run FAILED, so that no crashed run stays RUNNING."""
    if callback is None:
        _on_failure.pop(key, None)
    else:
        _on_failure[key] = callback


def fail_open_run() -> None:
    """Run the failure callbacks, and end MLflow's active run (if any) as FAILED."""
    for key, callback in list(_on_failure.items()):
        _on_failure.pop(key, None)
        try:
            callback()
        except Exception:  # noqa: BLE001 - reporting the original error matters more
            pass
    mlflow = sys.modules.get("mlflow")  # only when the run used MLflow: never import it here
    if mlflow is None:
        return
    try:
        if mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED")
    except Exception:  # noqa: BLE001
        pass


def run_at_edge(main: Callable[[], int | None], prog: str = "cobot-med") -> int:
    """Run ``main``; an error :func:`explain` knows becomes one line on stderr and its exit code (re-raised
    with debug on); any other keeps its traceback."""
    try:
        return int(main() or 0)
    except BaseException as err:  # noqa: BLE001 - the edge: ours become one line, others keep their traceback
        if isinstance(err, SystemExit):
            raise
        fail_open_run()
        said = explain(err)
        if said is None or debug_enabled():
            raise
        print(f"{prog}: {said[0]}", file=sys.stderr)
        return said[1]


_previous_hook: Any = None


def _excepthook(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
    fail_open_run()
    said = explain(value)
    if said is None or debug_enabled():
        (_previous_hook or sys.__excepthook__)(kind, value, traceback)
        return
    print(f"cobot-med: {said[0]}", file=sys.stderr)


def install_excepthook() -> None:
    """For runs whose edge is not ours (``python -m monai.bundle run``): an uncaught error that :func:`explain`
    knows prints one line instead of MONAI's traceback (Python still exits non-zero: 1, or the interrupt's
    status). Idempotent."""
    global _previous_hook
    from .redact import mask_logs

    mask_logs()  # the logs of the run mask credentials too
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
