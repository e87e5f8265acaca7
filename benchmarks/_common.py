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

from cobot_med.engine import precision as P  # noqa: E402
from cobot_med.engine.amp import autocast  # noqa: E402
from cobot_med.model import ModelSpec, build_model  # noqa: E402
from cobot_med.sam.attention import DEFAULT_KIND, set_attention  # noqa: E402
from cobot_med.sam.speed import enable_gradient_checkpointing, set_window_padding  # noqa: E402


@dataclasses.dataclass(frozen=True)
class PathConfig:
    """One way of running the model: every speed switch, on or off."""

    name: str
    attention: str = DEFAULT_KIND  # auto, eager (segment-anything), sdpa (N x N mask), onehot (no N x N bias)
    amp: str | bool = "bf16"  # the autocast dtype: bf16, fp16 or fp32 / False (none)
    skip_padding: bool = True  # windowed blocks project real tokens only
    one_pass: bool = True  # one encoder pass for the K organs of a slice (False: K passes)
    checkpointing: str = "none"  # gradient checkpointing of encoder blocks: none, global, all
    compile: bool = False  # torch.compile of the image encoder
    merged: bool = True  # inference: LoRA folded into the frozen weights
    batched: bool = True  # inference: several slices per encoder call, empty slices skipped

    def switches(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}


REFERENCE = PathConfig(
    "reference", attention="eager", amp="fp32", skip_padding=False, one_pass=False, merged=False, batched=False
)
OURS = PathConfig("ours")  # every switch on (bf16); resolve_ours sets precision, attention, compile per machine

ATTENTION_NAMES = {"onehot": "onehot attention", "sdpa": "sdpa attention (N x N mask)", "eager": "eager attention"}


@dataclasses.dataclass(frozen=True)
class Choices:
    """Our path as the project's defaults run it on this machine, and why (printed and recorded)."""

    path: PathConfig
    attention_kind: str  # what the path's attention setting runs (auto resolved for its dtype and mode)
    reasons: dict[str, str]

    def describe(self) -> dict[str, Any]:
        return {"amp": self.path.amp, "attention": self.path.attention, "attention_runs": self.attention_kind,
                "compile": self.path.compile, "reasons": self.reasons}


def resolve_ours(device: str, training: bool, amp: Any = "auto", attention: str = DEFAULT_KIND,
                 compile: Any = "auto") -> Choices:
    """:data:`OURS` with ``amp``, ``attention`` and ``compile`` resolved as a run resolves them
    (``cobot_med.engine.precision.resolve_speed``)."""
    speed = P.resolve_speed(device, training, amp=amp, attention=attention, compile=compile)
    path = dataclasses.replace(OURS, amp=speed.precision.name, attention=speed.attention, compile=speed.compile)
    reasons = {"amp": speed.precision.reason, "attention": speed.attention_reason, "compile": speed.compile_reason}
    return Choices(path, speed.attention_kind, reasons)


