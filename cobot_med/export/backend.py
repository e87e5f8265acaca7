"""``backend``: what runs a run's model, ``torch``, ``onnxruntime``, ``openvino`` or ``auto``.

:func:`load_backend` is called by :func:`cobot_med.inference.load_network` (``cobot-med infer``, the MONAI Label
app) and :func:`cobot_med.engine.network.build_network` (``evaluate``) before they build a torch model; it returns
an :class:`~.runtime.ExportedSam` and its description, or None when torch runs the model. The network then goes
into the same :class:`cobot_med.predict.SlicePredictor` as a torch model.

- ``exported_model`` (``--model DIR``): that export, checked against the run (:func:`.manifest.check_run`), on
  ``onnxruntime`` or ``openvino`` (``auto``: the faster of the installed ones, measured). This path imports
  neither the model code nor the training stack.
- No ``exported_model``: the run's model (the base, or ``--adapter``'s) is exported on first use into the cache,
  ``cache_dir()/exports/<arch>-<size>-<method>-<key>`` (``~/.cache/cobot-med`` or ``$COBOT_MED_CACHE_DIR``), keyed
  by the SHA-256 of the base checkpoint and the adapter weights, the recipe, the method and the exporter's
  versions; written atomically, so parallel processes never read half an export.
- ``auto``: on a GPU, torch; else the fastest of torch and the installed runtimes for this machine, precision and
  model, by a short measurement (one slice with 4 boxes through the slice predictor, best of 2 after a warm-up),
  cached per machine in ``cache_dir()/backend.json`` with the times, as ``amp=auto`` caches its check; the choice
  and its reason are printed and recorded in ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import SettingsError
from .manifest import MANIFEST, ExportError, check_run, read_export
from .runtime import RUNTIMES, ExportedSam, import_runtime, runtime_available, runtime_precision

BACKENDS = ("torch", "onnxruntime", "openvino", "auto")
CACHE_FILE = "backend.json"
MEASURE_BOXES = 4


def _say(message: str) -> None:
    print(f"cobot-med: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    from ..engine.precision import cache_dir

    return cache_dir() / "exports"


def _runtime_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for package in (*RUNTIMES.values(), "onnx"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


# ---- the model a run asks for, and its export ---------------------------------------------------------------


def _run_model(settings: Any) -> dict[str, Any]:
    """Arch, input size and method of the run's torch model, without building it."""
    if settings.adapter:
        from ..adapter import read_adapter_config

        config = read_adapter_config(settings.adapter)
        spec = config["spec"]
        return {"arch": spec.arch, "image_size": int(spec.image_size), "peft": spec.peft, "config": config}
    from ..sam.build import get_architecture

    arch = settings.arch
    return {"arch": arch, "image_size": int(settings.image_size or get_architecture(arch).default_image_size),
            "peft": "frozen", "config": None}


def _base_file(settings: Any, arch: str) -> Path | None:
    if settings.sam_checkpoint:
        return Path(settings.sam_checkpoint)
    from ..sam.build import default_checkpoint

    return default_checkpoint(arch)


def torch_network(settings: Any, device: Any) -> tuple[Any, dict[str, Any]]:
    """The run's torch model as ``cobot-med infer`` builds it (:func:`cobot_med.inference.load_network`)."""
    from ..inference.runner import load_network

    return load_network(dataclasses.replace(settings, backend="torch", exported_model=""), device)


