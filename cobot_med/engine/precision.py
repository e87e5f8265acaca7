"""Speed settings chosen by what this machine does well: precision (``amp``), ``torch.compile``, CPU threads.

A default that is right on one machine can be several times wrong on another
(``../shared/PERFORMANCE.md``, "CPU classes"): on a CPU with AVX-512 BF16 or AMX, bf16 matrix
multiplies run 2-4x faster than fp32; on an AVX2-only CPU oneDNN has no fast bf16 path and they
run ~370x slower, so bf16 autocast makes the whole model ~7x slower. Each setting here takes
``auto`` (the default) or an explicit value, and resolves to a choice *and a reason*, so what ran
is logged and recorded (``describe()``). An explicit setting always wins.

- ``amp`` (:func:`resolve_precision`): on CUDA bf16 where the GPU supports it natively, else
  fp16 with a grad scaler for training; on a CPU bf16 only where the hardware runs it fast
  (:func:`cpu_bf16_support`: the CPU flags ``amx_bf16`` / ``avx512_bf16``, and where they do not
  settle it, a short measured bf16-vs-fp32 matmul check cached per machine in
  ``~/.cache/cobot-med/cpu_bf16.json``); otherwise fp32.
- ``compile`` (:func:`resolve_compile`): from :data:`COMPILE_RULES`, one row per device type and mode.
- threads (:func:`plan_threads`): on a CPU, torch's intra-op threads and the data loader workers
  together use the machine's physical cores (hyper-threads share a core's matrix units); under a
  default multi-process ``torchrun``, torchrun's own ``OMP_NUM_THREADS=1`` decides (``threads=`` sets more).

The attention kind's rule lives beside the kinds, in :mod:`cobot_med.sam.attention`
(``resolve_attention``); :func:`resolve_speed` resolves all of them for one run. Every probe here
is a plain module-level function so tests can replace it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..flags import FALSE, TRUE

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
AMP_SETTINGS = ("auto", "true", "false", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")

FAST_BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}  # Linux /proc/cpuinfo names
MIN_BF16_SPEEDUP = 1.5  # measured bf16 matmul must beat fp32 by this much to be worth autocast's casts
CACHE_FILE = "cpu_bf16.json"
# OV_CPU_MAX_ISA caps OpenVINO's own CPU kernels (its oneDNN reads ONEDNN_MAX_CPU_ISA); ONNX Runtime has no such
# switch (its MLAS kernels dispatch on the CPU's own features).
ISA_LIMIT_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                       "OV_CPU_MAX_ISA")


def parse_amp(value: Any) -> str:
    """The ``amp`` setting as one of ``auto``, ``true``, ``bf16``, ``fp16``, ``fp32``.

    Accepts ``auto``, booleans, yes/no text and dtype names (bf16, bfloat16, fp16, float16,
    fp32, float32); ``None`` means ``auto``. ``true`` is mixed precision in the device's half
    dtype (bf16; fp16 on a GPU without bf16), ``false`` is fp32.
    """
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "true" if value else "fp32"
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in DTYPES:
        return DTYPE_NAMES[DTYPES[text]]
    if text in ("fp32", "float32") or text in FALSE:
        return "fp32"
    if text in TRUE:
        return "true"
    raise ValueError(f"amp must be one of {', '.join(AMP_SETTINGS)}, got {value!r}")


# ---- the CPU: what it is, and whether it runs bf16 fast ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """What decides bf16 speed on a CPU: its flags (None where unknown), torch's kernel level, ISA limits."""

    model: str
    flags: frozenset[str] | None  # /proc/cpuinfo flags; None off Linux
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ...
    isa_limits: tuple[tuple[str, str], ...] = ()  # environment variables that cap the kernels' instruction set

    @property
    def fast_bf16_flags(self) -> list[str]:
        return [name for flag, name in FAST_BF16_FLAGS.items() if self.flags and flag in self.flags]

    def cache_key(self) -> str:
        """One measured check per CPU model, torch version, kernel level and ISA limits."""
        limits = ",".join(f"{k}={v}" for k, v in self.isa_limits) or "-"
        return f"{self.model} | torch {torch.__version__} | {self.capability} | {limits}"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (read once per process)."""
    model, flags = None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:
                model = value.strip()
            elif key in ("flags", "Features") and flags is None:  # x86 / ARM
                flags = frozenset(value.split())
    except OSError:
        pass
    limits = tuple((k, os.environ[k]) for k in ISA_LIMIT_VARIABLES if os.environ.get(k))
    model = model or platform.processor() or platform.machine()
    return CpuInfo(model=model, flags=flags, capability=torch.backends.cpu.get_cpu_capability(), isa_limits=limits)


def measure_bf16_speedup(n: int = 512, repeats: int = 3, budget_s: float = 2.0) -> dict[str, float]:
    """fp32 and bf16 GFLOP/s of an n x n x n matmul on the CPU (best of ``repeats``), and their ratio.

    Bounded: where one bf16 product takes longer than ``budget_s`` (an AVX2-only CPU: ~1 s at
    n=512), that one run is the measurement.
    """
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        times = []
        for _ in range(repeats + 1):  # the first run is a warm-up
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
            if times[-1] > budget_s:
                return times[-1]
        return min(times[1:])

    fp32 = best(a, b)
    bf16 = best(a.bfloat16(), b.bfloat16())
    flop = 2 * n**3 / 1e9
    return {"fp32_gflops": flop / fp32, "bf16_gflops": flop / bf16, "speedup": fp32 / bf16, "n": n}


def cache_dir() -> Path:
    """``$COBOT_MED_CACHE_DIR``, else ``$XDG_CACHE_HOME/cobot-med``, else ``~/.cache/cobot-med``."""
    if os.environ.get("COBOT_MED_CACHE_DIR"):
        return Path(os.environ["COBOT_MED_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cobot-med"


def _read_cache(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring the CPU bf16 cache {path} ({err}); measuring again", stacklevel=3)
        return {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    from ..files import write_json

    try:
        write_json(path, data)  # atomic: parallel processes may measure at once
    except OSError as err:
        warnings.warn(f"could not write the CPU bf16 cache {path} ({err}); it will be measured again", stacklevel=3)


_MEASURED: dict[tuple[str, str], dict[str, Any]] = {}  # this process's reads of the cache: (file, key) -> entry


def measured_bf16_speedup(info: CpuInfo) -> dict[str, Any]:
    """:func:`measure_bf16_speedup`, cached per :meth:`CpuInfo.cache_key` in :func:`cache_dir`
    (read once per process)."""
    path = cache_dir() / CACHE_FILE
    key = info.cache_key()
    if (str(path), key) in _MEASURED:
        return _MEASURED[str(path), key]
    cache = _read_cache(path)
    entry = cache.get(key)
    if not (isinstance(entry, dict) and isinstance(entry.get("speedup"), (int, float)) and entry["speedup"] > 0):
        entry = {**measure_bf16_speedup(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        cache[key] = entry
        _write_cache(path, cache)
    _MEASURED[str(path), key] = entry
    return entry


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU runs bf16 fast, and why.

    No AMX-BF16 / AVX512-BF16 flag: no (no measurement needed). The flag, torch's AVX512 kernels
    and no instruction-set limit in the environment: yes. Anything else (flags unknown, or a
    limit such as ``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY`` below what the flags say): a
    short measured matmul check decides, bf16 at least :data:`MIN_BF16_SPEEDUP` x fp32.
    """
    info = cpu_info()
    fast = info.fast_bf16_flags
    if info.flags is not None and not fast:
        return False, f"CPU has no fast bf16 (no AMX-BF16/AVX512-BF16; torch kernels {info.capability})"
    if fast and info.capability.startswith("AVX512") and not info.isa_limits:
        return True, f"CPU has {'/'.join(fast)}"
    if not fast:
        doubt = "CPU flags unknown"
    elif info.isa_limits:
        doubt = "kernels limited by " + ", ".join(f"{k}={v}" for k, v in info.isa_limits)
    else:
        doubt = f"CPU has {'/'.join(fast)} but torch kernels are {info.capability}"
    m = measured_bf16_speedup(info)
    verdict = m["speedup"] >= MIN_BF16_SPEEDUP
    return verdict, (f"{doubt}; measured bf16 matmul {m['bf16_gflops']:.1f} against fp32 {m['fp32_gflops']:.1f} "
                     f"GFLOP/s ({m['speedup']:.2g}x; fast needs >= {MIN_BF16_SPEEDUP}x)")


