"""Exported models on ONNX Runtime and OpenVINO against torch and the reference ways, in one run (issue 25).

    python benchmarks/export.py [--shape 512 512 100] [--organs 4] [--vit-shape 512 512 8] [--vit-size 1024]
        [--skip-lite] [--skip-vit] [--int8] [--repeats 1] [--threads auto|N] [--amp auto|...]

**LiteMedSAM** (the pretrained weights that ship with the install), whole-volume inference of a CT-like 512² volume
with K organs side by side (``benchmarks/lite_medsam.py``'s volume: every slice with organs holds all K):

- *LiteMedSAM's way*: the authors' model fed by the official script's 3D loop (one encoder call per box, fp32);
- *ours, torch*: ``cobot-med infer``'s predictor (``SlicePredictor``, ``predict_volume``, ``to_label_map``) on the
  torch model, in fp32 and with the defaults as they resolve here (``amp=auto``);
- *ours, onnxruntime* / *ours, openvino*: the same predictor on the model exported by ``cobot_med.export`` (fp32 on
  ONNX Runtime; OpenVINO at the precision ``amp`` resolves to, and in fp32);
- with ``--int8``: the encoder statically quantised (ONNX Runtime, calibrated on every other slice of this volume)
  on both runtimes.

Per path: seconds per volume (after a warm-up on three slices; the median of ``--repeats`` timed runs, alternating),
label agreement (mean Dice over organs against ours on torch in fp32), and peak memory: ``held`` (the resident memory
its model or runtime session added when it was loaded and warmed up; one torch model serves both torch rows) plus
``+peak`` (the resident-set high-water mark during the volume above the level before it, ``_common.PeakRss``). All
paths share one process: the libraries (torch, each runtime and its CPU plugin, loaded by a throwaway session first)
are in no row.

**SAM ViT-B** at ``--vit-size`` (1024 by default; random weights, ``lora+cobot`` with non-zero branches, as every
ViT benchmark here), on ``--vit-shape``: the reference path of ``benchmarks/inference.py`` (segment-anything's
attention, fp32, one encoder pass per organ and slice, LoRA unmerged), ours on torch (its defaults), and ours on the
exported (merged) model on ONNX Runtime and OpenVINO, through ``benchmarks/inference.py``'s model-level loop.
Agreement is against the reference (fp32 torch).

**Encoder GFLOP/s**: the image encoder's FLOPs per slice (``torch.utils.flop_counter``, a multiply-add = 2) over the
median time of one encoder call per backend, beside the machine's matrix-multiply peak measured in this run (fp32
and bf16, ``_common.matmul_peak``). The label map each timed run produced is the one scored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from inference import dice_agreement, ours, prepare, reference  # noqa: E402
from lite_medsam import official_model, official_volume, side_by_side_volume  # noqa: E402

from cobot_med.export.exporter import export_model  # noqa: E402
from cobot_med.export.manifest import read_export  # noqa: E402
from cobot_med.export.runtime import ExportedSam, runtime_precision  # noqa: E402
from cobot_med.model import ModelSpec, build_model  # noqa: E402

TARGET_SPEEDUP, TARGET_AGREEMENT = 10.0, 0.99


def our_volume(network, volume: np.ndarray, labels: np.ndarray, organs: int, batch: int, amp) -> torch.Tensor:
    """``cobot-med infer``'s path (``benchmarks/lite_medsam.py``'s ``our_volume``) for any network on the CPU, the
    exported ones included: the slice predictor on the label-derived boxes; (X, Y, Z) labels."""
    from cobot_med.predict import SlicePredictor, predict_volume, to_label_map
    from cobot_med.predict.prompts import from_labels

    names = {f"organ{k}": k for k in range(1, organs + 1)}
    prompts = from_labels(torch.from_numpy(labels.astype(np.int64))[None], names)
    probs, _ = predict_volume(SlicePredictor(network, "cpu", batch, amp), torch.from_numpy(volume), prompts)
    return to_label_map(probs, list(names.values()))[0].to(torch.uint8)


def encoder_gflop(model, image_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.rand(1, 3, image_size, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode(images)
    return counter.get_total_flops() / 1e9


def encoder_seconds(network, image_size: int, amp, repeats: int = 3) -> float:
    """The median of ``repeats`` one-slice encoder calls after a warm-up."""
    images = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.no_grad(), C.autocast("cpu", amp):
            network.encode(images)
        if i:
            times.append(time.perf_counter() - start)
    return C.median(times)


def rss_mib() -> float:
    return C._status_kib("VmRSS") / 1024


def loaded(make):
    """``make()`` and the resident memory it added (MiB): what a model or a runtime session holds."""
    import gc

    gc.collect()
    before = rss_mib()
    value = make()
    return value, rss_mib() - before


def run_paths(paths: dict, warm: dict, repeats: int, held: dict) -> tuple[dict, dict, dict]:
    """Warm each path up (the memory a warm-up leaves resident is added to ``held``: arenas, caches), then time it
    ``repeats`` times, alternating; the label map of the last run and the peak memory above the level before it."""
    for name, fn in warm.items():
        _, mib = loaded(fn)
        held[name] = held.get(name, 0.0) + max(mib, 0.0)
        C.progress(f"warmed up {name}")
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    maps, peaks = {}, {}
    for _ in range(repeats):
        for name, fn in paths.items():
            with C.PeakRss() as peak:
                start = time.perf_counter()
                maps[name] = fn()
                seconds[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks.get(name, 0.0), peak.peak_mib)
            C.progress(f"timed {name}: {seconds[name][-1]:.1f} s, peak {peak.peak_mib:.0f} MiB")
    return seconds, maps, peaks


def emulated_backends() -> tuple[tuple[str, ...], str | None]:
    """The runtimes whose rows mean what the machine class says, and why any is left out.

    Under an ISA cap (the AVX2 class emulated on an AVX-512 machine, BENCHMARKS.md): OpenVINO 2026.4 honours
    ``OV_CPU_MAX_ISA`` for its own kernels and ``ONEDNN_MAX_CPU_ISA`` for its oneDNN (checked: with both at AVX2 its
    CPU capabilities drop BF16 and oneDNN runs ``brg_conv_fwd:avx2`` in fp32), so it needs both, at the same value.
    ONNX Runtime has no cap (MLAS dispatches on the CPU's own features): its row would be the CPU's own class under
    an emulated label, so it is left out."""
    limits = dict(C.P.cpu_info().isa_limits)
    if not limits:
        return ("onnxruntime", "openvino"), None
    onednn = limits.get("ONEDNN_MAX_CPU_ISA") or limits.get("DNNL_MAX_CPU_ISA")
    if (onednn or "").lower() != limits.get("OV_CPU_MAX_ISA", "").lower():
        raise SystemExit("benchmarks/export.py: an emulated class needs OV_CPU_MAX_ISA and ONEDNN_MAX_CPU_ISA at the same "
                         f"value (OpenVINO reads one for its own kernels, its oneDNN the other); set: {limits}")
    return ("openvino",), ("ONNX Runtime left out: it has no ISA cap (MLAS dispatches on the CPU's own features), so "
                           "its time would be the CPU's own class, not the emulated one")


def exported_networks(folder: Path, amp, threads: int, held: dict,
                      int8_folder: Path | None = None) -> dict[str, tuple]:
    """name -> (network, its precision, why) for ONNX Runtime, OpenVINO at ``amp``'s precision and in fp32; the
    memory each session holds goes into ``held``."""
    exported = read_export(folder)
    out = {}
    from cobot_med.export.runtime import _Graph

    backends, _ = emulated_backends()
    for backend in backends:  # load each runtime's libraries and plugins before measuring
        _Graph(backend, exported.graph_file("mask_decoder", "onnx"), "fp32", threads)

    def add(name, exported, backend, precision, why):
        network, held[name] = loaded(lambda: ExportedSam(exported, backend, precision, threads))
        out[name] = (network, precision, why)

    for backend in backends:
        precision, why = runtime_precision(backend, amp, exported)
        name = f"ours, {backend}" + ("" if precision == "fp32" or backend == "onnxruntime" else f" {precision}")
        add(name, exported, backend, precision, why)
    if "ours, openvino" not in out:
        add("ours, openvino", exported, "openvino", "fp32", "fp32 (asked for)")
    if int8_folder is not None:
        quantised = read_export(int8_folder)
        for backend in backends:
            add(f"ours, {backend} int8", quantised, backend, "int8", "int8 (explicit)")
    return out


def lite_medsam(args, threads: C.P.ThreadPlan, amp, workdir: Path) -> dict:
    volume, labels = side_by_side_volume(tuple(args.shape), args.organs, args.seed)
    boxes = int(sum((labels[:, :, z] == k).any() for z in range(labels.shape[2]) for k in range(1, args.organs + 1)))
    slices = int((labels > 0).any(axis=(0, 1)).sum())
    C.progress(f"LiteMedSAM: {args.shape} volume, {slices} slices with organs, {boxes} slice-organ boxes")
    held: dict[str, float] = {}
    official, held["LiteMedSAM's way"] = loaded(official_model)
    model, mib = loaded(lambda: build_model(ModelSpec(arch="lite_medsam", peft="frozen")).eval())
    C.progress("exporting LiteMedSAM (ONNX and OpenVINO IR)")
    started = time.perf_counter()
    folder = export_model(build_model(ModelSpec(arch="lite_medsam", peft="frozen")), workdir / "lite_medsam",
                          ["onnx", "openvino"])
    export_seconds = time.perf_counter() - started
    int8_folder = None
    int8_record = None
    if args.int8:
        int8_folder, int8_record = quantise_on_volume(folder, workdir, volume, labels, args.organs, model.recipe)
    networks = exported_networks(folder, amp, threads.torch_threads, held, int8_folder)
    K = args.organs
    first = [z for z in range(labels.shape[2]) if (labels[:, :, z] > 0).any()][:3]
    small_volume, small_labels = volume[:, :, first], labels[:, :, first]
    torch_amp = C.P.resolve_precision(amp, "cpu", training=False)
    paths = {
        "LiteMedSAM's way": lambda v=volume, lab=labels: official_volume(official, v, lab, K),
        "ours, torch fp32": lambda v=volume, lab=labels: our_volume(model, v, lab, K, 1, "fp32"),
    }
    if torch_amp.name != "fp32":  # where amp resolves to fp32 (the AVX2 class) the fp32 row is the defaults' row
        paths[f"ours, torch {torch_amp.name}"] = lambda v=volume, lab=labels: our_volume(model, v, lab, K, 1, torch_amp)
    for name in paths:
        if name.startswith("ours, torch"):
            held[name] = mib  # one torch model for both precisions
    for name, (network, _, _) in networks.items():
        paths[name] = lambda v=volume, lab=labels, n=network: our_volume(n, v, lab, K, 1, False)
    warm = {name: (lambda fn=fn: fn(small_volume, small_labels)) for name, fn in paths.items()}
    seconds, maps, peaks = run_paths(paths, warm, args.repeats, held)
    base_map = maps["ours, torch fp32"]
    medians = {name: C.median(t) for name, t in seconds.items()}
    own = medians["LiteMedSAM's way"]
    gflop = encoder_gflop(model, 256)
    encoder = {"ours, torch fp32": encoder_seconds(model, 256, "fp32"),
               f"ours, torch {torch_amp.name}": encoder_seconds(model, 256, torch_amp)}
    for name, (network, _, _) in networks.items():
        encoder[name] = encoder_seconds(network, 256, False)
    rows = {name: {"seconds": medians[name], "speedup": own / medians[name],
                   "agreement": dice_agreement(maps[name], base_map, K), "held_mib": held[name],
                   "peak_mib": peaks[name], "total_mib": held[name] + peaks[name],
                   "encoder_s": encoder.get(name), "encoder_gflops": gflop / encoder[name] if name in encoder else None}
            for name in paths}
    return {"volume": list(args.shape), "organs": K, "slices_with_organs": slices, "slice_organ_boxes": boxes,
            "seconds": seconds, "rows": rows, "encoder_gflop_per_slice": gflop,
            "precisions": {name: {"precision": p, "reason": why} for name, (_, p, why) in networks.items()},
            "torch_precision": {"precision": torch_amp.name, "reason": torch_amp.reason},
            "export_seconds": export_seconds, "int8": int8_record}


def quantise_on_volume(folder: Path, workdir: Path, volume: np.ndarray, labels: np.ndarray, organs: int, recipe):
    """The export's encoder quantised to int8 on every other slice with organs of the benchmark volume."""
    import shutil

    from cobot_med.export import quantize as Q

    zs = [z for z in range(labels.shape[2]) if (labels[:, :, z] > 0).any()][::2][:64]
    images = [recipe.prepare(torch.from_numpy(volume[:, :, z])[None])[0].numpy() for z in zs]
    target = workdir / "lite_medsam_int8"
    shutil.copytree(folder, target)
    encoder = "image_encoder.onnx"
    C.progress(f"int8: calibrating on {len(images)} slices of the benchmark volume")
    Q._quantize(folder / encoder, target / encoder, images)
    manifest = json.loads((target / "cobot_med_export.json").read_text())
    manifest["graphs"] = {g: {"onnx": manifest["graphs"][g]["onnx"]} for g in manifest["graphs"]}
    shutil.rmtree(target / "openvino", ignore_errors=True)
    manifest["precision"] = "int8"
    manifest["files"] = {p.name: Q.sha256(p) for p in target.glob("*.onnx")}
    (target / "cobot_med_export.json").write_text(json.dumps(manifest, indent=2))
    return target, {"calibration_slices": len(images), "method": "onnxruntime quantize_static QDQ, MinMax"}


def vit_b(args, threads: C.P.ThreadPlan, amp, workdir: Path) -> dict:
    volume, labels = side_by_side_volume(tuple(args.vit_shape), args.organs, args.seed)
    size = args.vit_size
    s = prepare(volume, labels, args.organs, size, "cpu")
    C.progress(f"ViT-B at {size} px: {args.vit_shape} volume, {int(s.valid.sum())} slice-organ boxes")
    held: dict[str, float] = {}
    model, held["reference"] = loaded(lambda: C.make_model("vit_b", size, "lora+cobot", "cpu").eval())
    choices = C.resolve_ours("cpu", training=False, amp=amp)
    merged, held_ours = loaded(lambda: build_model(ModelSpec(arch="vit_b", image_size=size, peft="lora+cobot")).eval())
    merged.load_state_dict(model.state_dict())
    C.configure(merged, choices.path)
    from cobot_med.peft import merge_adapters

    merge_adapters(merged)
    C.progress("exporting ViT-B (ONNX and OpenVINO IR)")
    started = time.perf_counter()
    twin = build_model(ModelSpec(arch="vit_b", image_size=size, peft="lora+cobot")).eval()
    twin.load_state_dict(model.state_dict())
    folder = export_model(twin, workdir / "vit_b", ["onnx", "openvino"])
    export_seconds = time.perf_counter() - started
    del twin
    networks = exported_networks(folder, amp, threads.torch_threads, held)
    C.configure(model, C.REFERENCE)
    first = torch.nonzero(s.valid.any(dim=1)).flatten().tolist()[:1]
    small = dataclasses.replace(s, images=s.images, valid=torch.zeros_like(s.valid))
    small.valid[first] = s.valid[first]
    ours_path = dataclasses.replace(choices.path, name="ours")
    fp32_path = dataclasses.replace(C.OURS, amp="fp32")
    paths = {"reference": lambda x=s: reference(model, x, C.REFERENCE, "cpu"),
             f"ours, torch {C.dtype_name(ours_path)}": lambda x=s: ours(merged, x, ours_path, "cpu", 8)}
    held[f"ours, torch {C.dtype_name(ours_path)}"] = held_ours
    for name, (network, _, _) in networks.items():
        paths[name] = lambda x=s, n=network: ours(n, x, fp32_path, "cpu", 1)
    warm = {name: (lambda fn=fn: fn(small)) for name, fn in paths.items()}
    seconds, maps, peaks = run_paths(paths, warm, args.repeats, held)
    medians = {name: C.median(t) for name, t in seconds.items()}
    base = medians["reference"]
    gflop = encoder_gflop(model, size)  # segment-anything's computation (the reference's)
    torch_amp = C.P.resolve_precision(amp, "cpu", training=False)
    encoder = {"reference": encoder_seconds(model, size, "fp32", repeats=1)}
    encoder[f"ours, torch {C.dtype_name(ours_path)}"] = encoder_seconds(merged, size, torch_amp, repeats=1)
    for name, (network, _, _) in networks.items():
        encoder[name] = encoder_seconds(network, size, False, repeats=1)
    rows = {name: {"seconds": medians[name], "speedup": base / medians[name],
                   "agreement": dice_agreement(maps[name], maps["reference"], args.organs), "held_mib": held[name],
                   "peak_mib": peaks[name], "total_mib": held[name] + peaks[name],
                   "encoder_s": encoder[name], "encoder_gflops": gflop / encoder[name]} for name in paths}
    return {"volume": list(args.vit_shape), "image_size": size, "organs": args.organs,
            "slice_organ_boxes": int(s.valid.sum()), "seconds": seconds, "rows": rows,
            "encoder_gflop_per_slice": gflop, "ours": choices.describe(), "export_seconds": export_seconds,
            "precisions": {name: {"precision": p, "reason": why} for name, (_, p, why) in networks.items()}}


def print_section(title: str, result: dict, base_name: str, agreement_of: str) -> None:
    print(f"\n{title}")
    rows = [{"path": name, **row} for name, row in result["rows"].items()]
    print(C.table(rows, [("path", "path", "s"), ("seconds", "s/volume", ".1f"), ("speedup", f"x {base_name}", ".2f"),
                         ("agreement", f"Dice vs {agreement_of}", ".4f"), ("held_mib", "held MiB", ".0f"),
                         ("peak_mib", "+peak MiB", ".0f"), ("total_mib", "peak MiB", ".0f"),
                         ("encoder_s", "encoder s/slice", ".3f"), ("encoder_gflops", "encoder GFLOP/s", ".1f")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 100), metavar=("X", "Y", "Z"))
    parser.add_argument("--organs", type=int, default=4)
    parser.add_argument("--vit-shape", type=int, nargs=3, default=(512, 512, 8), metavar=("X", "Y", "Z"))
    parser.add_argument("--vit-size", type=int, default=1024)
    parser.add_argument("--skip-lite", action="store_true")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--int8", action="store_true", help="also the int8 encoder (explicit, as in cobot-med export)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the exports go (default: a temporary folder)")
    C.add_speed_arguments(parser)
    args = parser.parse_args()
    args.device = "cpu"
    torch.manual_seed(args.seed)
    choices, threads = C.apply_speed_arguments(args, training=False)
    amp = args.dtype if args.dtype is not None else (args.amp if args.amp is not None else "auto")
    C.print_choices(choices, threads, "cpu")
    import onnxruntime
    import openvino

    print(f"date {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"openvino {openvino.__version__}, load average {C.machine('cpu')['load_average']}")
    result = {"machine": C.machine("cpu"), "date": time.strftime("%Y-%m-%d"),
              "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}}
    _, left_out = emulated_backends()
    if left_out:
        print(left_out)
        result["left_out"] = left_out
    peak = {"fp32": C.matmul_peak("cpu", torch.float32), "bf16": C.matmul_peak("cpu", torch.bfloat16)}
    result["matmul_peak_gflops"] = peak
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cobot-med-bench-", dir=args.workdir) as workdir:
        if not args.skip_lite:
            result["lite_medsam"] = lite_medsam(args, threads, amp, Path(workdir))
        if not args.skip_vit:
            result["vit_b"] = vit_b(args, threads, amp, Path(workdir))
    print(json.dumps(result, default=float))
    print(f"\nmachine class: {result['machine']['machine_class']}; matrix-multiply peak measured in this run: fp32 "
          f"{peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s" if peak["bf16"] else "")
    if "lite_medsam" in result:
        lite = result["lite_medsam"]
        print_section(f"LiteMedSAM (pretrained), whole volume {tuple(lite['volume'])}, {lite['organs']} organs side by "
                      f"side: {lite['slices_with_organs']} slices with organs, {lite['slice_organ_boxes']} slice-organ "
                      f"boxes; encoder {lite['encoder_gflop_per_slice']:.1f} GFLOP per slice",
                      lite, "LiteMedSAM's way", "torch fp32")
        for name, p in lite["precisions"].items():
            print(f"  {name}: {p['reason']}")
        print(f"  ours, torch: {lite['torch_precision']['reason']}")
        met = [name for name, row in lite["rows"].items() if name != "LiteMedSAM's way"
               and row["speedup"] >= TARGET_SPEEDUP and row["agreement"] >= TARGET_AGREEMENT]
        print(f"  target (>= {TARGET_SPEEDUP:.0f}x LiteMedSAM's way with Dice agreement >= {TARGET_AGREEMENT}): "
              + (f"met by {', '.join(met)}" if met else "not met by any path in this run"))
    if "vit_b" in result:
        vit = result["vit_b"]
        print_section(f"SAM ViT-B at {vit['image_size']} px (random weights, lora+cobot), volume {tuple(vit['volume'])}, "
                      f"{vit['slice_organ_boxes']} slice-organ boxes; encoder {vit['encoder_gflop_per_slice']:.0f} GFLOP "
                      "per slice (segment-anything's computation)", vit, "reference", "the reference (fp32 torch)")
        for name, p in vit["precisions"].items():
            print(f"  {name}: {p['reason']}")


if __name__ == "__main__":
    main()
