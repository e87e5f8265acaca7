"""Fixtures shared by the whole test suite. Keep them generic; add yours below with a docstring."""

from __future__ import annotations

import importlib.util
import locale
import os
from pathlib import Path
from typing import Callable

import pytest

LAYOUT_NAMES = ("adome", "spleen", "segrap")

# The MONAI Label app's tests need the monailabel extra, which lives in an environment of its own (it pins
# numpy 1.26; noxfile.py's monailabel session). Elsewhere they are not collected; that session sets
# COBOT_MED_REQUIRE_MONAILABEL=1, so that there a missing extra fails instead of passing unseen.
collect_ignore_glob = []
if importlib.util.find_spec("monailabel") is None and not os.environ.get("COBOT_MED_REQUIRE_MONAILABEL"):
    collect_ignore_glob.append("test_monailabel*.py")
# The export tests need the infer extra (onnx, onnxruntime, openvino); noxfile.py's tests session installs it and
# sets COBOT_MED_REQUIRE_RUNTIMES=1, so that there a missing runtime fails instead of passing unseen.
if not os.environ.get("COBOT_MED_REQUIRE_RUNTIMES") and any(
        importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime", "openvino")):
    collect_ignore_glob.append("test_export*.py")


@pytest.fixture(scope="session")
def phantom_factory(tmp_path_factory) -> Callable[..., Path]:
    """``make(layout, cases=5, seed=0, shape=(64, 64, 32)) -> folder`` of phantom cases in ``layout``'s tree.

    Each argument set is written once per test session; treat the folders as read-only (copy
    one to ``tmp_path`` before changing it).
    """
    made: dict[tuple, Path] = {}

    def make(layout: str, cases: int = 5, seed: int = 0, shape: tuple[int, int, int] = (64, 64, 32)) -> Path:
        from cobot_med.data.phantoms import make_phantoms

        key = (layout, int(cases), int(seed), tuple(shape))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"phantoms_{layout}")
            made[key] = make_phantoms(layout, folder, cases=cases, seed=seed, shape=tuple(shape))
        return made[key]

    return make


@pytest.fixture(scope="session")
def phantom_dirs(phantom_factory) -> dict[str, Path]:
    """One read-only phantom folder per layout (5 cases, seed 0): {"adome": ..., "spleen": ..., "segrap": ...}."""
    return {layout: phantom_factory(layout) for layout in LAYOUT_NAMES}


_LOCALE_AT_START = locale.setlocale(locale.LC_ALL)  # before any test read DICOM


@pytest.fixture(autouse=True)
def keep_the_locale():
    """ITK switches the process to the C locale when it reads or writes DICOM; put the session's own back before
    and after each test, so that no read decides another test's text encoding (subprocess output decoded as ASCII).
    Before too: a module- or session-scoped fixture that reads DICOM runs before this fixture, so a locale saved
    here per test could already be the C one."""
    locale.setlocale(locale.LC_ALL, _LOCALE_AT_START)
    yield
    locale.setlocale(locale.LC_ALL, _LOCALE_AT_START)


@pytest.fixture(autouse=True)
def keep_the_tracking_store():
    """``mlflow.set_tracking_uri`` (MONAI's MLFlowHandler calls it) also sets ``$MLFLOW_TRACKING_URI`` for the
    process's children, so one test's store would become the next test's default: put both back. A real run is
    one process; the sweep and reproduce pass each child its store explicitly. Likewise a session a test started
    and never finished leaves its mark-FAILED callback (``errors.on_failure``), which the next command that fails
    in this process would run against that test's store: drop them."""
    import os
    import sys

    from cobot_med import errors

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    errors._on_failure.clear()
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None and hasattr(utils, "_tracking_uri"):
        utils._tracking_uri = None


@pytest.fixture
def single_torch_thread():
    """Run the test with one torch intra-op thread (small tensor work is faster, and fair on a busy CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """A slow test carries its own timeout, about 10x (at least 5x) its time alone, so that a shared machine
    slows it down without failing it, and a hung one still ends (pyproject.toml's 600 s is for the fast tier)."""
    bare = [item.nodeid for item in items if item.get_closest_marker("slow") and not item.get_closest_marker("timeout")]
    if bare:
        raise pytest.UsageError(f"slow tests without @pytest.mark.timeout(N): {bare}")