# ---- precision ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Precision:
    """The resolved ``amp``: autocast dtype (float32: no autocast), why, and whether training needs a grad scaler."""

    setting: str  # as asked, canonical (parse_amp): auto, true, bf16, fp16, fp32
    dtype: torch.dtype
    reason: str
    grad_scaler: bool = False  # fp16 training on CUDA: scale the loss so small gradients do not underflow

    @property
    def name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def describe(self) -> dict[str, Any]:
        """Flat, for MLflow params and ``summary.json``."""
        return {"amp": self.setting, "amp_dtype": self.name, "amp_reason": self.reason, "grad_scaler": self.grad_scaler}


def _cuda_bf16_supported() -> bool:
    try:  # without emulation: pre-Ampere GPUs "support" bf16 only by emulating it, slowly
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:
        return bool(torch.cuda.is_bf16_supported())


def _half_for(device_type: str) -> tuple[torch.dtype, str]:
    """The device's fast half dtype (float32 where none), and why."""
    if device_type == "cuda":
        if _cuda_bf16_supported():
            return torch.bfloat16, "GPU supports bf16"
        return torch.float16, "GPU has no native bf16"
    if device_type == "cpu":
        fast, why = cpu_bf16_support()
        return (torch.bfloat16 if fast else torch.float32), why
    return torch.float32, f"no precision rule for device type {device_type!r}; set amp explicitly"


