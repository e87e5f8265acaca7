"""How long a reproduction takes on this machine: measured model throughput times counted slices.

- :func:`measure_throughput` builds the run's network as the bundle does (same settings, device, precision,
  attention, threads; random base weights, which do not change the speed) and times real training steps (the
  trainer's: forward with K box prompts, Dice + BCE, backward, Adam step) and whole-volume prediction (the
  evaluator's ``SlicePredictor`` on a synthetic volume), after one warm-up each. Measurements are cached per
  machine and setting in ``$COBOT_MED_CACHE_DIR/throughput.json`` (:func:`cobot_med.engine.precision.cache_dir`).
- :func:`count_slices` counts, from the label files, the slices a run trains on per epoch (an organ above the
  area threshold, as ``SliceDataset`` indexes them) and the slices validation and test predict (any organ
  pixel); above ``sample`` cases per split it counts a seeded sample and scales it, and says so.
- :func:`run_hours`: ``epochs x (train slices x s/step + validation slices x s/slice) + test slices x s/slice``.
  Data loading, caching and writing predictions are not counted (the loader is 25-170x faster than the model,
  BENCHMARKS.md); every figure it gives is an estimate and is printed as one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

CACHE_FILE = "throughput.json"
SLICE_CACHE_FILE = "slice_counts.json"
DEFAULT_SLICE_SHAPE = (512, 512)  # a CT slice, when no data is there to say


@dataclasses.dataclass
class Throughput:
    """Measured speed of one (arch, input size, method) on one device: seconds per training step (one slice
    with ``organs`` boxes) and per predicted slice (batches of ``eval_batch``)."""

    arch: str
    image_size: int
    peft: str
    organs: int
    device: str
    precision: str
    train_s_per_step: float | None  # None for a method that trains nothing (frozen)
    train_steps_timed: int
    eval_s_per_slice: float
    eval_batch: int
    eval_slice_shape: tuple[int, int]
    measured_at: str
    cached: bool = False

    def said(self) -> str:
        train = (f"{self.train_s_per_step:.3g} s per training step ({self.train_steps_timed} timed after a warm-up)"
                 if self.train_s_per_step is not None else "no training step")
        when = f"cached from {self.measured_at}" if self.cached else "measured now"
        return (f"{self.peft}: {train}, {self.eval_s_per_slice:.3g} s per predicted slice (batches of "
                f"{self.eval_batch}, {self.eval_slice_shape[0]}x{self.eval_slice_shape[1]} slices); {when}")


@dataclasses.dataclass
class SliceCounts:
    """Per split: slices trained on per epoch (``train``) and predicted (``predict``), for all of the split's
    cases (scaled from ``counted`` of ``cases`` when sampled); the median slice shape."""

    train: dict[str, float]
    predict: dict[str, float]
    counted: dict[str, int]
    cases: dict[str, int]
    slice_shape: tuple[int, int]

    @property
    def sampled(self) -> bool:
        return any(self.counted[s] < self.cases[s] for s in self.cases)

    def said(self) -> str:
        parts = [f"{s}: {self.cases[s]} case{'s' if self.cases[s] != 1 else ''}, {self.train[s]:.0f} training / {self.predict[s]:.0f} predicted slices"
                 + (f" (counted on {self.counted[s]}, scaled)" if self.counted[s] < self.cases[s] else "")
                 for s in ("training", "validation", "test") if s in self.cases]
        return "; ".join(parts)


# --- slices -----------------------------------------------------------------------------------------------


def _label_volume(label: str | Sequence[str], organ_ids: Sequence[int]):
    """A label file (or per-organ files, in organ order) as (X, Y, Z) numpy with Z the axial axis."""
    import nibabel as nib
    import numpy as np

    files = [label] if isinstance(label, (str, Path)) else list(label)
    first = nib.load(str(files[0]))
    axis = next(i for i, code in enumerate(nib.aff2axcodes(first.affine)) if code in ("S", "I"))
    if len(files) == 1:
        data = np.asanyarray(first.dataobj)
    else:
        data = np.zeros(first.shape[:3], np.int16)
        for organ_id, path in zip(organ_ids, files):
            data[np.asanyarray(nib.load(str(path)).dataobj) > 0] = organ_id
    data = np.squeeze(data)
    return np.moveaxis(data, axis, -1)


def _case_slices(label: Any, organ_ids: Sequence[int], min_area: float) -> tuple[int, int, tuple[int, int]]:
    from ..data.slices import organ_area_threshold

    data = _label_volume(label, organ_ids)
    threshold = organ_area_threshold(min_area, data.shape[0], data.shape[1])
    areas = [(data == i).sum(axis=(0, 1)) for i in organ_ids]
    train = int(sum(1 for z in range(data.shape[2]) if any(a[z] > threshold for a in areas)))
    predict = int(sum(1 for z in range(data.shape[2]) if any(a[z] > 0 for a in areas)))
    return train, predict, (int(data.shape[0]), int(data.shape[1]))


def count_slices(split: dict[str, list[dict]], organ_ids: Sequence[int], min_area: float = 100, *, sample: int = 40,
                 seed: int = 0, progress: bool = True, use_cache: bool = True) -> SliceCounts:
    """Count training and predicted slices per split from the label files (see the module docstring)."""
    import random

    from tqdm import tqdm

    key = _slice_key(split, organ_ids, min_area, sample, seed)
    cache = _read(_cache_path(SLICE_CACHE_FILE))
    if use_cache and key in cache:
        entry = cache[key]
        return SliceCounts(entry["train"], entry["predict"], entry["counted"], entry["cases"],
                           tuple(entry["slice_shape"]))
    train, predict, counted, cases, shapes = {}, {}, {}, {}, []
    todo = []
    for name, items in split.items():
        chosen = list(items)
        if len(chosen) > sample:
            chosen = random.Random(seed).sample(chosen, sample)
        cases[name], counted[name] = len(items), len(chosen)
        todo += [(name, item) for item in chosen]
    sums = {name: [0, 0] for name in split}
    for name, item in tqdm(todo, desc="counting slices in the label files", unit=" cases", disable=not progress,
                           dynamic_ncols=True, file=sys.stderr):
        t, p, shape = _case_slices(item["label"], organ_ids, min_area)
        sums[name][0] += t
        sums[name][1] += p
        shapes.append(shape)
    for name in split:
        scale = cases[name] / counted[name] if counted[name] else 0.0
        train[name], predict[name] = sums[name][0] * scale, sums[name][1] * scale
    shapes.sort(key=lambda s: s[0] * s[1])
    shape = shapes[len(shapes) // 2] if shapes else DEFAULT_SLICE_SHAPE
    counts = SliceCounts(train, predict, counted, cases, tuple(shape))
    cache[key] = {**dataclasses.asdict(counts), "counted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write(_cache_path(SLICE_CACHE_FILE), cache)
    return counts


def _slice_key(split: dict[str, list[dict]], organ_ids: Sequence[int], min_area: float, sample: int, seed: int) -> str:
    digest = hashlib.sha256()
    for name in sorted(split):
        for item in split[name]:
            for path in ([item["label"]] if isinstance(item["label"], (str, Path)) else item["label"]):
                try:
                    stat = os.stat(path)
                    digest.update(f"{name}|{path}|{stat.st_size}|{int(stat.st_mtime)}".encode())
                except OSError:
                    digest.update(f"{name}|{path}|missing".encode())
    digest.update(json.dumps([list(organ_ids), min_area, sample, seed]).encode())
    return digest.hexdigest()


# --- throughput -------------------------------------------------------------------------------------------


def _cache_path(name: str) -> Path:
    from ..engine.precision import cache_dir

    return cache_dir() / name


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict) -> None:
    from ..files import write_json

    try:
        write_json(path, data)
    except OSError:  # a cache that cannot be written is measured again next time
        pass


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine(device) -> str:
    import torch

    from ..engine.precision import cpu_info

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} | torch {torch.__version__}"
    return cpu_info().cache_key()


def measure_throughput(dataset: str, arch: str, image_size: int | None, peft: str, device: str = "auto", *,
                       overrides: dict[str, Any] | None = None, slice_shape: tuple[int, int] = DEFAULT_SLICE_SHAPE,
                       budget_s: float = 20.0, max_steps: int = 3, use_cache: bool = True,
                       log: Callable[[str], None] = print) -> Throughput:
    """Time ``peft`` on ``arch`` at ``image_size`` as a ``dataset`` bundle run would, with the runs' other bundle
    ``overrides`` (threads, amp, attention, ...), see the module docstring.

    Training: one warm-up step, then steps until ``max_steps`` or ``budget_s`` (at least one). Prediction: one
    warm-up slice, then one batch of the run's evaluation batch size on a ``slice_shape`` volume.
    """
    import torch

    from ..adapter import unwrap
    from ..engine.network import build_network, resolve_device
    from ..settings import load_settings

    overrides = {k: literal(v) for k, v in (overrides or {}).items()}
    settings = load_settings(dataset, **{**overrides, "arch": arch, "image_size": image_size, "peft": peft,
                                         "device": device})
    run_device = resolve_device(settings.device)
    speed = settings.speed_choices(run_device, training=True)
    organs = settings.organs
    eval_batch = settings.slice_batch(run_device)
    key = json.dumps({"machine": _machine(run_device), "device": str(run_device), "dataset_organs": len(organs),
                      "arch": arch, "image_size": image_size, "peft": peft, "precision": speed.precision.name,
                      "attention": speed.attention_kind, "compile": speed.compile,
                      "threads": speed.threads.torch_threads, "eval_batch": eval_batch,
                      "slice_shape": list(slice_shape), "overrides": overrides}, sort_keys=True, default=str)
    cache = _read(_cache_path(CACHE_FILE))
    if use_cache and key in cache:
        entry = dict(cache[key])
        entry["eval_slice_shape"] = tuple(entry["eval_slice_shape"])
        return Throughput(**entry, cached=True)
    log(f"measuring {peft} on {arch} at {image_size or 'its default'} px on {run_device} ({speed.precision.name}) ...")
    speed.apply_threads()
    torch.manual_seed(0)
    network = build_network(settings, run_device, compile=speed.compile)
    size = int(unwrap(network).spec.image_size)
    trains = any(p.requires_grad for p in network.parameters())
    step_s, timed = None, 0
    if trains:
        step_s, timed = _time_training(network, settings, speed, run_device, size, len(organs), budget_s, max_steps)
    eval_s = _time_prediction(network, settings, speed, run_device, organs, eval_batch, slice_shape)
    del network  # the runs that follow are other processes on the same device: give its memory back
    if run_device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    result = Throughput(arch=arch, image_size=size, peft=peft, organs=len(organs), device=str(run_device),
                        precision=speed.precision.name, train_s_per_step=step_s, train_steps_timed=timed,
                        eval_s_per_slice=eval_s, eval_batch=eval_batch, eval_slice_shape=tuple(slice_shape),
                        measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    entry = dataclasses.asdict(result)
    entry.pop("cached")
    cache = _read(_cache_path(CACHE_FILE))
    cache[key] = entry
    _write(_cache_path(CACHE_FILE), cache)
    return result


def literal(value: Any) -> Any:
    """A command-line value as the bundle's parser would take it: a number, JSON, or the text itself."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _boxes(batch: int, organs: int, size: int, generator) -> Any:
    import torch

    lo = torch.rand(batch, organs, 2, generator=generator) * size * 0.5
    extent = (torch.rand(batch, organs, 2, generator=generator) * 0.4 + 0.1) * size
    return torch.cat([lo, (lo + extent).clamp(max=size - 1)], dim=-1)


