"""Run the repository's MONAI bundles from Python (the demo, sweeps and inference use this)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import cobot_med


class BundleNotFound(FileNotFoundError):
    pass


def repository_root() -> Path:
    """The folder holding ``bundles/`` and ``transforms/`` (bundle macros are relative to it)."""
    candidates = [Path.cwd(), Path(cobot_med.__file__).resolve().parents[1]]
    if os.environ.get("COBOT_MED_ROOT"):
        candidates.insert(0, Path(os.environ["COBOT_MED_ROOT"]))
    for root in candidates:
        if (root / "bundles" / "common.json").is_file() and (root / "transforms").is_dir():
            return root
    raise BundleNotFound(
        "cannot find the bundles/ and transforms/ folders: run from the cobot-med repository root "
        "or set COBOT_MED_ROOT to it"
    )


def bundle_path(name_or_path: str | Path) -> Path:
    """``adome`` or ``bundles/adome.json`` -> the config file."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = repository_root() / "bundles" / f"{name_or_path}.json"
    elif not path.is_absolute() and not path.is_file():
        path = repository_root() / path
    if not path.is_file():
        raise BundleNotFound(f"bundle config {name_or_path} not found")
    return path.resolve()


@contextlib.contextmanager
def in_repository() -> Iterator[Path]:
    """Work from the repository root while a bundle runs (its ``%file::id`` macros are cwd-relative)."""
    root, previous = repository_root(), Path.cwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(previous)


def run_bundle(config: str | Path, run_id: str = "training", **overrides: Any) -> None:
    """``python -m monai.bundle run RUN_ID --config_file CONFIG --key value ...`` in this process."""
    from monai.bundle import run

    config_file = bundle_path(config)
    with in_repository() as root:
        run(run_id, config_file=str(config_file), meta_file=str(root / "bundles" / "metadata.json"),
            logging_file=str(root / "bundles" / "logging.conf"), **overrides)
