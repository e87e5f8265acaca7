"""Every setting of a bundle run in one object, checked once, at the start.

The defaults live in ``bundles/common.json`` (the dataset bundles override a few; anything can be
overridden MONAI's way, ``--key value``); the bundle builds one :class:`RunSettings` from them and
every part of the workflow reads it. Values may arrive as text from a command line: each field is
converted and checked here (one yes/no parser, numbers that must be finite and in range, names that
must exist), and a bad one raises :class:`~cobot_med.errors.SettingsError` naming the setting and
its value, before any data is read or any weight is loaded. :meth:`RunSettings.check` adds what
depends on the machine (files, folders, device, tracking store) for the run id about to run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from .files import absolute
from .errors import SettingsError
from .flags import as_flag

RUN_IDS = ("training", "evaluate", "inference")
AUTO_ARCH = "auto"
PAPER_ARCH = "vit_b"  # the papers' base: what training starts from unless told otherwise
EMBEDDED_ARCH = "lite_medsam"  # the base whose weights ship with the install


def resolve_arch(arch: str, run_id: str, sam_checkpoint: str = "", adapter_arch: str | None = None) -> str:
    """What ``arch=auto`` (the bundles' default) means for ``run_id``: an adapter's own base; with a
    ``sam_checkpoint``, or for training, the papers' ViT-B; otherwise (scoring or inferring with no weights
    given) LiteMedSAM, whose weights ship with the install. Any other value is itself."""
    if arch != AUTO_ARCH:
        return arch
    if adapter_arch:
        return adapter_arch
    if sam_checkpoint or run_id == "training":
        return PAPER_ARCH
    return EMBEDDED_ARCH
MAX_IMAGE_SIZE = 4096  # 4x SAM's 1024; beyond it the position tables alone take tens of GB


def as_number(name: str, value: Any, kind: type = float, low: float | None = None, high: float | None = None,
              low_open: bool = False) -> Any:
    """``value`` as a finite ``kind`` within [low, high] (``(low, high]`` with ``low_open``), else SettingsError
    naming ``name`` (a setting, or a flag such as ``--seeds``) and the value: the one number check."""
    if isinstance(value, bool):
        raise SettingsError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SettingsError(f"{name} must be a finite number, got {value!r}")
    if kind is int:
        if number != int(number):
            raise SettingsError(f"{name} must be a whole number, got {value!r}")
        number = int(number)
    below = low is not None and (number <= low if low_open else number < low)
    if below or (high is not None and number > high):
        bound = f"{'>' if low_open else '>='} {low}" if low is not None else ""
        bound += (" and " if bound and high is not None else "") + (f"<= {high}" if high is not None else "")
        raise SettingsError(f"{name} must be {bound}, got {value!r}")
    return number


def _text(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, (str, os.PathLike)):
        raise SettingsError(f"{name} must be text (a name or a path), got {value!r}")
    return str(value)


def _choice(name: str, value: Any, choices: Any) -> str:
    text = _text(name, value)
    if text not in choices:
        raise SettingsError(f"unknown {name} {text!r}; choose one of {sorted(choices)}")
    return text


def as_amp(value: Any) -> str:
    """``amp``: ``auto`` (what the device runs fast), true/false, or a dtype name (:mod:`cobot_med.engine.precision`)."""
    from .engine.precision import AMP_SETTINGS, parse_amp

    try:
        return parse_amp(value)
    except ValueError:
        raise SettingsError(f"amp must be one of {list(AMP_SETTINGS)}, got {value!r}") from None


def _optional_flag(name: str, value: Any) -> bool | None:
    return None if value is None else as_flag(value, name, error=SettingsError)


def _auto_or(name: str, value: Any, convert: Any) -> Any:
    """``auto`` (the machine decides: :func:`cobot_med.engine.precision.resolve_speed`) or a value."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("auto", "")):
        return "auto"
    return convert(name, value)