def _time_training(network, settings, speed, device, size: int, organs: int, budget_s: float,
                   max_steps: int) -> tuple[float, int]:
    """The trainer's step (``SupervisedTrainer`` with the bundle's inferer, loss and optimiser) on one slice
    with ``organs`` boxes, every organ present."""
    import torch
    from monai.losses import DiceCELoss

    from ..engine.inferers import BoxPromptInferer
    from ..engine.losses import PeftLoss
    from ..engine.network import make_optimizer

    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(settings.batch_size, 3, size, size, generator=generator) * 255).to(device)
    boxes = _boxes(settings.batch_size, organs, size, generator)
    masks = torch.zeros(settings.batch_size, organs, size, size)
    for b in range(settings.batch_size):
        for k in range(organs):
            x0, y0, x1, y1 = boxes[b, k].round().long().tolist()
            masks[b, k, y0:y1, x0:x1] = 1.0
    valid = torch.ones(settings.batch_size, organs, dtype=torch.bool)
    boxes, masks, valid = boxes.to(device), masks.to(device), valid.to(device)
    targets = masks[valid].unsqueeze(1)
    inferer = BoxPromptInferer(amp=speed.precision)
    loss_fn = PeftLoss(DiceCELoss(sigmoid=True, squared_pred=True), network)
    optimizer = make_optimizer(network, settings)
    scaler = torch.amp.GradScaler(device.type) if speed.precision.grad_scaler else None
    network.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(inferer(images, network, boxes, valid), targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    step()  # warm-up: allocation, kernel choice, compilation
    _sync(device)
    times: list[float] = []
    while len(times) < max_steps and (not times or sum(times) < budget_s):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], len(times)


