"""Speed settings chosen by the hardware (issue 16): amp, attention kind, compile and threads resolve from
faked capabilities as documented; explicit settings win; the measured bf16 check is cached per machine."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cobot_med.engine import precision as P
from cobot_med.engine.amp import autocast
from cobot_med.sam import attention as A

AVX2 = P.CpuInfo("AMD EPYC 7B13", frozenset({"avx", "avx2", "fma"}), "AVX2")
AMX = P.CpuInfo("Intel Xeon 8481C", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}), "AVX512")
AVX512_NO_BF16 = P.CpuInfo("Intel Xeon 8168", frozenset({"avx2", "avx512f", "avx512bw"}), "AVX512")
EMULATED_AVX2 = P.CpuInfo("Intel Xeon 8481C", AMX.flags, "AVX2", (("ONEDNN_MAX_CPU_ISA", "AVX2"),))
UNKNOWN = P.CpuInfo("arm", None, "DEFAULT")


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """``cpu(info, speedup=None)``: fake the CPU probe (and the measured check, which records its calls);
    the bf16 cache lives in ``tmp_path``."""
    monkeypatch.setenv("COBOT_MED_CACHE_DIR", str(tmp_path))
    P._MEASURED.clear()
    calls = []

    def fake(info: P.CpuInfo, speedup: float | None = None) -> list:
        monkeypatch.setattr(P, "cpu_info", lambda: info)

        def measure(**_):
            if speedup is None:
                raise AssertionError("the capability alone should have decided")
            calls.append(speedup)
            return {"fp32_gflops": 100.0, "bf16_gflops": 100.0 * speedup, "speedup": speedup, "n": 512}

        monkeypatch.setattr(P, "measure_bf16_speedup", measure)
        return calls

    yield fake
    P._MEASURED.clear()


@pytest.mark.parametrize("value, expected", [
    (None, "auto"), ("auto", "auto"), ("AUTO", "auto"), (True, "true"), ("yes", "true"), ("True", "true"),
    (False, "fp32"), ("false", "fp32"), ("0", "fp32"), ("fp32", "fp32"), ("float32", "fp32"),
    ("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16"), ("float16", "fp16"),
])
def test_parse_amp(value, expected):
    assert P.parse_amp(value) == expected


def test_parse_amp_rejects_unknown_values():
    with pytest.raises(ValueError, match="amp must be one of auto, .*got 'int8'"):
        P.parse_amp("int8")


def test_auto_is_fp32_on_a_cpu_without_fast_bf16(cpu):
    cpu(AVX2)  # no measurement: the flags settle it
    precision = P.resolve_precision("auto", "cpu", training=True)
    assert precision.dtype == torch.float32 and precision.name == "fp32" and not precision.grad_scaler
    assert precision.reason.startswith("fp32: CPU has no fast bf16") and "AVX2" in precision.reason
    cpu(AVX512_NO_BF16)
    assert P.resolve_precision("auto", "cpu").dtype == torch.float32


def test_auto_is_bf16_on_a_cpu_with_amx_or_avx512_bf16(cpu):
    cpu(AMX)
    precision = P.resolve_precision("auto", "cpu", training=True)
    assert precision.dtype == torch.bfloat16 and precision.name == "bf16" and not precision.grad_scaler
    assert precision.reason == "bf16: CPU has AMX-BF16/AVX512-BF16"
    assert precision.describe() == {"amp": "auto", "amp_dtype": "bf16", "amp_reason": precision.reason,
                                    "grad_scaler": False}


@pytest.mark.parametrize("info", [EMULATED_AVX2, UNKNOWN, P.CpuInfo("Xeon", AMX.flags, "AVX2")])
@pytest.mark.parametrize("speedup, dtype", [(0.06, torch.float32), (1.2, torch.float32), (3.0, torch.bfloat16)])
def test_in_doubt_a_measured_check_decides(cpu, info, speedup, dtype):
    """Flags unknown, or kernels limited below what the flags say: bf16 only if measured >= 1.5x fp32."""
    calls = cpu(info, speedup)
    precision = P.resolve_precision("auto", "cpu")
    assert precision.dtype == dtype and calls == [speedup]
    assert "measured bf16 matmul" in precision.reason and f"{speedup:.2g}x" in precision.reason


def test_measured_check_is_cached_per_machine(cpu, tmp_path):
    calls = cpu(EMULATED_AVX2, 0.05)
    assert P.resolve_precision("auto", "cpu").dtype == torch.float32
    cache = json.loads((tmp_path / P.CACHE_FILE).read_text())
    key = EMULATED_AVX2.cache_key()
    assert list(cache) == [key] and cache[key]["speedup"] == 0.05
    assert "torch " + torch.__version__ in key and "AVX2" in key and "ONEDNN_MAX_CPU_ISA=AVX2" in key
    P._MEASURED.clear()  # a new process: read from the file, no new measurement
    assert P.resolve_precision("auto", "cpu").dtype == torch.float32 and calls == [0.05]
    other = P.CpuInfo("another CPU", None, "AVX2")  # another machine sharing the home folder: its own entry
    cpu(other, 2.0)
    assert P.resolve_precision("auto", "cpu").dtype == torch.bfloat16
    assert set(json.loads((tmp_path / P.CACHE_FILE).read_text())) == {key, other.cache_key()}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_corrupt_cache_is_ignored_with_a_warning(cpu, tmp_path, content):
    (tmp_path / P.CACHE_FILE).write_text(content)
    calls = cpu(UNKNOWN, 2.5)
    with pytest.warns(UserWarning, match=f"ignoring the CPU bf16 cache {tmp_path / P.CACHE_FILE}"):
        assert P.resolve_precision("auto", "cpu").dtype == torch.bfloat16
    assert calls == [2.5]
    assert json.loads((tmp_path / P.CACHE_FILE).read_text())[UNKNOWN.cache_key()]["speedup"] == 2.5


def test_a_cache_entry_without_a_speedup_is_measured_again(cpu, tmp_path):
    (tmp_path / P.CACHE_FILE).write_text(json.dumps({UNKNOWN.cache_key(): {"speedup": "fast"}}))
    calls = cpu(UNKNOWN, 0.1)
    assert P.resolve_precision("auto", "cpu").dtype == torch.float32 and calls == [0.1]


def test_an_unwritable_cache_warns_and_still_decides(cpu, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cpu(UNKNOWN, 0.1)
    monkeypatch.setenv("COBOT_MED_CACHE_DIR", str(blocker / "sub"))  # a folder under a file cannot be made
    with pytest.warns(UserWarning, match="could not write the CPU bf16 cache"):
        assert P.resolve_precision("auto", "cpu").dtype == torch.float32


def test_explicit_settings_win(cpu):
    cpu(AMX)
    assert P.resolve_precision(False, "cpu").dtype == torch.float32
    assert P.resolve_precision("fp32", "cpu").reason == "fp32: amp=false (explicit)"
    fp16 = P.resolve_precision("fp16", "cpu", training=True)  # MONAI's trainer scales (and autocasts) on CUDA only
    assert fp16.dtype == torch.float16 and not fp16.grad_scaler
    cpu(AVX2)
    with pytest.warns(UserWarning, match="amp=bf16 on a CPU without fast bf16"):
        precision = P.resolve_precision("bf16", "cpu")
    assert precision.dtype == torch.bfloat16 and "expect it slower than fp32" in precision.reason
    with pytest.warns(UserWarning):
        assert P.resolve_precision(True, "cpu").dtype == torch.bfloat16  # true: bf16 on a CPU, as asked


@pytest.mark.parametrize("bf16, training, dtype, scaler", [
    (True, True, torch.bfloat16, False),
    (True, False, torch.bfloat16, False),
    (False, True, torch.float16, True),
    (False, False, torch.float16, False),
])
def test_cuda_rules(monkeypatch, cpu, bf16, training, dtype, scaler):
    cpu(AVX2)  # the CPU's flags must not matter on a GPU
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    precision = P.resolve_precision("auto", "cuda:0", training=training)
    assert (precision.dtype, precision.grad_scaler) == (dtype, scaler)
    assert asked == {"including_emulation": False}  # emulated bf16 (pre-Ampere) is slow: not "supported"
    assert ("grad scaler" in precision.reason) == scaler
    assert P.resolve_precision(True, "cuda", training=training).dtype == dtype  # true: the GPU's half dtype
    assert P.resolve_precision("bf16", "cuda").dtype == torch.bfloat16  # explicit wins
    assert P.resolve_precision("fp16", "cuda", training=training).grad_scaler == training  # fp16 training on CUDA
    assert P.resolve_precision(False, "cuda").dtype == torch.float32


def test_auto_device_follows_cuda_availability(monkeypatch, cpu):
    cpu(AMX)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert P.resolve_precision("auto", "auto").dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert P.resolve_precision("auto", "auto").dtype == torch.bfloat16


def test_autocast_applies_the_resolved_precision(cpu):
    cpu(AVX2)
    with autocast("cpu", "auto"):
        assert not torch.is_autocast_enabled("cpu")
    cpu(AMX)
    with autocast("cpu", "auto"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast("cpu", "false"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", P.Precision("auto", torch.float32, "recorded")):  # a resolved choice is used as is
        assert not torch.is_autocast_enabled("cpu")


# ---- attention ---------------------------------------------------------------------------------------------


def test_every_attention_rule_names_an_sdpa_family_kind_and_its_evidence():
    for (device, dtype, mode), (kind, why) in A.AUTO_RULES.items():
        assert device in ("cpu", "cuda") and dtype in ("bf16", "fp16", "fp32") and mode in ("train", "infer")
        assert kind in ("onehot", "sdpa") and len(why) > 20
    for device in ("cpu", "cuda"):  # every mode and the dtypes amp=auto can pick have a row
        for dtype in ("bf16", "fp32") + (("fp16",) if device == "cuda" else ()):
            for mode in ("train", "infer"):
                assert (device, dtype, mode) in A.AUTO_RULES


def test_resolve_attention():
    kind, why = A.resolve_attention("auto", "cpu", torch.bfloat16, training=True)
    assert (kind, why) == (A.AUTO_RULES["cpu", "bf16", "train"][0], f"{kind}: {A.AUTO_RULES['cpu', 'bf16', 'train'][1]}")
    assert A.resolve_attention("auto", "cpu", "fp32")[0] == A.AUTO_RULES["cpu", "fp32", "infer"][0]
    assert A.resolve_attention("auto", "cuda:1", torch.float16, True)[0] == A.AUTO_RULES["cuda", "fp16", "train"][0]
    assert A.resolve_attention("auto", "mps", torch.float32)[1].startswith("onehot: no measured rule")
    assert A.resolve_attention("eager", "cpu", torch.bfloat16) == ("eager", "attention=eager (explicit)")
    with pytest.raises(ValueError, match="unknown attention kind 'flash'"):
        A.resolve_attention("flash", "cpu", torch.float32)


def test_auto_attention_runs_the_kind_of_its_rule_per_dtype_and_grad_mode(monkeypatch):
    """The rule is looked up per call: fp32 / bf16, and training (gradients on) / inference."""
    from cobot_med.model import ModelSpec, build_model

    rules = {("cpu", "fp32", "train"): ("sdpa", "test"), ("cpu", "fp32", "infer"): ("onehot", "test"),
             ("cpu", "bf16", "train"): ("onehot", "test"), ("cpu", "bf16", "infer"): ("sdpa", "test")}
    monkeypatch.setattr(A, "AUTO_RULES", rules)
    ran = []
    for cls in (A.SdpaAttention, A.OneHotAttention):
        original = cls.attend_heads

        def spy(self, *args, _cls=cls, _original=original):
            if type(self) is A.AutoAttention:
                ran.append(_cls.__name__)
            return _original(self, *args)

        monkeypatch.setattr(cls, "attend_heads", spy)
    model = build_model(ModelSpec(arch="tiny", image_size=64, peft="lora"))
    assert type(model.sam.image_encoder.blocks[0].attn) is A.AutoAttention  # the default kind
    images, boxes = torch.rand(1, 3, 64, 64) * 255, torch.tensor([[[4.0, 4, 40, 40]]])
    expected = {(False, True): "SdpaAttention", (False, False): "OneHotAttention",
                (True, True): "OneHotAttention", (True, False): "SdpaAttention"}
    for (bf16, grad), name in expected.items():
        ran.clear()
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(images, boxes)
        assert ran and set(ran) == {name}, (bf16, grad, ran)


# ---- compile -----------------------------------------------------------------------------------------------


def test_compile_rule():
    for (device, mode), (on, why) in P.COMPILE_RULES.items():
        assert P.resolve_compile("auto", device, mode == "train") == (on, why) and len(why) > 20
    assert P.resolve_compile(None, "cpu") == P.COMPILE_RULES["cpu", "infer"]
    assert P.resolve_compile("true", "cpu") == (True, "compile=true (explicit)")
    assert P.resolve_compile(False, "cuda", True) == (False, "compile=false (explicit)")
    assert P.resolve_compile("auto", "mps")[0] is False
    with pytest.raises(ValueError, match="compile must be true or false"):
        P.resolve_compile("sometimes", "cpu")


# ---- threads -----------------------------------------------------------------------------------------------


def fake_sys(root: Path, cores_of_cpus: dict[int, tuple[int, int]], quota: str | None = None) -> Path:
    for cpu, (package, core) in cores_of_cpus.items():
        topology = root / f"devices/system/cpu/cpu{cpu}/topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    if quota:
        (root / "fs/cgroup").mkdir(parents=True)
        (root / "fs/cgroup/cpu.max").write_text(quota + "\n")
    return root


def test_physical_cores_count_cores_not_hyperthreads(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    two_sockets = {cpu: (cpu // 4 % 2, cpu % 2) for cpu in range(8)}  # 2 packages x 2 cores x 2 threads
    assert P.physical_cores(fake_sys(tmp_path / "a", two_sockets)) == 4
    assert P.physical_cores(fake_sys(tmp_path / "b", two_sockets, quota="max 100000")) == 4
    assert P.physical_cores(fake_sys(tmp_path / "c", two_sockets, quota="150000 100000")) == 2  # a container's quota
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert P.physical_cores(tmp_path / "missing") == 8  # no topology: the logical count


def test_plan_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (P.plan_threads("cpu", cores=2).torch_threads, P.plan_threads("cpu", cores=2).num_workers) == (2, 0)
    plan = P.plan_threads("cpu", cores=16)
    assert (plan.torch_threads, plan.num_workers) == (14, 2)  # together: the physical cores
    assert plan.describe() == {"torch_threads": 14, "num_workers": 2, "threads_reason": plan.reason}
    assert "16 physical cores" in plan.reason
    plan = P.plan_threads("cuda", cores=8)
    assert (plan.torch_threads, plan.num_workers) == (4, 4)
    assert (P.plan_threads("cpu", num_workers=3, cores=8).torch_threads) == 5
    assert P.plan_threads("cpu", threads=3, num_workers="2", cores=8) == P.ThreadPlan(
        3, 2, "3 torch threads: threads (explicit); num_workers (explicit)")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share the cores
    assert P.plan_threads("cpu", cores=16).torch_threads == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    plan = P.plan_threads("cpu", cores=16)
    assert plan.torch_threads == 6 and "OMP_NUM_THREADS=6" in plan.reason
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets when it is unset: kept, and the reason says so
    plan = P.plan_threads("cpu", cores=16)
    assert plan.torch_threads == 1 and "torchrun sets 1 when it is unset; 4 physical cores per process" in plan.reason
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert P.plan_threads("cpu", threads=2, cores=16).torch_threads == 2  # explicit beats OMP_NUM_THREADS
    monkeypatch.setattr(P, "physical_cores", lambda: 3)
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert P.plan_threads("cpu").torch_threads == 3
    with pytest.raises(ValueError, match="threads must be 'auto' or a whole number, got 'many'"):
        P.plan_threads("cpu", threads="many", cores=2)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        P.plan_threads("cpu", threads=0, cores=2)


def test_thread_plan_apply_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        P.ThreadPlan(1, 0, "test").apply()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---- the benchmarks time ours as the defaults run ----------------------------------------------------------


def test_benchmarks_resolve_ours_like_the_defaults(cpu):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import _common as C
    finally:
        sys.path.pop(0)
    cpu(AVX2)
    choices = C.resolve_ours("cpu", training=True)
    assert choices.path.amp == "fp32" and choices.path.attention == "auto" and not choices.path.compile
    assert choices.attention_kind == A.AUTO_RULES["cpu", "fp32", "train"][0]
    names = [p.name for p in C.ablations(choices, training=True)]
    assert names[0] == "ours, bf16 autocast" and f"ours, {C.ATTENTION_NAMES[choices.attention_kind]}" not in names
    cpu(AMX)
    choices = C.resolve_ours("cpu", training=False)
    assert choices.path.amp == "bf16" and choices.reasons["amp"] == "bf16: CPU has AMX-BF16/AVX512-BF16"
    assert C.ablations(choices, training=False)[0].amp == "fp32"
    assert C.resolve_ours("cpu", True, amp="false", attention="eager").path.amp == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "emulated" not in C.machine_class("cpu")


def test_resolve_speed_resolves_every_setting_for_one_run(cpu, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(P, "physical_cores", lambda: 2)
    cpu(AVX2)
    speed = P.resolve_speed("cpu", training=True)
    kind, why = A.AUTO_RULES["cpu", "fp32", "train"]
    assert speed.precision.dtype == torch.float32 and speed.attention == "auto" and speed.attention_kind == kind
    assert speed.compile is False and (speed.threads.torch_threads, speed.threads.num_workers) == (2, 0)
    record = speed.describe()
    assert record == {"amp": "auto", "amp_dtype": "fp32", "amp_reason": speed.precision.reason, "grad_scaler": False,
                      "attention": "auto", "attention_kind": kind, "attention_reason": f"{kind}: {why}",
                      "compile": False, "compile_reason": P.COMPILE_RULES["cpu", "train"][1], "torch_threads": 2,
                      "num_workers": 0, "threads_reason": speed.threads.reason}
    json.dumps(record)  # JSON-friendly, for summary.json and MLflow
    cpu(AMX)
    speed = P.resolve_speed("cpu", training=False, amp=None, attention="eager", compile="true", threads=1)
    assert (speed.precision.name, speed.attention_kind, speed.compile, speed.threads.torch_threads) == (
        "bf16", "eager", True, 1)


def test_for_model_records_the_attention_the_built_model_runs(cpu):
    """A loaded adapter runs the attention it recorded when none is given: the choices follow the model."""
    from cobot_med.model import ModelSpec, build_model

    cpu(AVX2)
    speed = P.resolve_speed("cpu", training=False)
    assert speed.attention == "auto" and speed.attention_kind != "eager"
    eager = speed.for_model(build_model(ModelSpec("tiny", 64, "frozen", attention="eager")))
    assert (eager.attention, eager.attention_kind) == ("eager", "eager")
    assert eager.attention_reason == "attention=eager (as the loaded model records it)"
    assert eager.describe() == {**speed.describe(), "attention": "eager", "attention_kind": "eager",
                                "attention_reason": eager.attention_reason}
    assert speed.for_model(build_model(ModelSpec("tiny", 64, "frozen"))) is speed  # auto, as resolved
    assert speed.for_model(torch.nn.Linear(1, 1)) is speed  # no spec: nothing to follow
    trained = P.resolve_speed("cpu", training=True, attention="eager")  # mode and dtype are the choices' own
    kind, why = A.AUTO_RULES["cpu", "fp32", "train"]
    auto = trained.for_model(build_model(ModelSpec("tiny", 64, "frozen")))
    assert (auto.attention, auto.attention_kind, auto.attention_reason) == ("auto", kind, f"{kind}: {why}")


def test_slice_batch_auto_is_one_for_lite_medsam_on_cpu_and_an_explicit_size_wins():
    from cobot_med.model import ModelSpec, build_model
    from cobot_med.settings import load_settings

    auto = load_settings("adome")
    assert auto.eval_batch_size == "auto"
    assert auto.slice_batch("cpu") == 8 and auto.slice_batch("cuda") == 8  # vit_b, the bundles' default arch
    assert load_settings("adome", arch="lite_medsam").slice_batch("cpu") == 1
    assert load_settings("adome", arch="lite_medsam").slice_batch("cuda") == 8
    tiny = build_model(ModelSpec("tiny", 64, "frozen"))
    assert load_settings("adome", arch="lite_medsam").slice_batch("cpu", tiny) == 8  # the network's own arch wins
    assert load_settings("adome", arch="lite_medsam", eval_batch_size=4).slice_batch("cpu") == 4
    assert load_settings("adome", eval_batch_size="16").slice_batch("cpu") == 16
