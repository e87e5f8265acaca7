"""Helpers the bundles call: device, early checks with clear errors, network, optimiser, tracking names.

Everything a user can get wrong on the command line is checked here, before any data is
read or any weight is loaded, with a message that says what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..model import ModelSpec, build_model
from ..peft import METHODS, count_parameters, parameter_groups
from ..sam.build import ARCHITECTURES, check_image_size, get_architecture
from ..sam.speed import apply_speed_settings, is_compiled

SAM_DOWNLOADS = "https://github.com/facebookresearch/segment-anything#model-checkpoints"


class SettingsError(ValueError):
    """A bundle setting that cannot work, with what to do about it."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: this process's GPU under torchrun, else the first GPU, else the CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def check_model_settings(arch: str, image_size: int | None, peft: str, sam_checkpoint: str | None) -> None:
    if arch not in ARCHITECTURES:
        raise SettingsError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if peft not in METHODS:
        raise SettingsError(f"unknown peft method {peft!r}; choose one of {sorted(METHODS)}")
    spec = get_architecture(arch)
    try:
        check_image_size(spec, int(image_size or spec.default_image_size))
    except (ValueError, TypeError) as err:
        raise SettingsError(str(err)) from None
    if sam_checkpoint:
        if not Path(sam_checkpoint).is_file():
            raise SettingsError(f"sam_checkpoint {sam_checkpoint} does not exist; official files: {SAM_DOWNLOADS}")
    elif spec.official_checkpoint:
        raise SettingsError(
            f"sam_checkpoint is empty, but arch {arch} needs Meta's weights: download {spec.official_checkpoint} "
            f"({SAM_DOWNLOADS}) and pass --sam_checkpoint PATH (only the 'tiny' test arch runs without one)"
        )


