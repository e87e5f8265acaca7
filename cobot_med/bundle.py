"""The repository's MONAI bundles: find them, run them, and run a dataset layer on its own.

A run is ``bundles/common.json`` (the workflow and every default) with a dataset layer on top
(``bundles/adome.json``...), and optionally more layers (``bundles/multi_gpu.json``). Both command lines
work, from any working directory:

- ``python -m monai.bundle run training --config_file bundles/adome.json [--key value ...]`` (the layer alone);
- ``python -m monai.bundle run training --config_file "['bundles/common.json','bundles/adome.json']" ...``.

How: the workflow's steps live under ``steps`` in ``common.json``; every public run id (``training``,
``evaluate``, ``inference``, ``run``), in ``common.json`` and in each dataset layer alike, is one component,
``{"_target_": "cobot_med.bundle.run_steps", "run_id": ...}``. When MONAI runs it, :func:`run_steps` finds
the workflow that is running it. If that workflow has ``steps`` (the layered form), it runs them there, as
MONAI runs a list-valued run id. If not (a dataset layer alone), it builds the layered workflow itself:
``common.json`` beneath, and on top everything the layer's own workflow read (the layer's settings and the
user's overrides, in MONAI's order), and runs that. ``docs/bundles.md`` says why MONAI's ``%`` macros could
not do this.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import cobot_med

from .errors import SettingsError

WORKFLOW = "common.json"
STEPS = "steps"
META = "_meta_"
RUN_IDS = ("training", "evaluate", "inference")
# run ids that only name another: MONAI's default run id ("run") trains
ALIASES = {"run": "training"}


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


def workflow_file() -> Path:
    """``bundles/common.json``, the workflow every dataset layer runs on."""
    return (repository_root() / "bundles" / WORKFLOW).resolve()


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
    if all(f.name != WORKFLOW for f in files):
        files.insert(0, workflow_file())
    return files


def run_bundle(config: str | Path | Sequence[str | Path], run_id: str = "training", **overrides: Any) -> None:
    """``python -m monai.bundle run RUN_ID --config_file LAYERS --key value ...`` in this process (the layered
    form); a top-level key that names no setting is refused (:func:`check_keys`), as on the command line."""
    import warnings

    from monai.bundle import run

    files = config_files(config)
    with warnings.catch_warnings():  # MONAI's notice that configs run code: these are the project's own
        warnings.filterwarnings("ignore", message="parsing config_file")
        run(run_id, config_file=[str(f) for f in files], **overrides)


# --- the run ids: run the workflow's steps, or a dataset layer on the workflow ----------------------------


def run_steps(run_id: str) -> list[Any]:
    """The body of every public run id (a component in ``common.json`` and in each dataset layer).

    In a workflow that has ``steps`` (``common.json`` is loaded): check its top-level keys
    (:func:`check_keys`), then run ``steps::<run_id>`` item by item, as MONAI runs a list-valued run id.
    In a dataset layer run alone: run the same run id on the layered workflow (:func:`run_on_workflow`).
    """
    from .errors import install_excepthook

    install_excepthook()  # a refusal below is one line, also before the workflow's initialize has run
    run_id = ALIASES.get(run_id, run_id)
    workflow = running_workflow()
    parser = workflow.parser
    if STEPS not in parser:
        return run_on_workflow(workflow, run_id)
    check_keys(parser.get())
    steps = f"{STEPS}::{run_id}"
    if steps not in parser:
        raise SettingsError(f"unknown run id {run_id!r}; the bundles have {list(RUN_IDS)}")
    results = []
    for i in range(len(parser[steps])):
        step = f"{steps}::{i}"
        results.append(parser.get_parsed_content(step))
        parser.ref_resolver.remove_resolved_content(step)  # as MONAI does: a run id can run again
    return results


def running_workflow() -> Any:
    """The MONAI ``ConfigWorkflow`` whose run id is being evaluated: the nearest one up the call stack (MONAI
    hands a component nothing of the workflow that instantiates it)."""
    from monai.bundle import ConfigWorkflow

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigWorkflow):
            return candidate
        frame = frame.f_back
    raise SettingsError("cobot_med.bundle.run_steps runs inside a MONAI bundle workflow: python -m monai.bundle "
                        "run training --config_file bundles/adome.json (or cobot_med.bundle.run_bundle)")


def run_on_workflow(layer: Any, run_id: str) -> list[Any]:
    """Run a dataset layer that MONAI read alone on ``common.json``: a new workflow of ``common.json`` with
    everything the layer's workflow holds on top (the layer's settings, then the user's overrides, as the
    layered command line merges them), run from its ``initialize`` to its ``finalize``."""
    from monai.bundle import ConfigWorkflow

    on_top = {key: value for key, value in layer.parser.get().items() if key != META}
    check_keys(on_top, where="the dataset layer and its overrides")
    said = logging.getLogger("monai.bundle.workflows")
    level = said.level
    said.setLevel(logging.WARNING)  # MONAI said which logging file it applies when it read the layer
    try:
        workflow = ConfigWorkflow(config_file=str(workflow_file()), meta_file=layer.meta_file,
                                  workflow_type=layer.workflow_type, init_id=layer.init_id, run_id=run_id,
                                  final_id=layer.final_id)
    finally:
        said.setLevel(level)
    workflow.parser.update(on_top)
    workflow.initialize()
    try:
        return workflow.run()
    finally:
        workflow.finalize()


def workflow_default(key: str) -> Any:
    """A setting's default in the workflow (``bundles/common.json``), as written there."""
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_file(str(workflow_file())).get(key)


def known_keys() -> set[str]:
    """Every top-level id of the workflow (``common.json``): the settings and the parts."""
    from monai.bundle import ConfigParser

    return set(ConfigParser.load_config_file(str(workflow_file()))) | {META}


def check_keys(config: dict[str, Any], where: str = "the run's config") -> None:
    """Refuse a top-level key that is not an id of the workflow and that nothing refers to (``--epoch 2``
    for ``--epochs 2`` would otherwise add an unused id and train 25 epochs), naming the nearest setting.
    A layer of the user's own may add ids that its other keys use (``@my_transform``)."""
    from monai.bundle.reference_resolver import ReferenceResolver

    known = known_keys()
    referenced: set[str] = set()
    _collect_references(config, referenced, ReferenceResolver)
    unknown = sorted(key for key in config if key not in known and key.split("#")[0] not in referenced)
    if not unknown:
        return
    settings = sorted(key for key in known if not key.startswith("_"))
    hints = [f"{key!r}: did you mean {match[0]!r}" for key in unknown
             if (match := difflib.get_close_matches(key, settings, n=1))]
    raise SettingsError(f"unknown setting(s) {unknown} in {where}" + (f" ({'; '.join(hints)})" if hints else "")
                        + "; the settings are the top-level ids of bundles/common.json (README, 'Training on real data')")


def _collect_references(value: Any, found: set[str], resolver: Any) -> None:
    if isinstance(value, str):
        for ref in resolver.match_refs_pattern(value):
            found.add(ref.split("::")[0].split("#")[0])
    elif isinstance(value, dict):
        for item in value.values():
            _collect_references(item, found, resolver)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_references(item, found, resolver)
