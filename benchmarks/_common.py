"""Shared pieces of the speed benchmarks: the two paths and their switches, the model, timing, memory, output.

Every benchmark compares *our* path with the *reference* path (how segment-anything and most SAM
fine-tuning code run: its own attention, fp32, one image-encoder pass per organ prompt) on the
same weights (one model whose switches are flipped in place) and the same inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run against the checkout the script lives in
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cobot_med.engine.amp import autocast  # noqa: E402
from cobot_med.model import ModelSpec, build_model  # noqa: E402
from cobot_med.sam.attention import DEFAULT_KIND, set_attention  # noqa: E402
from cobot_med.sam.speed import enable_gradient_checkpointing, set_window_padding  # noqa: E402


@dataclasses.dataclass(frozen=True)
class PathConfig:
    """One way of running the model: every speed switch, on or off."""

    name: str
    attention: str = DEFAULT_KIND  # eager (segment-anything), sdpa (N x N mask), onehot (no N x N bias)
    amp: bool = True  # bf16 autocast
    skip_padding: bool = True  # windowed blocks project real tokens only
    one_pass: bool = True  # one encoder pass for the K organs of a slice (False: K passes)
    checkpointing: str = "none"  # gradient checkpointing of encoder blocks: none, global, all
    compile: bool = False  # torch.compile of the image encoder
    merged: bool = True  # inference: LoRA folded into the frozen weights
    batched: bool = True  # inference: several slices per encoder call, empty slices skipped

    def switches(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}


REFERENCE = PathConfig(
    "reference", attention="eager", amp=False, skip_padding=False, one_pass=False, merged=False, batched=False
)
OURS = PathConfig("ours")


def ablations(ours: PathConfig = OURS, training: bool = True) -> list[PathConfig]:
    """Our path with one switch turned off (or on, for the memory/compile ones) at a time."""
    off = [
        dataclasses.replace(ours, name="ours, fp32 (no bf16)", amp=False),
        dataclasses.replace(ours, name="ours, sdpa attention (N x N mask)", attention="sdpa"),
        dataclasses.replace(ours, name="ours, eager attention", attention="eager"),
        dataclasses.replace(ours, name="ours, padded tokens computed", skip_padding=False),
    ]
    if training:
        off += [
            dataclasses.replace(ours, name="ours, K encoder passes", one_pass=False),
            dataclasses.replace(ours, name="ours + checkpointing (global)", checkpointing="global"),
            dataclasses.replace(ours, name="ours + checkpointing (all)", checkpointing="all"),
        ]
    else:
        off += [
            dataclasses.replace(ours, name="ours, LoRA unmerged", merged=False),
            dataclasses.replace(ours, name="ours, one slice per call", batched=False),
        ]
    return off


def path_by_name(name: str, paths: Iterable[PathConfig]) -> PathConfig:
    for path in paths:
        if path.name == name:
            return path
    raise KeyError(name)


def make_model(arch: str, image_size: int, peft: str, device: str, seed: int = 0):
    """``build_model`` with random weights, rel-pos tables and non-zero adapter branches (so they act)."""
    torch.manual_seed(seed)
    model = build_model(ModelSpec(arch=arch, image_size=image_size, peft=peft)).to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.sam.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            elif p.requires_grad and not p.any():  # zero-initialised branch ends (LoRA B, ...)
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


def configure(model, path: PathConfig) -> None:
    """Flip the model's switches in place to ``path`` (same parameters throughout)."""
    encoder = model.sam.image_encoder
    set_attention(encoder, path.attention)
    set_window_padding(encoder, path.skip_padding)
    enable_gradient_checkpointing(model, path.checkpointing)


def maybe_compile(model, path: PathConfig):
    """A twin of ``model`` whose image encoder is ``torch.compile``-d (same parameters), or ``model``.

    The twin has its own module tables, so ``model`` itself stays eager for the other paths.
    """
    if not path.compile:
        return model
    import copy

    twin, sam = copy.copy(model), copy.copy(model.sam)
    twin.__dict__["_modules"] = dict(model._modules)
    sam.__dict__["_modules"] = dict(model.sam._modules)
    twin._modules["sam"] = sam
    sam._modules["image_encoder"] = torch.compile(model.sam.image_encoder, dynamic=False)
    return twin


def amp_context(path: PathConfig, device: str):
    return autocast(device, path.amp)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternate(
    fns: dict[str, Callable[[], Any]], repeats: int, device: str, warm: Iterable[str] = ()
) -> dict[str, list[float]]:
    """Run the functions ``repeats`` times, alternating; seconds per run.

    Each function not named in ``warm`` (already run once, e.g. by the output check) first runs
    once untimed (warm-up: kernel selection, allocator, thread pools).
    """
    warm = set(warm)
    for name, fn in fns.items():
        if name not in warm:
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.detach().float().flatten(), b.detach().float().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ---- memory -------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else -1


class PeakRss:
    """Peak resident memory above the level at entry (Linux: VmHWM after resetting it with clear_refs)."""

    def __enter__(self) -> "PeakRss":
        import gc

        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
            self.supported = True
        except OSError:
            self.supported = False
        self.base_kib = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.peak_mib = (_status_kib("VmHWM") - self.base_kib) / 1024 if self.supported else float("nan")


class SavedTensors:
    """Bytes of the distinct tensor storages autograd saves for backward, the model's own parameters
    and buffers excluded (they exist anyway); the peak over forward passes."""

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.peak_bytes = 0
        self._storages: dict[int, int] = {}
        tensors = [*model.parameters(), *model.buffers()] if model is not None else []
        self._exclude = {t.untyped_storage().data_ptr() for t in tensors}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._exclude:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    def forward_pass(self):
        """Context for one forward whose saved tensors are freed by its own backward."""
        meter = self

        class _Pass:
            def __enter__(self_inner):
                meter._storages = {}
                self_inner.hooks = torch.autograd.graph.saved_tensors_hooks(meter._pack, lambda t: t)
                self_inner.hooks.__enter__()

            def __exit__(self_inner, *exc):
                self_inner.hooks.__exit__(*exc)
                meter.peak_bytes = max(meter.peak_bytes, sum(meter._storages.values()))
                meter._storages = {}

        return _Pass()


def run_child(script: Path, args: list[str], timeout: float = 1800) -> dict[str, Any]:
    """Run ``script`` in a fresh Python process; its last stdout line is a JSON object."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if done.returncode:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the machine and the output -----------------------------------------------------------------------------


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([("" if row.get(k) is None else format(row[k], f)) for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def matmul_peak(device: str, dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float | None:
    """GFLOP/s of the best of ``repeats`` n x n x n matrix multiplies (None when the dtype is not supported)."""
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            a @ b
            sync(device)
            best = min(best, time.perf_counter() - start)
        return 2 * n**3 / best / 1e9
    except RuntimeError:
        return None
