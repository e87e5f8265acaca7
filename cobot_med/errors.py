"""The project's errors reach a user as one named line and a non-zero exit, tracebacks only on request.

Every error a user can act on (a bad setting, a file that cannot be read, an adapter that does not
fit) derives from :class:`CobotMedError`. The edges of the program -- the ``cobot-med`` command and
a bundle run under ``python -m monai.bundle`` -- catch it, print ``cobot-med: <message>`` once and
exit non-zero; MONAI wraps errors raised inside a config expression, so the edge walks the chain of
causes to find ours. ``--debug`` or ``COBOT_MED_DEBUG=1`` keeps the full traceback.

A crash also marks the MLflow run that was open as FAILED, so no run stays RUNNING.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

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
    """Run ``main``; a project error becomes one line on stderr and its exit code (re-raised with debug on)."""
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        fail_open_run()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the edge: ours become one line, others keep their traceback
        fail_open_run()
        ours = project_error(err)
        if ours is None or debug_enabled():
            raise
        print(f"{prog}: {ours}", file=sys.stderr)
        return ours.exit_code


_previous_hook: Any = None


def _excepthook(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
    fail_open_run()
    ours = project_error(value)
    if ours is None or debug_enabled():
        (_previous_hook or sys.__excepthook__)(kind, value, traceback)
        return
    print(f"cobot-med: {ours}", file=sys.stderr)


def install_excepthook() -> None:
    """For runs whose edge is not ours (``python -m monai.bundle run``): an uncaught project error prints one
    line instead of MONAI's traceback (Python still exits with status 1). Idempotent."""
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