def cached_export(settings: Any, log: Callable[[str], None] = _say) -> Path:
    """The cache folder holding the run's model exported (ONNX and, where OpenVINO is installed, its IR); exported
    now when it is not there. A base without weights (``tiny``) is keyed by its initialised tensors."""
    from .exporter import export_model

    model = _run_model(settings)
    identity: dict[str, Any] = {"arch": model["arch"], "image_size": model["image_size"], "peft": model["peft"],
                                "ct_window": settings.recipe_overrides().get("ct_window"),
                                "versions": _runtime_versions()}
    built = None
    if model["config"] is not None:
        identity["adapter_weights_sha256"] = model["config"].get("weights_sha256")
        identity["base_checkpoint_sha256"] = model["config"].get("base_checkpoint_sha256")
        if settings.sam_checkpoint:
            from .manifest import sha256

            identity["base_checkpoint_sha256"] = sha256(settings.sam_checkpoint)
    else:
        base = _base_file(settings, model["arch"])
        if base is not None:
            from .manifest import sha256

            identity["base_checkpoint_sha256"] = sha256(base)
        else:  # random weights: what was built is the key
            built, _ = torch_network(settings, "cpu")
            digest = hashlib.sha256()
            for name, tensor in sorted(built.sam.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            identity["weights_sha256"] = digest.hexdigest()
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root() / f"{model['arch']}-{model['image_size']}-{model['peft'].replace('+', '_')}-{key}"
    if (folder / MANIFEST).is_file():
        try:
            read_export(folder)
            return folder
        except ExportError as err:  # a damaged cache entry is made again
            log(f"the cached export {folder} is unusable ({err}); exporting again")
    if built is None:
        built, _ = torch_network(settings, "cpu")
    formats = ["onnx"] + (["openvino"] if runtime_available("openvino") else [])
    log(f"exporting {model['arch']}/{model['peft']} into the cache {folder} (once; {', '.join(formats)})")
    adapter = None
    if model["config"] is not None:
        from ..files import absolute

        adapter = {"path": str(absolute(settings.adapter)), "weights_sha256": model["config"].get("weights_sha256")}
    try:
        export_model(built, folder, formats, adapter=adapter, overwrite=True, extra={"cache_key": identity})
    except FileExistsError:  # another process renamed its export into place first
        pass
    except OSError:
        if not (folder / MANIFEST).is_file():
            raise
    return folder


# ---- auto: measured, cached per machine ---------------------------------------------------------------------


def _measure(network: Any, device: Any, precision: Any, image_size: int) -> float:
    """Seconds for one slice with :data:`MEASURE_BOXES` boxes through the slice predictor (best of 2)."""
    import torch

    from ..predict import SlicePredictor

    generator = torch.Generator().manual_seed(0)
    side = max(image_size, 256)
    volume = torch.rand(side, side, 1, generator=generator) * 255
    boxes = torch.tensor([[x, y, x + side // 5, y + side // 5] for x, y in
                          ((side // 8, side // 8), (side // 2, side // 8), (side // 8, side // 2),
                           (side // 2, side // 2))][:MEASURE_BOXES], dtype=torch.float32)[None]
    present = torch.ones(1, boxes.shape[1], dtype=torch.bool)
    predictor = SlicePredictor(network, device, 1, precision)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        predictor(volume, [0], boxes, present)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    from ..files import write_json

    try:
        write_json(path, data)  # atomic: parallel processes may measure at once
    except OSError as err:
        _say(f"could not write the backend cache {path} ({err}); it will be measured again")


def measurement_key(model: dict[str, Any], amp: str, candidates: list[str]) -> str:
    from ..engine.precision import cpu_info

    versions = _runtime_versions()
    runtimes = ",".join(f"{b} {versions.get(RUNTIMES[b], '?')}" for b in candidates if b != "torch")
    return (f"{cpu_info().cache_key()} | {model['arch']} {model['image_size']} px {model['peft']} | amp {amp} | "
            f"{'/'.join(candidates)} | {runtimes}")


def choose_backend(settings: Any, device: Any, candidates: list[str], model: dict[str, Any],
                   networks: Callable[[str], Any]) -> tuple[str, str]:
    """The fastest of ``candidates`` for this machine and model, and why (measured once, cached per machine)."""
    from ..engine.precision import cache_dir

    if len(candidates) == 1:
        return candidates[0], f"{candidates[0]}: the only backend installed (pip install 'cobot-med[infer]' adds " \
                              "onnxruntime and openvino)"
    path = cache_dir() / CACHE_FILE
    key = measurement_key(model, settings.amp, candidates)
    cache = _read_cache(path)
    entry = cache.get(key)
    cached = isinstance(entry, dict) and isinstance(entry.get("seconds"), dict) and all(
        isinstance(entry["seconds"].get(b), (int, float)) for b in candidates)
    if not cached:
        _say(f"backend=auto: measuring {', '.join(candidates)} on one slice (once per machine and model)")
        seconds = {}
        for backend in candidates:
            network, precision = networks(backend)
            seconds[backend] = round(_measure(network, device, precision, model["image_size"]), 4)
        entry = {"seconds": seconds, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        cache[key] = entry
        _write_cache(path, cache)
    seconds = entry["seconds"]
    best = min(candidates, key=lambda b: seconds[b])
    others = ", ".join(f"{b} {seconds[b]:.3g}" for b in candidates if b != best)
    return best, (f"{best}: measured fastest here, {seconds[best]:.3g} s per slice with {MEASURE_BOXES} boxes against "
                  f"{others} ({'cached ' if cached else ''}{entry.get('measured', '')}, {path})")


# ---- what a run loads ---------------------------------------------------------------------------------------


def describe_exported(network: ExportedSam, backend_reason: str, precision_reason: str) -> dict[str, Any]:
    exported = network.exported
    adapter = exported.manifest.get("adapter") or {}
    return {"adapter": adapter.get("path"), "adapter_weights_sha256": adapter.get("weights_sha256"),
            "zero_shot": not adapter, "arch": exported.arch, "peft": exported.peft,
            "image_size": exported.image_size, "base_checkpoint_sha256": exported.manifest.get(
                "base_checkpoint_sha256"), "merged_layers": int(exported.manifest["model"].get("merged_layers", 0)),
            "attention": "exported", "sam_checkpoint": None, "backend": network.backend,
            "backend_reason": backend_reason, "exported_model": str(exported.folder),
            "exported_precision": exported.precision, "precision": network.precision,
            "precision_reason": precision_reason}


def check_backend(settings: Any, device: Any) -> None:
    """Refuse what cannot work before anything is loaded: a runtime backend on a GPU device (the runtimes here run
    on the CPU), an exported model with ``backend=torch``, a runtime that is not installed."""
    import torch

    backend = settings.backend
    if settings.exported_model and backend == "torch":
        raise SettingsError("backend torch runs the torch model; an exported model (--model) runs on onnxruntime or "
                            "openvino: pass --backend onnxruntime, openvino or auto")
    if backend in RUNTIMES:
        if torch.device(device).type != "cpu":
            raise SettingsError(f"backend {backend} runs on the CPU here; pass --device cpu, or --backend torch "
                                f"for {device}")
        import_runtime(backend)


def load_backend(settings: Any, device: Any, log: Callable[[str], None] = _say) -> tuple[Any, dict[str, Any]] | None:
    """The run's network on its backend and its description, or None when torch runs it (see the module)."""
    import torch

    from ..engine.precision import plan_threads

    check_backend(settings, device)
    backend = settings.backend
    if backend == "torch":
        return None
    auto = backend == "auto"
    if _is_sam2(settings):  # not exported (docs/sam2.md): torch runs it, or the explicit choice is refused
        if auto:
            settings.backend_reason = "torch: SAM 2 bases are not exported (docs/sam2.md)"
            return None
        from .manifest import ExportError

        raise ExportError(f"backend {backend}: SAM 2 bases ({settings.arch}) are not exported (their decoder also "
                          "reads the encoder's high-resolution levels; docs/sam2.md); use --backend torch")
    if auto and torch.device(device).type != "cpu":
        return None  # the runtimes here run on the CPU
    candidates = ([] if settings.exported_model else ["torch"]) + [b for b in RUNTIMES if runtime_available(b)]
    if auto and not candidates:
        from .manifest import RuntimeMissing

        raise RuntimeMissing("backend auto with an exported model needs onnxruntime or openvino; install them with "
                             "pip install 'cobot-med[infer]'")
    if auto and candidates == ["torch"]:
        settings.backend_reason = ("torch: the only backend installed (pip install 'cobot-med[infer]' adds "
                                   "onnxruntime and openvino)")
        return None
    threads = plan_threads(device, settings.threads, 0).torch_threads

    def exported_folder() -> Path:
        return Path(settings.exported_model) if settings.exported_model else cached_export(settings, log)

    if auto:
        model = (_exported_model_kind(settings) if settings.exported_model else _run_model(settings))
        built: dict[str, Any] = {}

        def networks(name: str):
            if name == "torch":
                network, _ = torch_network(settings, device)
                return network, settings.speed_choices(device, training=False).precision
            if "exported" not in built:
                built["exported"] = read_export(exported_folder())
                check_run(built["exported"], settings)
            precision, _ = runtime_precision(name, settings.amp, built["exported"])
            return ExportedSam(built["exported"], name, precision, threads), False

        backend, backend_reason = choose_backend(settings, device, candidates, model, networks)
        if backend == "torch":
            settings.backend_reason = backend_reason
            return None
    else:
        backend_reason = f"{backend} (explicit)"
    exported = read_export(exported_folder())
    check_run(exported, settings)
    precision, precision_reason = runtime_precision(backend, settings.amp, exported)
    network = ExportedSam(exported, backend, precision, threads)
    info = describe_exported(network, backend_reason, precision_reason)
    log(f"model: exported {exported.arch}/{exported.peft} at {exported.image_size} px from {exported.folder}; "
        f"backend {backend_reason}; precision {precision_reason}; {threads} threads")
    return network, info


def _is_sam2(settings: Any) -> bool:
    from ..sam.build import ARCHITECTURES

    arch = ARCHITECTURES.get(getattr(settings, "arch", None))
    return arch is not None and arch.encoder == "hiera" and not settings.exported_model


def _exported_model_kind(settings: Any) -> dict[str, Any]:
    exported = read_export(settings.exported_model, verify=False)
    return {"arch": exported.arch, "image_size": exported.image_size,
            "peft": exported.peft + ("/int8" if exported.precision == "int8" else ""), "config": None}


def clear_cache() -> None:
    """Remove every cached export (tests)."""
    shutil.rmtree(cache_root(), ignore_errors=True)