def resolve_precision(setting: Any = "auto", device: torch.device | str = "cpu", training: bool = False) -> Precision:
    """The precision ``setting`` (:func:`parse_amp`) means on ``device``, with its reason.

    ``auto``: CUDA -> bf16 where supported, else fp16 (grad scaler in training); CPU -> bf16
    where it runs fast (:func:`cpu_bf16_support`), else fp32. ``true``: bf16 (fp16 on a GPU
    without bf16). An explicit dtype is used as given (a warning when the CPU runs bf16 slowly).
    The grad scaler is for fp16 training on CUDA only: MONAI's ``SupervisedTrainer`` scales and
    autocasts on CUDA alone, so fp16 training on a CPU runs without one and records so.
    """
    setting = parse_amp(setting)
    kind = _device_type(device)
    if setting == "fp32":
        return Precision(setting, torch.float32, "fp32: amp=false (explicit)")
    if setting != "auto":  # explicit: bf16, fp16, or true (bf16; fp16 on a GPU without bf16)
        dtype = DTYPES.get(setting, torch.bfloat16)
        reason = f"{setting}: amp={setting} (explicit)"
        if setting == "true":
            if kind == "cuda" and not _cuda_bf16_supported():
                dtype, reason = torch.float16, "fp16: amp=true (explicit; GPU has no native bf16)"
            else:
                reason = "bf16: amp=true (explicit)"
        if kind == "cpu" and dtype == torch.bfloat16:
            fast, why = cpu_bf16_support()
            if not fast:
                reason += f"; {why}: expect it slower than fp32"
                warnings.warn(f"amp={setting} on a CPU without fast bf16 ({why}): expect it several times "
                              "slower than fp32; amp=auto picks fp32 here", stacklevel=2)
        return Precision(setting, dtype, reason, grad_scaler=_needs_scaler(kind, dtype, training))
    dtype, why = _half_for(kind)
    scaler = _needs_scaler(kind, dtype, training)
    if scaler:
        why += "; a grad scaler guards training"
    return Precision(setting, dtype, f"{DTYPE_NAMES[dtype]}: {why}", grad_scaler=scaler)


def _needs_scaler(device_type: str, dtype: torch.dtype, training: bool) -> bool:
    """fp16 training on CUDA (MONAI's trainer has no grad scaler off CUDA)."""
    return training and dtype == torch.float16 and device_type == "cuda"


def _device_type(device: torch.device | str) -> str:
    if str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


# ---- torch.compile ------------------------------------------------------------------------------------------

# (device type, "train" | "infer") -> (compile?, the measurement or reason behind it). auto picks from here.
COMPILE_RULES: dict[tuple[str, str], tuple[bool, str]] = {
    ("cpu", "train"): (False, "on CPU compiling takes minutes for +13% per step (BENCHMARKS.md, bf16 on an "
                              "AVX-512 BF16 CPU; not measured on AVX2) and needs a C++ compiler"),
    ("cpu", "infer"): (False, "on CPU each new batch shape recompiles for minutes, for +6% per volume (BENCHMARKS.md: "
                              "measured in fp32 on the AVX2 class, emulated; not measured in bf16 on the AVX-512 "
                              "BF16/AMX class)"),
    ("cuda", "train"): (False, "not measured on a GPU in this project (segment-anything-fast: +37% for "
                               "inference on an A100); turn it on with compile=true"),
    ("cuda", "infer"): (False, "not measured on a GPU in this project; a volume's last batch recompiles"),
}