def build_network(
    arch: str,
    image_size: int | None,
    peft: str,
    peft_options: Mapping[str, Any] | None = None,
    sam_checkpoint: str | None = None,
    device: torch.device | str = "cpu",
    adapter: str | None = None,
    speed: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """The PEFT-adapted PromptableSam on ``device``, after the early checks.

    With ``adapter``, the model is the adapter's own (its arch, method and input size win
    over the settings, so evaluation and inference need nothing repeated). ``speed``: the
    bundle's speed settings (``cobot_med.sam.speed.apply_speed_settings``; exact switches).
    """
    network = _build_network(arch, image_size, peft, peft_options, sam_checkpoint, device, adapter)
    try:
        return apply_speed_settings(network, dict(speed or {}))
    except ValueError as err:
        raise SettingsError(str(err)) from None


def _build_network(arch, image_size, peft, peft_options, sam_checkpoint, device, adapter) -> torch.nn.Module:
    if adapter:
        from ..adapter import AdapterError, load_adapter

        if sam_checkpoint and not Path(sam_checkpoint).is_file():
            raise SettingsError(f"sam_checkpoint {sam_checkpoint} does not exist; official files: {SAM_DOWNLOADS}")
        try:
            return load_adapter(adapter, sam_checkpoint or None).to(device)
        except AdapterError as err:
            raise SettingsError(str(err)) from None
    check_model_settings(arch, image_size, peft, sam_checkpoint)
    spec = ModelSpec(arch=arch, image_size=image_size, peft=peft, peft_options=dict(peft_options or {}))
    return build_model(spec, sam_checkpoint or None).to(device)


def make_optimizer(
    network: torch.nn.Module, lr: float = 1.25e-6, cobot_lr: float = 1.25e-4, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Adam with the authors' two groups (COBOT's C, R, heads at ``cobot_lr``; the rest at ``lr``)."""
    groups = parameter_groups(network, lr=lr, cobot_lr=cobot_lr, weight_decay=weight_decay)
    if not groups:  # ``frozen``: nothing trains; a dummy group keeps the engine's optimiser step harmless
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.0}]
    return torch.optim.Adam(groups)


def tracking_uri(uri: str | None, output_dir: str | Path) -> str:
    """The given URI, else ``$MLFLOW_TRACKING_URI`` (which MONAI's MLFlowHandler prefers too), else a
    SQLite store under the output folder (MLflow's embedded default)."""
    if uri:
        return str(uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(output_dir).absolute() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def artifact_location(uri: str, output_dir: str | Path) -> str | None:
    """Artifacts beside a local SQLite store; a tracking server keeps its own artifact root."""
    return str(Path(output_dir).absolute() / "mlartifacts") if uri.startswith("sqlite:") else None


def experiment_name(dataset: str) -> str:
    return f"cobot-med/{dataset}"


def run_name(dataset: str, peft: str, arch: str, image_size: int, seed: int) -> str:
    """Deterministic, so a resumed training continues the same (still running) MLflow run."""
    return f"{dataset}-{peft}-{arch}-{image_size}-seed{seed}"


def run_params(network: torch.nn.Module, **settings: Any) -> dict[str, Any]:
    """The MLflow params of a run (docs/CONTRACTS.md): settings, method options, trainable counts."""
    model = getattr(network, "module", network)
    counts = count_parameters(model.sam)
    params = {k: v for k, v in settings.items()}
    params["peft_options"] = json.dumps(model.spec.peft_options, sort_keys=True)
    for key in ("attention", "skip_window_padding", "gradient_checkpointing"):  # as the model runs, not as typed
        if key in params:
            params[key] = getattr(model.spec, key)
    if "compile" in params:
        params["compile"] = is_compiled(model)
    params.update({k: counts[k] for k in ("image_encoder_trainable", "mask_decoder_trainable", "total_trainable")})
    return params


def write_settings(output_dir: str | Path, settings: Mapping[str, Any]) -> Path:
    """The resolved settings of this run as JSON (logged as an MLflow artifact)."""
    import tempfile

    path = Path(output_dir) / "resolved_settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: (v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else str(v)) for k, v in settings.items()}
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".resolved_settings.", delete=False) as tmp:
        tmp.write(json.dumps(plain, indent=2, sort_keys=True))
    os.replace(tmp.name, path)  # atomic: every rank of a distributed run may write it
    return path


def check_data_settings(layout: str, dataset_dir: str, datalist: str | None = None, input_dir: str | None = None) -> None:
    """A missing datalist or dataset folder fails here, saying which layout was expected and where to get it.

    With ``input_dir`` (the ``inference`` run id) no training data is needed and nothing is checked.
    """
    from ..data.layouts import get_layout

    spec = get_layout(layout)
    if input_dir:
        return
    if datalist:
        if not Path(datalist).is_file():
            raise SettingsError(f"datalist {datalist} does not exist (write one with `cobot-med datalist`)")
        return
    if not dataset_dir or not Path(dataset_dir).is_dir():
        raise SettingsError(
            f"dataset_dir {dataset_dir!r} does not exist. The {layout} bundle expects the {spec.title} layout:\n"
            f"{spec.tree}\nGet the data from {spec.source}, or try it on phantoms: "
            f"`cobot-med make-phantoms --layout {layout} --out phantoms/{layout}` then --dataset_dir phantoms/{layout}"
        )


def check_distributed_split(split: Mapping[str, list], world_size: int) -> None:
    """Under torchrun every process evaluates its share of the validation and test cases, and a process
    with none would stall the others' metric gathering: say so before training instead."""
    for name in ("validation", "test"):
        cases = len(split.get(name) or [])
        if 0 < cases < world_size:
            raise SettingsError(
                f"the {name} split has {cases} case(s) but {world_size} processes were started: every process "
                f"needs at least one {name} case; raise val_fraction / test_fraction, give a datalist with more "
                f"{name} cases, or start at most {cases} processes"
            )


def load_best_adapter(network: torch.nn.Module, path: str | Path) -> bool:
    """Load the adapter tensors of ``path`` into ``network`` (built with the same spec); False if absent."""
    from ..adapter import read_adapter_config, resolve_adapter, unwrap
    from safetensors.torch import load_file

    try:
        config = read_adapter_config(path)
    except ValueError:
        return False
    model = unwrap(network)
    if config["model"]["arch"] != model.spec.arch or config["model"]["peft"] != model.spec.peft or int(
        config["model"]["image_size"]
    ) != model.spec.image_size:
        raise SettingsError(
            f"{path}: adapter is {config['model']['arch']}/{config['model']['peft']} at {config['model']['image_size']} px, "
            f"the network is {model.spec.arch}/{model.spec.peft} at {model.spec.image_size} px"
        )
    _, weights = resolve_adapter(path)
    device = next(model.parameters()).device
    model.sam.load_state_dict(load_file(str(weights), device=str(device)), strict=False)
    return True


def _runs(uri: str, experiment: str, name: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"])
    return client, [r for r in runs if r.info.status != "FINISHED"]  # MLFlowHandler reuses FAILED ones too


def finish_run(uri: str, experiment: str, name: str, is_not_rank0: bool = False, output_dir: str | None = None) -> None:
    """Mark the training run finished (tag ``cobot_med.status``), log the final files, close it."""
    if is_not_rank0:
        return
    client, runs = _runs(uri, experiment, name)
    for run in runs[:1]:
        if output_dir:
            for sub in ("adapter_best", "test_predictions"):
                folder = Path(output_dir) / sub
                if folder.is_dir():
                    client.log_artifacts(run.info.run_id, str(folder), artifact_path=sub)
        client.set_tag(run.info.run_id, "cobot_med.status", "finished")
        client.set_terminated(run.info.run_id, "FINISHED")


def close_runs(is_not_rank0: bool = False) -> None:
    """Leave no MLflow run of this process open (MLFlowHandler keeps them open across engines)."""
    import mlflow

    if not is_not_rank0 and mlflow.active_run() is not None:
        mlflow.end_run()


def report_evaluation(evaluator: Any, organs: Mapping[str, int], output_dir: str | Path) -> dict[str, float]:
    """Print the test DSC per organ and write ``evaluation.json``."""
    metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float)) or
               (torch.is_tensor(v) and v.numel() == 1)}
    lines = [f"{'organ':<16} {'3D DSC':>8}"]
    for organ in organs:
        lines.append(f"{organ:<16} {metrics.get(f'test_dsc_{organ}', float('nan')):>8.4f}")
    lines.append(f"{'mean':<16} {metrics.get('test_dsc', float('nan')):>8.4f}")
    lines.append(f"{'pooled slice DSC':<16} {metrics.get('test_slice_dsc', float('nan')):>8.4f}")
    print("\n".join(lines))
    path = Path(output_dir) / "evaluation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def require_adapter(adapter: str | None) -> None:
    """``evaluate`` and ``inference`` score a trained adapter: say so when none is given."""
    if not adapter:
        raise SettingsError(
            "no adapter given: pass --adapter OUTPUT_DIR/adapter_best (the folder or its adapter_model.safetensors)"
        )
