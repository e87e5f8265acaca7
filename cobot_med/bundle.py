"""The repository's MONAI bundles: find them, layer them, run them from Python.

A run is ``bundles/common.json`` (the workflow and every default) with a dataset layer on top
(``bundles/adome.json``...), and optionally more layers (``bundles/multi_gpu.json``), exactly as
``python -m monai.bundle run ID --config_file "['bundles/common.json','bundles/adome.json']"`` does; nothing
depends on the working directory. A dataset layer run on its own says how to run it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import cobot_med

from .errors import SettingsError

WORKFLOW = "common.json"
_workflow_loaded = False


class BundleNotFound(SettingsError, FileNotFoundError):
    """A bundle name or config file that does not exist."""


def repository_root() -> Path:
    """The folder holding ``bundles/`` and ``transforms/``: next to the package (a source checkout), else
    ``$COBOT_MED_ROOT``, else the working directory."""
    candidates = [Path(cobot_med.__file__).resolve().parents[1]]
    if os.environ.get("COBOT_MED_ROOT"):
        candidates.append(Path(os.environ["COBOT_MED_ROOT"]))
    candidates.append(Path.cwd())
    for root in candidates:
        if (root / "bundles" / WORKFLOW).is_file() and (root / "transforms").is_dir():
            return root
    raise BundleNotFound(
        "cannot find the bundles/ and transforms/ folders of cobot-med: install the package from its repository "
        "(pip install -e .) or set COBOT_MED_ROOT to the repository")


def bundle_path(name_or_path: str | Path) -> Path:
    """``adome`` or ``bundles/adome.json`` (relative to the working directory or the repository) -> the file."""
    path = Path(name_or_path)
    if path.suffix not in (".json", ".yaml", ".yml"):
        path = repository_root() / "bundles" / f"{name_or_path}.json"
    elif not path.is_absolute() and not path.is_file():
        path = repository_root() / path
    if not path.is_file():
        raise BundleNotFound(f"bundle config {name_or_path} not found")
    return path.resolve()


def config_files(config: str | Path | Sequence[str | Path]) -> list[Path]:
    """The layers of a run: the workflow first (added when a dataset layer is given alone), then the rest."""
    items = [config] if isinstance(config, (str, Path)) else list(config)
    parts = [part for item in items for part in (str(item).split(",") if isinstance(item, str) else [item]) if part]
    files = [bundle_path(part) for part in parts]
    workflow = repository_root() / "bundles" / WORKFLOW
    if all(f.name != WORKFLOW for f in files):
        files.insert(0, workflow.resolve())
    return files


RUN_OPTIONS = {"meta_file", "logging_file", "init_id", "final_id", "tracking", "args_file", "workflow_type"}


def check_overrides(config: str | Path | Sequence[str | Path], overrides: dict[str, Any]) -> None:
    """Every override names a setting of the layers (a typo would otherwise add an unused id, silently)."""
    import difflib

    from monai.bundle import ConfigParser

    known = set(ConfigParser.load_config_files([str(f) for f in config_files(config)])) | RUN_OPTIONS
    unknown = sorted(key for key in overrides if key.split("#")[0].split("::")[0] not in known)
    if unknown:
        hints = [f"did you mean {difflib.get_close_matches(k, sorted(known), n=1)[0]!r}"
                 for k in unknown if difflib.get_close_matches(k, sorted(known), n=1)]
        raise SettingsError(f"unknown setting(s) {unknown}" + (f" ({'; '.join(hints)})" if hints else ""))


def run_bundle(config: str | Path | Sequence[str | Path], run_id: str = "training", **overrides: Any) -> None:
    """``python -m monai.bundle run RUN_ID --config_file LAYERS --key value ...`` in this process; an override
    that names no setting is refused."""
    from monai.bundle import run

    files = config_files(config)
    check_overrides(files, overrides)
    run(run_id, config_file=[str(f) for f in files], **overrides)


def mark_workflow_loaded() -> None:
    """Called first by the workflow's ``initialize``; a dataset layer's check then knows it is not alone."""
    global _workflow_loaded
    _workflow_loaded = True


def require_workflow(dataset: str) -> None:
    """A dataset layer's ``initialize`` item: run without the workflow beneath, it says how to run it."""
    global _workflow_loaded
    loaded, _workflow_loaded = _workflow_loaded, False
    if not loaded:
        from .errors import install_excepthook

        install_excepthook()
        raise SettingsError(
            f"bundles/{dataset}.json holds the {dataset} settings only; run it on the workflow: python -m monai.bundle "
            f"run training --config_file \"['bundles/common.json','bundles/{dataset}.json']\" [--key value ...]")