def resolve_compile(setting: Any = "auto", device: torch.device | str = "cpu", training: bool = False) -> tuple[bool, str]:
    """Whether to ``torch.compile`` the image encoder, and why (``auto``: :data:`COMPILE_RULES`)."""
    text = "auto" if setting is None else str(setting).strip().lower()
    if text != "auto":
        from ..flags import as_flag

        on = as_flag(setting, "compile")
        return on, f"compile={'true' if on else 'false'} (explicit)"
    rule = COMPILE_RULES.get((_device_type(device), "train" if training else "infer"))
    if rule is None:
        return False, f"no compile rule for device type {_device_type(device)!r}"
    return rule


# ---- threads ------------------------------------------------------------------------------------------------


def physical_cores(sys_root: str | Path = "/sys") -> int:
    """Physical cores this process may use: distinct (package, core) pairs of its allowed CPUs,
    capped by a cgroup CPU quota; ``os.cpu_count()`` where the topology cannot be read."""
    root = Path(sys_root)
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        topology = root / f"devices/system/cpu/cpu{cpu}/topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            cores = set()
            break
    count = len(cores) or os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = (root / "fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


@dataclasses.dataclass(frozen=True)
class ThreadPlan:
    """torch intra-op threads and data loader workers for one process, and why."""

    torch_threads: int
    num_workers: int
    reason: str

    def describe(self) -> dict[str, Any]:
        return {"torch_threads": self.torch_threads, "num_workers": self.num_workers, "threads_reason": self.reason}

    def apply(self) -> "ThreadPlan":
        """Set torch's intra-op threads (the workers are the data loaders' setting)."""
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        return self


def _auto_workers(device_type: str, cores: int) -> tuple[int, str]:
    # The slice loader runs 93-633 slices/s in one process (BENCHMARKS.md, "Data loader") against
    # ~4 slices/s of training on a 2-core CPU: in the main process it costs < 5% there, and a
    # worker would take a core from the model. With more cores the model gets faster and loading
    # in line would cost more: hand it to workers. A GPU needs them most.
    if device_type == "cuda":
        workers = min(4, max(cores - 1, 0))
        return workers, f"{workers} loader workers feed the GPU"
    if cores <= 4:
        return 0, "loader in the main process (a worker would take a core from the model)"
    workers = min(4, max(1, cores // 8))
    return workers, f"{workers} loader worker(s) beside the model"


def plan_threads(device: torch.device | str = "cpu", threads: Any = "auto", num_workers: Any = "auto",
                 cores: int | None = None) -> ThreadPlan:
    """Threads and loader workers that together use the physical cores (shared among the processes
    of a ``torchrun`` on this machine, ``$LOCAL_WORLD_SIZE``).

    An explicit ``threads`` or ``num_workers`` (an int) wins; with ``threads='auto'``,
    ``$OMP_NUM_THREADS`` (the usual way to pin threads) wins over the cores. ``torchrun`` with more
    than one process per machine sets ``OMP_NUM_THREADS=1`` itself when it is unset, so under a
    default torchrun each process runs 1 torch thread, not its share of the cores
    (``cores // LOCAL_WORLD_SIZE`` less its loader workers, which still come from that share): set
    ``threads=`` (or ``OMP_NUM_THREADS``) to use more.
    """
    if cores is None:
        cores = physical_cores()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    share = max(1, cores // local)
    where = f"{cores} physical cores" + (f", {local} processes" if local > 1 else "")
    if _is_auto(num_workers):
        workers, why_workers = _auto_workers(_device_type(device), share)
    else:
        workers, why_workers = _count(num_workers, "num_workers", 0), "num_workers (explicit)"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not _is_auto(threads):
        count, why = _count(threads, "threads", 1), "threads (explicit)"
    elif omp.isdigit() and int(omp) > 0:
        count, why = int(omp), f"OMP_NUM_THREADS={omp}"
        if local > 1:
            why += (f" (torchrun sets 1 when it is unset; {share} physical cores per process here: "
                    "threads= or OMP_NUM_THREADS sets the count)")
    else:
        count, why = max(1, share - workers), f"{where}, less the loader workers"
    return ThreadPlan(count, workers, f"{count} torch threads: {why}; {why_workers}")


def _is_auto(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() == "auto")


def _count(value: Any, name: str, least: int) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 'auto' or a whole number, got {value!r}") from None
    if count < least:
        raise ValueError(f"{name} must be at least {least}, got {count}")
    return count


# ---- everything at once -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpeedChoices:
    """Every hardware-dependent speed setting of one run, resolved, with reasons (:func:`resolve_speed`)."""

    precision: Precision
    attention: str  # the setting to build with ("auto" decides per call, see cobot_med.sam.attention)
    attention_kind: str  # what it runs for this device, the precision's dtype and the mode
    attention_reason: str
    compile: bool
    compile_reason: str
    threads: ThreadPlan
    device_type: str = "cpu"  # what the choices were resolved for (for_model resolves attention again for it)
    training: bool = False

    def apply_threads(self) -> "SpeedChoices":
        """Set torch's threads as planned (the loader workers are the data loaders' setting); returns self."""
        self.threads.apply()
        return self

    def for_model(self, network: Any) -> "SpeedChoices":
        """These choices with the attention ``network`` was built with (its spec's ``attention``), resolved for
        this device, precision and mode: what runs is what is recorded. A loaded adapter runs the kind it
        recorded unless ``attention`` was given, which the settings alone cannot know. Unchanged for a network
        without a spec (a test's stand-in)."""
        from ..adapter import unwrap
        from ..sam.attention import resolve_attention

        try:
            setting = unwrap(network).spec.attention
        except (TypeError, AttributeError):
            return self
        if setting == self.attention:
            return self
        kind, why = resolve_attention(setting, self.device_type, self.precision.dtype, self.training)
        if setting != "auto":
            why = f"attention={setting} (as the loaded model records it)"
        return dataclasses.replace(self, attention=setting, attention_kind=kind, attention_reason=why)

    def said(self, device: torch.device | str | None = None) -> str:
        """The choices that change results and speed, with their reasons, in one line (printed at the start of
        every run; the full reasons are in ``describe()``): device, precision, attention, threads (and compile,
        when on)."""
        def first(reason: str) -> str:  # a reason's first clause, without the choice it starts by repeating
            head, _, rest = reason.partition(": ")
            text = rest if rest and len(head) < 20 and "(" not in head else reason
            depth = 0
            for i, char in enumerate(text):
                depth += {"(": 1, ")": -1}.get(char, 0)
                if depth == 0 and text.startswith("; ", i):
                    return text[:i]
            return text

        where = ""
        if device is not None:
            device = torch.device(device)
            if device.type == "cpu":
                where = f"device cpu ({torch.backends.cpu.get_cpu_capability()}); "
            elif device.type == "cuda":
                where = f"device {device} ({torch.cuda.get_device_name(device)}); "
            else:
                where = f"device {device}; "
        compiled = f"compiled ({first(self.compile_reason)}); " if self.compile else ""
        attention = first(self.attention_reason)
        recorded = f"attention={self.attention} ("  # "attention=eager (as the loaded model records it)"
        if attention.startswith(recorded) and attention.endswith(")"):
            attention = attention[len(recorded):-1]
        return (f"{where}precision {self.precision.name} ({first(self.precision.reason)}); attention "
                f"{self.attention_kind} ({attention}); {compiled}"
                f"{self.threads.torch_threads} torch threads ({first(self.threads.reason)})")

    def describe(self) -> dict[str, Any]:
        """Flat and JSON-friendly: MLflow params, ``resolved_settings.json``, inference ``summary.json``."""
        return {**self.precision.describe(), "attention": self.attention, "attention_kind": self.attention_kind,
                "attention_reason": self.attention_reason, "compile": self.compile,
                "compile_reason": self.compile_reason, **self.threads.describe()}


def resolve_speed(device: torch.device | str, training: bool, amp: Any = "auto", attention: Any = "auto",
                  compile: Any = "auto", threads: Any = "auto", num_workers: Any = "auto") -> SpeedChoices:
    """Resolve ``amp``, ``attention``, ``compile`` and the threads for a run on ``device`` (``None`` = auto).

    Nothing is applied: call ``.threads.apply()``, autocast with ``.precision``, build with
    ``.attention``, compile if ``.compile``; once the model is built, record ``.for_model(model).describe()``
    (an adapter's recorded attention kind wins where none was given).
    """
    from ..sam.attention import DEFAULT_KIND, resolve_attention  # late: the sam package is heavier

    precision = resolve_precision(amp, device, training)
    setting = DEFAULT_KIND if attention is None else str(attention)
    kind, why_kind = resolve_attention(setting, _device_type(device), precision.dtype, training)
    compiled, why_compile = resolve_compile(compile, device, training)
    plan = plan_threads(device, threads, num_workers)
    return SpeedChoices(precision, setting, kind, why_kind, compiled, why_compile, plan, _device_type(device), training)


def describe_machine() -> dict[str, Any]:
    """What the choices were made from (for benchmarks and run records)."""
    info = cpu_info()
    return {"cpu": info.model, "capability": info.capability, "fast_bf16_flags": info.fast_bf16_flags,
            "isa_limits": dict(info.isa_limits), "physical_cores": physical_cores(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