def _time_prediction(network, settings, speed, device, organs: dict[str, int], batch: int,
                     slice_shape: tuple[int, int]) -> float:
    """The evaluator's whole-volume prediction (tight boxes from the label on every slice) per slice."""
    import torch

    from ..engine.network import for_inference
    from ..predict.prompts import from_labels
    from ..predict.slices import SlicePredictor
    from ..predict.volume import predict_volume

    for_inference(network, settings.merge_adapters)
    X, Y = slice_shape
    ids = list(organs.values())

    def volume(depth: int):
        image = torch.rand(X, Y, depth, generator=torch.Generator().manual_seed(1)) * 255
        label = torch.zeros(1, X, Y, depth, dtype=torch.uint8)
        for n, organ_id in enumerate(ids):  # one box-shaped organ per row band, on every slice
            lo, hi = int(X * n / len(ids)), int(X * (n + 1) / len(ids))
            label[0, lo + (hi - lo) // 4: hi - (hi - lo) // 4, Y // 4: 3 * Y // 4, :] = organ_id
        return image, from_labels(label, organs)

    predictor = SlicePredictor(network, device, batch, speed.precision)
    with torch.no_grad():
        image, prompts = volume(1)
        predict_volume(predictor, image, prompts)  # warm-up
        _sync(device)
        image, prompts = volume(batch)
        start = time.perf_counter()
        predict_volume(predictor, image, prompts)
        _sync(device)
    return (time.perf_counter() - start) / batch


# --- hours ------------------------------------------------------------------------------------------------


def run_seconds(throughput: Throughput, counts: SliceCounts, epochs: int) -> float:
    """Model time of one run: training epochs with validation each epoch, then the test split; for a method
    that trains nothing (the zero-shot row), the test split only."""
    predict = throughput.eval_s_per_slice
    test = counts.predict.get("test", 0.0) * predict
    if throughput.train_s_per_step is None or throughput.peft == "frozen":
        return test
    per_epoch = counts.train.get("training", 0.0) * throughput.train_s_per_step + counts.predict.get("validation", 0.0) * predict
    return epochs * per_epoch + test


def hours(seconds: float) -> str:
    """``3.4 h``, ``52 min``, ``40 s`` with two significant figures (an estimate never shows more)."""
    if seconds is None or math.isnan(seconds):
        return "unknown"
    if seconds >= 3600:
        value = seconds / 3600
        return f"{value:,.0f} h" if value >= 100 else f"{value:.2g} h"
    if seconds >= 60:
        return f"{seconds / 60:.2g} min"
    return f"{seconds:.2g} s"