@dataclasses.dataclass
class RunSettings:
    """One bundle run's settings (the bundle's ids of the same names; ``bundles/common.json`` documents each)."""

    # what and where
    dataset: str
    layout: str
    dataset_dir: str
    datalist: str
    output_dir: str
    tracking_uri: str
    device: str
    seed: int
    # the model
    arch: str
    image_size: int | None
    peft: str
    peft_options: dict[str, Any]
    sam_checkpoint: str
    adapter: str
    # data
    modality: str | None
    ct_window: list[float] | None
    jitter: int
    min_area: float
    val_fraction: float
    test_fraction: float
    num_workers: int | str
    threads: int | str
    # training
    epochs: int
    lr: float
    cobot_lr: float
    weight_decay: float
    batch_size: int
    val_interval: int
    val_at_start: bool
    resume: bool
    overwrite: bool
    # speed (exact switches; None: the model's own choice) and evaluation
    amp: str
    attention: str | None
    skip_window_padding: bool | None
    gradient_checkpointing: str | None
    compile: bool | str
    merge_adapters: bool
    eval_batch_size: int | str  # a size, or "auto" (slice_batch decides per device and model)
    # evaluation prompt protocols (cobot_med.predict.protocols, docs/evaluation.md)
    prompts: list[str]  # the test split's protocols, names as given, tight first
    select_prompts: str  # the protocol validation keeps the best adapter by (tight: val_dsc, the papers')
    # inference (the ``inference`` run id and ``cobot-med infer``)
    input_dir: str
    labels_dir: str
    boxes_file: str
    infer_organs: str
    probability_maps: bool
    nsd_tolerance_mm: float
    drop_unusable_organs: bool
    # what runs the model (cobot_med.export): torch, onnxruntime, openvino or auto; an exported model's folder
    backend: str = "torch"
    exported_model: str = ""
    dicom_seg: bool = False  # inference: also a DICOM-SEG of each DICOM series' segmentation (cobot_med.dicom_seg)
    # how a key slice reaches the rest of the volume (cobot_med.predict.volume.PROPAGATORS, docs/inference.md)
    propagator: str = "boxes"

    def __post_init__(self) -> None:
        from .data.layouts import LAYOUTS
        from .peft import METHODS
        from .sam.build import ARCHITECTURES

        if not self.layout:
            raise SettingsError("layout is empty: run a dataset bundle, e.g. python -m monai.bundle run training "
                                "--config_file bundles/adome.json")
        self.layout = _choice("layout", self.layout, LAYOUTS)
        self.dataset = _text("dataset", self.dataset) or self.layout
        for name in ("dataset_dir", "datalist", "output_dir", "tracking_uri", "sam_checkpoint", "adapter",
                     "input_dir", "labels_dir", "boxes_file", "infer_organs", "exported_model"):
            setattr(self, name, _text(name, getattr(self, name)))
        self.device = _text("device", self.device) or "auto"
        self.seed = as_number("seed", self.seed, int, 0)
        self.arch = _choice("arch", self.arch or AUTO_ARCH, {*ARCHITECTURES, AUTO_ARCH})
        if self.arch == AUTO_ARCH and self.sam_checkpoint and not self.adapter:
            self.arch = PAPER_ARCH  # whatever the run id: resolve_arch
        self.peft = _choice("peft", self.peft, METHODS)
        if self.image_size in (None, "", "none", "None"):
            self.image_size = None
        else:
            self.image_size = as_number("image_size", self.image_size, int, 1, MAX_IMAGE_SIZE)
        self._check_image_size()
        if isinstance(self.peft_options, str):
            try:
                self.peft_options = json.loads(self.peft_options or "{}")
            except json.JSONDecodeError as err:
                raise SettingsError(f"peft_options must be a JSON object, got {self.peft_options!r} ({err})") from None
        if not isinstance(self.peft_options, Mapping):
            raise SettingsError(f"peft_options must be a mapping of method options, got {self.peft_options!r}")
        self.peft_options = dict(self.peft_options)
        try:
            METHODS[self.peft].make_config(self.peft_options)
        except (TypeError, ValueError) as err:
            raise SettingsError(f"peft_options for {self.peft}: {err}") from None

        if self.modality not in (None, ""):
            self.modality = _choice("modality", str(self.modality).upper(), ("CT", "MR"))
        else:
            self.modality = None
        if self.ct_window not in (None, ""):
            window = self.ct_window
            if isinstance(window, str):
                window = [part for part in window.strip("[]() ").replace(",", " ").split() if part]
            if not isinstance(window, (list, tuple)) or len(window) != 2:
                raise SettingsError(f"ct_window must be [low, high] in HU, got {self.ct_window!r}")
            low, high = (as_number("ct_window", v) for v in window)
            if not low < high:
                raise SettingsError(f"ct_window must be [low, high] with low < high, got {self.ct_window!r}")
            self.ct_window = [low, high]
        else:
            self.ct_window = None
        self.jitter = as_number("jitter", self.jitter, int, 0, 10_000)
        self.min_area = as_number("min_area", self.min_area, float, 0)
        self.val_fraction = as_number("val_fraction", self.val_fraction, float, 0, 0.99)
        self.test_fraction = as_number("test_fraction", self.test_fraction, float, 0, 0.99)
        if self.val_fraction + self.test_fraction >= 1:
            raise SettingsError(f"val_fraction {self.val_fraction} + test_fraction {self.test_fraction} must leave "
                                "cases to train on (sum < 1)")
        self.num_workers = _auto_or("num_workers", self.num_workers, lambda n, v: as_number(n, v, int, 0, 256))
        self.threads = _auto_or("threads", self.threads, lambda n, v: as_number(n, v, int, 1, 1024))

        self.epochs = as_number("epochs", self.epochs, int, 1)
        self.lr = as_number("lr", self.lr, float, 0, 1, low_open=True)
        self.cobot_lr = as_number("cobot_lr", self.cobot_lr, float, 0, 1, low_open=True)
        self.weight_decay = as_number("weight_decay", self.weight_decay, float, 0, 1)
        self.batch_size = as_number("batch_size", self.batch_size, int, 1, 4096)
        self.val_interval = as_number("val_interval", self.val_interval, int, 1)
        for name in ("val_at_start", "resume", "overwrite", "merge_adapters", "probability_maps",
                     "drop_unusable_organs", "dicom_seg"):
            setattr(self, name, as_flag(getattr(self, name), name, error=SettingsError))

        self.amp = as_amp(self.amp)
        from .sam.attention import KINDS
        from .sam.speed import CHECKPOINT_CHOICES

        if self.attention not in (None, ""):
            self.attention = _choice("attention", self.attention, KINDS)
        else:
            self.attention = None
        self.skip_window_padding = _optional_flag("skip_window_padding", self.skip_window_padding)
        if self.gradient_checkpointing not in (None, ""):
            self.gradient_checkpointing = _choice("gradient_checkpointing", self.gradient_checkpointing,
                                                  CHECKPOINT_CHOICES)
        else:
            self.gradient_checkpointing = None
        self.compile = _auto_or("compile", self.compile, lambda n, v: as_flag(v, n, error=SettingsError))
        self.eval_batch_size = _auto_or("eval_batch_size", self.eval_batch_size,
                                        lambda n, v: as_number(n, v, int, 1, 4096))
        self.nsd_tolerance_mm = as_number("nsd_tolerance_mm", self.nsd_tolerance_mm, float, 0, 1000, low_open=True)
        from .predict.protocols import TIGHT, parse_protocol, parse_protocols

        self.prompts = [p.name for p in parse_protocols(self.prompts, "prompts")]
        self.select_prompts = parse_protocol(self.select_prompts or TIGHT, "select_prompts").name

        from .export.backend import BACKENDS

        self.backend = _choice("backend", self.backend or "torch", BACKENDS)
        from .predict.volume import PROPAGATORS

        self.propagator = _choice("propagator", self.propagator or "boxes", PROPAGATORS)
        wanted = [n for n in self.infer_organs.replace(" ", ",").split(",") if n]
        unknown = [n for n in wanted if n not in self.organs]
        if unknown:
            raise SettingsError(f"unknown organs {unknown}; the {self.layout} label map has {list(self.organs)}")

    def _check_image_size(self) -> None:
        from .sam.build import check_image_size, get_architecture

        if self.image_size is not None and self.arch != AUTO_ARCH:
            try:
                check_image_size(get_architecture(self.arch), self.image_size)
            except ValueError as err:
                raise SettingsError(str(err)) from None

    def check_propagator(self) -> None:
        """``sam2_memory`` runs SAM 2's video predictor: a SAM 2 base (a Hiera arch) on torch, nothing else."""
        from .predict.volume import MEMORY

        if self.propagator != MEMORY:
            return
        if self.exported_model or self.backend != "torch":
            raise SettingsError(f"propagator {MEMORY} runs SAM 2's video predictor in torch; an exported model "
                                f"(backend {self.backend}) has no memory path: use backend torch, or propagator boxes")
        from .sam.build import get_architecture

        if self.arch != AUTO_ARCH and get_architecture(self.arch).encoder != "hiera":
            raise SettingsError(f"propagator {MEMORY} needs a SAM 2 base (arch sam2.1_hiera_t/s/b+/l or medsam2); "
                                f"arch {self.arch} has no memory: use propagator boxes")

    def resolve_arch(self, run_id: str) -> str:
        """Settle ``arch=auto`` for ``run_id`` (:func:`resolve_arch`); says so in one line when it picks the
        embedded LiteMedSAM base for a run that was given no weights."""
        adapter_arch = None
        if self.adapter:  # the adapter's own model runs: a flag that says otherwise is refused, not ignored
            from .adapter import read_adapter_config

            spec = read_adapter_config(self.adapter)["spec"]
            adapter_arch = spec.arch
            if self.arch not in (AUTO_ARCH, spec.arch):
                raise SettingsError(f"arch {self.arch} does not apply: the adapter {self.adapter} was trained on "
                                    f"{spec.arch}; leave --arch out")
            if self.image_size not in (None, int(spec.image_size)):
                raise SettingsError(f"image_size {self.image_size} does not apply: the adapter {self.adapter} was "
                                    f"trained at {spec.image_size} px; leave --image_size out")
            self.image_size = int(spec.image_size)
            self._take_adapter_method(spec)
        if self.arch != AUTO_ARCH:
            return self.arch
        self.arch = resolve_arch(self.arch, run_id, self.sam_checkpoint, adapter_arch)
        if self.arch == EMBEDDED_ARCH:
            import sys

            print(f"cobot-med: no sam_checkpoint and no adapter given: {run_id} runs the LiteMedSAM base that ships "
                  "with the install (arch lite_medsam); pass --arch and --sam_checkpoint for another base",
                  file=sys.stderr, flush=True)
        self._check_image_size()
        return self.arch

    def _take_adapter_method(self, spec: Any) -> None:
        """An adapter runs (and trains further) as the method it was trained with: ``peft`` and ``peft_options``
        become its own, so what a run records (``resolved_settings.json``, the resume identity) is what ran. A
        ``peft`` other than the bundles' default, or ``peft_options``, that say otherwise are refused by name."""
        from .bundle import workflow_default

        if self.peft != spec.peft:
            if self.peft != workflow_default("peft"):
                raise SettingsError(f"peft {self.peft} does not apply: the adapter {self.adapter} was trained with "
                                    f"{spec.peft} and runs as it; leave --peft out")
        if self.peft_options:  # compared as the method reads them (defaults filled in)
            from .peft import METHODS

            try:
                given = METHODS[spec.peft].make_config(self.peft_options).to_dict()
            except (TypeError, ValueError):
                given = None
            if given != METHODS[spec.peft].make_config(spec.peft_options).to_dict():
                raise SettingsError(f"peft_options {self.peft_options} do not apply: the adapter {self.adapter} was "
                                    f"trained with {spec.peft_options}; leave --peft_options out")
        self.peft, self.peft_options = spec.peft, dict(spec.peft_options)

    # --- what the parts of the workflow read ---------------------------------------------------

    @property
    def layout_spec(self):
        from .data.layouts import get_layout

        return get_layout(self.layout)

    @property
    def organs(self) -> dict[str, int]:
        return dict(self.layout_spec.organs)

    @property
    def organ_ids(self) -> list[int]:
        return list(self.organs.values())

    @property
    def effective_modality(self) -> str:
        return self.modality or self.layout_spec.modality

    @property
    def output_path(self) -> Path:
        return absolute(self.output_dir)

    def speed(self) -> dict[str, Any]:
        """The model's speed switches as given (None: the model's own choice)."""
        return {"attention": self.attention, "skip_window_padding": self.skip_window_padding,
                "gradient_checkpointing": self.gradient_checkpointing}

    def speed_choices(self, device: Any, training: bool, network: Any = None) -> Any:
        """What ``amp``, ``attention``, ``compile``, ``threads`` and ``num_workers`` resolve to on ``device``,
        with the reasons (:func:`cobot_med.engine.precision.resolve_speed`; nothing applied yet). With the
        built ``network``, its own attention setting is resolved (a loaded adapter runs the kind it recorded
        when ``attention`` is not given; ``SpeedChoices.for_model``)."""
        from .engine.precision import resolve_speed

        choices = resolve_speed(device, training, amp=self.amp, attention=self.attention or "auto",
                                compile=self.compile, threads=self.threads, num_workers=self.num_workers)
        return choices if network is None else choices.for_model(network)

    def model_spec(self):
        """The :class:`~cobot_med.model.ModelSpec` of a fresh model of these settings."""
        from .model import ModelSpec

        spec = ModelSpec(arch=self.arch, image_size=self.image_size, peft=self.peft,
                         peft_options=dict(self.peft_options), recipe=self.recipe_overrides())
        for key in ("attention", "skip_window_padding", "gradient_checkpointing"):
            if getattr(self, key) is not None:
                setattr(spec, key, getattr(self, key))
        return spec

    def recipe_overrides(self) -> dict[str, Any]:
        """What the settings change in the base model's input recipe: the CT window, when one is given."""
        return {"ct_window": list(self.ct_window)} if self.ct_window else {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def slice_batch(self, device: Any, network: Any = None) -> int:
        """Slices per model call in validation, test and inference: ``eval_batch_size``, or with ``auto`` what
        measured fastest for the base model on the device. 1 for LiteMedSAM on a CPU: its TinyViT's stage-1
        activations (64 channels at 256 x 256 per slice) are memory bound and a batch makes each slice slower
        (bf16 0.82 s per slice at 1 against 1.11 s at 8, fp32 1.12 against 1.37; whole-volume inference 4.51x
        LiteMedSAM's own way at 1 against 3.18x at 8; BENCHMARKS.md). Measured on an AVX-512 BF16/AMX CPU only;
        the fp32 figures suggest the same on AVX2 CPUs, not measured there. 8 otherwise (SAM's ViTs gain from
        batches)."""
        if self.eval_batch_size != "auto":
            return int(self.eval_batch_size)
        arch = self.arch
        if network is not None:  # an adapter's own arch wins over the setting
            from .adapter import unwrap

            try:
                arch = getattr(unwrap(network).spec, "arch", arch)
            except TypeError:  # a module that is not PromptableSam (a test's stand-in): the setting's arch
                pass
        import torch

        return 1 if arch == "lite_medsam" and torch.device(device).type == "cpu" else 8

    # --- what depends on the machine, checked before any work -----------------------------------

    @property
    def trains(self) -> bool:
        """Whether the run trains (what the bundle's speed choices resolve for): False once checked for
        ``evaluate`` or ``inference`` (:meth:`check`, each run id's first step), True otherwise."""
        return getattr(self, "checked_for", "training") == "training"

    def check(self, run_id: str = "training") -> "RunSettings":
        """Files, folders, device and tracking store for ``run_id``; returns self. Raises SettingsError."""
        from .engine import checks

        if run_id not in RUN_IDS:
            raise SettingsError(f"unknown run id {run_id!r}; the bundles have {list(RUN_IDS)}")
        self.checked_for = run_id
        checks.check_device(self.device)
        if self.adapter and not Path(self.adapter).exists():
            checks.check_model_files(self)  # names the missing adapter before arch=auto reads its config
        if self.exported_model:  # it brings its own weights; a run that asks for another model is refused
            from .export.manifest import check_run, read_export

            check_run(read_export(self.exported_model, verify=False), self)
        else:
            self.resolve_arch(run_id)
            checks.check_model_files(self)
        self.check_propagator()
        if run_id == "training":
            if self.peft == "frozen":
                raise SettingsError(f"peft frozen trains nothing (the base model as it is): score it with the evaluate "
                                    f"run id instead, python -m monai.bundle run evaluate --config_file "
                                    f"bundles/{self.layout}.json --peft frozen ...")
            checks.check_data(self)
            checks.check_output_dir(self.output_path)
        elif run_id == "evaluate":
            if not self.adapter and self.peft != "frozen" and not self.exported_model:
                raise SettingsError("no adapter given: pass --adapter OUTPUT_DIR/adapter_best (the folder or its "
                                    "adapter_model.safetensors), or --peft frozen to score the base model zero-shot")
            checks.check_data(self)
            checks.check_output_dir(self.output_path)
        else:
            checks.check_inference(self)
        if run_id != "inference":
            from .engine.tracking import check_tracking_uri, resolve_tracking_uri

            check_tracking_uri(resolve_tracking_uri(self.tracking_uri, self.output_path))
        from .lock import acquire

        acquire(self.output_path, run_id)  # one writer for the run's life, before anything is written there
        return self


def load_settings(dataset: str = "adome", *, workflow_imports: bool = True, **overrides: Any) -> RunSettings:
    """The settings a bundle run of ``dataset`` (a name or config layers) has with ``overrides``: the bundles'
    own defaults, checked as in a run (for code that runs parts of the workflow outside a bundle).
    ``workflow_imports=False`` leaves out the workflow's ``imports`` (the training engine, MLflow, ignite): the
    settings alone, for ``cobot-med infer --model`` (an exported model runs without the training stack)."""
    from monai.bundle import ConfigParser

    from .bundle import config_files

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files(dataset)])
    parser.update({k: v for k, v in overrides.items()})
    if not workflow_imports:
        parser["imports"] = []
    try:
        return parser.get_parsed_content("settings")
    except Exception as err:  # MONAI wraps what the settings raise
        from .errors import find_in_chain

        ours = find_in_chain(err, SettingsError)
        if ours is None:
            raise
        raise ours from None