def ablations(ours: Choices, training: bool = True) -> list[PathConfig]:
    """Our path with one switch turned off (or on, for the precision/memory/compile ones) at a time."""
    path = dataclasses.replace(ours.path, compile=False)
    if dtype_name(path) == "fp32":
        off = [dataclasses.replace(path, name="ours, bf16 autocast", amp="bf16")]
    else:
        off = [dataclasses.replace(path, name=f"ours, fp32 (no {path.amp})", amp="fp32")]
    off += [dataclasses.replace(path, name=f"ours, {ATTENTION_NAMES[kind]}", attention=kind)
            for kind in ATTENTION_NAMES if kind != ours.attention_kind]
    off += [dataclasses.replace(path, name="ours, padded tokens computed", skip_padding=False)]
    if training:
        off += [
            dataclasses.replace(path, name="ours, K encoder passes", one_pass=False),
            dataclasses.replace(path, name="ours + checkpointing (global)", checkpointing="global"),
            dataclasses.replace(path, name="ours + checkpointing (all)", checkpointing="all"),
        ]
    else:
        off += [
            dataclasses.replace(path, name="ours, LoRA unmerged", merged=False),
            dataclasses.replace(path, name="ours, one slice per call", batched=False),
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
    return autocast(device, path.amp)  # "fp32" or False: no autocast


def dtype_name(path: PathConfig) -> str:
    """The path's autocast dtype: fp32, bf16 or fp16."""
    name = P.parse_amp(path.amp)
    return "bf16" if name in ("true", "auto") else name


def fp32_twin(path: PathConfig, name: str) -> PathConfig:
    """``path`` in fp32, to check it against the reference at fp32 tolerance."""
    return dataclasses.replace(path, name=name, amp="fp32")


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternate(
    fns: dict[str, Callable[[], Any]], repeats: int, device: str, warm: Iterable[str] = (),
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Run the functions ``repeats`` times, alternating; seconds per run.

    Each function not named in ``warm`` (already run once, e.g. by the output check) first runs
    once untimed (warm-up: kernel selection, allocator, thread pools). With ``budget_s``, a
    function is not run again once its timed runs add up to that many seconds (it keeps at least
    one): a slow path (the reference at 1024 px, bf16 on a CPU without fast bf16) bounds the run.
    """
    warm = set(warm)
    for name, fn in fns.items():
        if name not in warm:
            fn()
            progress(f"warmed up {name}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if budget_s is not None and times[name] and sum(times[name]) >= budget_s:
                continue
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            progress(f"timed {name}: {times[name][-1]:.2f} s")
    return times


_STARTED = time.perf_counter()


def progress(message: str) -> None:
    """A line on stderr with the seconds since the script started (stdout stays JSON + table)."""
    print(f"[{time.perf_counter() - _STARTED:6.0f} s, cpu {time.process_time():6.0f} s] {message}", file=sys.stderr,
          flush=True)


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
    """The machine and what the speed choices were made from (``machine_class``: which figures these are)."""
    cpu = P.cpu_info()
    info: dict[str, Any] = {
        "device": device,
        "machine_class": machine_class(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu.model,
        "torch_cpu_capability": cpu.capability,
        "fast_bf16_flags": cpu.fast_bf16_flags,
        "isa_limits": dict(cpu.isa_limits),
        "physical_cores": P.physical_cores(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_class(device: str) -> str:
    """The class BENCHMARKS.md files a figure under: the GPU, "AVX-512 BF16/AMX", or the CPU's kernel
    level ("AVX2"), marked emulated where environment limits hide the CPU's own bf16 units."""
    if torch.device(device).type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(torch.device(device))}"
    cpu = P.cpu_info()
    fast, _ = P.cpu_bf16_support()
    name = "AVX-512 BF16/AMX" if fast else cpu.capability
    if cpu.isa_limits and cpu.fast_bf16_flags and not fast:
        name += f" emulated on a CPU with {'/'.join(cpu.fast_bf16_flags)} (" + " ".join(
            f"{k}={v}" for k, v in cpu.isa_limits) + ")"
    return name


def print_choices(choices: "Choices", threads: P.ThreadPlan, device: str) -> None:
    """What the benchmark found and chose, for people (the JSON line has the same)."""
    info = machine(device)
    print(f"machine class: {info['machine_class']}\n  cpu {info['cpu']}, torch kernels {info['torch_cpu_capability']}, "
          f"fast bf16 flags: {', '.join(info['fast_bf16_flags']) or 'none'}, {info['physical_cores']} physical cores")
    print("ours, as the defaults run here:")
    print(f"  amp={choices.path.amp}: {choices.reasons['amp']}")
    print(f"  attention={choices.path.attention} runs {choices.reasons['attention']}")
    print(f"  compile={'on' if choices.path.compile else 'off'}: {choices.reasons['compile']}")
    print(f"  threads: {threads.reason}")


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


def matmul_peak(device: str, dtype: torch.dtype, n: int = 4096, repeats: int = 3, budget_s: float = 20.0) -> float | None:
    """GFLOP/s of the best of ``repeats`` n x n x n matrix multiplies (None when the dtype is not supported).

    ``n`` shrinks (halving, down to 512) until warm-up and repeats fit in about ``budget_s``, as
    estimated from one 512 product: bf16 on a CPU without fast bf16 runs at ~0.3 GFLOP/s.
    """
    try:
        small = torch.randn(512, 512, device=device).to(dtype)
        small @ small
        sync(device)
        start = time.perf_counter()
        small @ small
        sync(device)
        t512 = time.perf_counter() - start
        while n > 512 and t512 * (n / 512) ** 3 * (repeats + 1) > budget_s:
            n //= 2
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


# ---- the settings every model benchmark takes -----------------------------------------------------------------


def add_speed_arguments(parser) -> None:
    """``--amp``/``--dtype``, ``--attention``, ``--threads``, ``--budget``: ours runs as the defaults run unless told."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--amp", default=None,
                       help="ours' precision as the bundles' amp setting: auto (default: what this machine runs "
                            "fast), true, false, bf16, fp16")
    group.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                       help="the same setting by dtype name (fp32 = --amp false)")
    parser.add_argument("--attention", default=DEFAULT_KIND, choices=["auto", "onehot", "sdpa", "eager"],
                        help="ours' attention kind (default auto: the measured rule for the device, dtype and mode)")
    parser.add_argument("--threads", default="auto",
                        help="torch CPU threads (default auto: the physical cores; OMP_NUM_THREADS wins)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of timed runs per path; a slower path is timed fewer times (at least once)")


def apply_speed_arguments(args, training: bool) -> tuple[Choices, P.ThreadPlan]:
    """Set the threads and resolve ours from the parsed arguments (``add_speed_arguments``)."""
    threads = P.plan_threads(args.device, args.threads, num_workers=0).apply()
    amp = args.dtype if args.dtype is not None else (args.amp if args.amp is not None else "auto")
    choices = resolve_ours(args.device, training, amp=amp, attention=args.attention)
    return choices, threads
