"""PEFT training step, our path against the reference path: slices/s and peak memory (one JSON line + a table).

    python benchmarks/train_step.py [--arch vit_b] [--image-size 256] [--organs 4] [--batch 2]
        [--peft lora+cobot] [--device auto] [--repeats 3] [--budget 60] [--ablations] [--compile]
        [--no-memory] [--amp auto|true|false|bf16|fp16 | --dtype auto|fp32|bf16|fp16]
        [--attention auto|onehot|sdpa|eager] [--threads auto|N]

A step is forward + backward of a batch of ``--batch`` slices with ``--organs`` box prompts each
(image encoder with the PEFT method, prompt encoder, mask decoder, BCE on the low-res logits),
no optimiser step. Reference: segment-anything's attention, fp32, one encoder pass per organ
(each pass decodes its one box and runs its own backward, gradients accumulate). Ours: the
project's defaults as they resolve on this machine (``amp=auto``: bf16 where the CPU or GPU runs
it fast, else fp32; ``attention=auto``; threads = physical cores), padded tokens skipped, one
encoder pass for the K boxes; the capability found and each choice with its reason are printed.
Both run on one model (switches flipped in place: same weights) and the same inputs, alternating
after a warm-up (the check's step); the median is reported, each path timed at most ``--repeats``
times and no more once its timed runs pass ``--budget`` seconds. Before timing, the outputs, loss
and gradients of our path are checked against the reference (fp32: 1e-4; bf16/fp16: the
tolerances below). Peak memory is measured in a fresh process per path (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

FP32_TOLERANCE = 1e-4  # relative L2, our path in fp32 against the reference
BF16_TOLERANCE = {"logits": 5e-2, "gradients": 1e-1}  # relative L2, our path in bf16 against the reference


def make_batch(batch: int, organs: int, size: int, device: str, seed: int = 0):
    """Images (B,3,S,S) in [0,255], K boxes per slice and their low-res (S/4) elliptic masks."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g) * 255
    lo = torch.rand(batch, organs, 2, generator=g) * size * 0.5
    extent = (torch.rand(batch, organs, 2, generator=g) * 0.4 + 0.1) * size
    boxes = torch.cat([lo, (lo + extent).clamp(max=size - 1)], dim=-1)  # XYXY
    low = size // 4
    yy, xx = torch.meshgrid(torch.arange(low) + 0.5, torch.arange(low) + 0.5, indexing="ij")
    b = boxes[..., None, None] / 4
    cx, cy = (b[:, :, 0] + b[:, :, 2]) / 2, (b[:, :, 1] + b[:, :, 3]) / 2
    rx, ry = (b[:, :, 2] - b[:, :, 0]) / 2, (b[:, :, 3] - b[:, :, 1]) / 2
    masks = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).float()
    return images.to(device), boxes.to(device), masks.to(device)


def train_step(model, path: C.PathConfig, batch, device: str, meter: C.SavedTensors | None = None):
    """Forward + backward; returns (loss, logits (B,K,h,w)). K passes (one box each) unless ``path.one_pass``."""
    images, boxes, masks = batch
    K = boxes.shape[1]
    model.zero_grad(set_to_none=True)
    groups = [slice(None)] if path.one_pass else [slice(k, k + 1) for k in range(K)]
    total, outputs = 0.0, []
    for group in groups:
        with meter.forward_pass() if meter else contextlib.nullcontext():
            with C.amp_context(path, device):
                logits = model(images, boxes[:, group])
            loss = F.binary_cross_entropy_with_logits(logits.float(), masks[:, group]) * (logits.shape[1] / K)
        loss.backward()
        total += float(loss.detach())
        outputs.append(logits.detach().float())
    return total, torch.cat(outputs, dim=1)


def gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])


def check(model, paths, batch, device, runners=None):
    """Our paths' logits/loss/gradients against the reference's, and each path's FLOPs per step."""
    results, flops = {}, {}
    for path in paths:
        C.configure(model, path)
        counter = FlopCounterMode(display=False) if not path.compile else contextlib.nullcontext()
        with counter:
            loss, logits = train_step((runners or {}).get(path.name, model), path, batch, device)
        C.progress(f"checked {path.name}")
        results[path.name] = (loss, logits, gradients(model))
        if not path.compile:
            flops[path.name] = counter.get_total_flops()
    ref = results["reference"]
    report = {}
    for name, (loss, logits, grads) in results.items():
        if name == "reference":
            continue
        report[name] = {
            "logits": C.relative_error(logits, ref[1]),
            "loss": abs(loss - ref[0]) / abs(ref[0]),
            "gradients": C.relative_error(grads, ref[2]),
        }
    return report, flops


def memory_child(args) -> None:
    """In a fresh process: build, one warm-up step, then the peak memory of one measured step."""
    path = C.PathConfig(**json.loads(args.child_memory))
    model = C.make_model(args.arch, args.image_size, args.peft, args.device, args.seed)
    model.train()
    C.configure(model, path)
    run = C.maybe_compile(model, path)
    batch = make_batch(args.batch, args.organs, args.image_size, args.device, args.seed)
    train_step(run, path, batch, args.device)  # warm-up: one-time allocations (kernels, thread pools)
    model.zero_grad(set_to_none=True)
    meter = C.SavedTensors(model)
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(run, path, batch, args.device, meter)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with C.PeakRss() as rss:
            train_step(run, path, batch, args.device, meter)
        peak = rss.peak_mib
    print(json.dumps({"peak_mib": peak, "saved_mib": meter.peak_bytes / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_b")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--organs", type=int, default=4, help="box prompts (organs) per slice, K")
    parser.add_argument("--batch", type=int, default=2, help="slices per step")
    parser.add_argument("--peft", default="lora+cobot")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed alternations (after the check or a warm-up)")
    parser.add_argument("--ablations", action="store_true", help="also time our path with each switch off")
    parser.add_argument("--compile", action="store_true", help="also time our path with torch.compile")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-path memory processes")
    parser.add_argument("--no-check", action="store_true", help="skip the output check (not recommended)")
    C.add_speed_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = C.pick_device(args.device)
    choices, threads = C.apply_speed_arguments(args, training=True)
    if args.child_memory:
        return memory_child(args)

    ours = choices.path
    paths = [C.REFERENCE, ours]
    if args.ablations:
        paths += C.ablations(choices, training=True)
    if args.compile and not ours.compile:
        paths.append(dataclasses.replace(ours, name="ours + torch.compile", compile=True))
    C.print_choices(choices, threads, args.device)

    model = C.make_model(args.arch, args.image_size, args.peft, args.device, args.seed)
    model.train()
    batch = make_batch(args.batch, args.organs, args.image_size, args.device, args.seed)
    C.progress(f"built {args.arch}")

    runners = {p.name: C.maybe_compile(model, p) for p in paths}  # the fp32 twin of ours runs eager
    checks, flops, checked = {}, {}, []
    if not args.no_check:
        checked = [C.REFERENCE, ours] + [p for p in paths if p.compile and p is not ours]
        if C.dtype_name(ours) != "fp32":  # ours is also checked in fp32, at fp32 tolerance
            checked.insert(1, C.fp32_twin(ours, "ours in fp32"))
        checks, flops = check(model, checked, batch, args.device, runners)
        ok = all(checks[p.name][k] <= (FP32_TOLERANCE if C.dtype_name(p) == "fp32" else tol)
                 for p in checked[1:] for k, tol in BF16_TOLERANCE.items())
        if not ok:
            raise SystemExit(f"our path does not match the reference: {json.dumps(checks)}")

    def step_fn(path):
        def run():
            C.configure(model, path)
            train_step(runners[path.name], path, batch, args.device)

        return run

    warm = [p.name for p in checked]  # the check ran them once
    times = C.alternate({p.name: step_fn(p) for p in paths}, args.repeats, args.device, warm, args.budget)

    memory = {}
    if not args.no_memory:
        script = Path(__file__).resolve()
        base_args = [
            "--arch", args.arch, "--image-size", str(args.image_size), "--organs", str(args.organs),
            "--batch", str(args.batch), "--peft", args.peft, "--device", args.device, "--seed", str(args.seed),
        ]
        base_args += ["--threads", str(threads.torch_threads)]
        for path in paths:
            child = base_args + ["--child-memory", json.dumps(dataclasses.asdict(path))]
            os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors leave the RSS at once
            memory[path.name] = C.run_child(script, child)
            C.progress(f"memory of {path.name}: {memory[path.name]['peak_mib']:.0f} MiB")

    # the machine's matrix-multiply peak, measured here in the same process (4096^3, best of 3)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {name: C.matmul_peak(args.device, dtypes[name]) for name in dict.fromkeys(["fp32", "bf16", C.dtype_name(ours)])}
    C.progress("measured the matrix-multiply peak")
    ref_s = C.median(times["reference"])
    rows = []
    for path in paths:
        s = C.median(times[path.name])
        row = {
            "path": path.name,
            "switches": path.switches(),
            "seconds_per_step": s,
            "seconds_all": [round(t, 3) for t in times[path.name]],
            "slices_per_second": args.batch / s,
            "speedup": ref_s / s,
        }
        row.update(memory.get(path.name, {}))
        if path.name in flops and path.name in ("reference", "ours"):
            gflop = flops[path.name] / 1e9
            row["gflop_per_step"] = gflop
            row["gflops_achieved"] = gflop / s
            peak = peaks.get(C.dtype_name(path))
            row["peak_fraction"] = gflop / s / peak if peak else None
        rows.append(row)
    ours_row = rows[1]
    result = {
        "benchmark": "train_step",
        "arch": args.arch, "image_size": args.image_size, "organs": args.organs, "batch": args.batch,
        "peft": args.peft, "repeats": args.repeats,
        "machine": C.machine(args.device),
        "choices": {**choices.describe(), "threads": threads.describe()},
        "matmul_peak_gflops": peaks,
        "speedup": ours_row["speedup"],
        "memory_ratio": (ours_row["peak_mib"] / rows[0]["peak_mib"]) if memory else None,
        "check": checks,
        "paths": rows,
    }
    print(json.dumps(result))
    print()
    C.print_choices(choices, threads, args.device)
    print(f"training step: {args.arch} at {args.image_size}px, {args.batch} slices x {args.organs} organs, "
          f"{args.peft}, {args.device} ({result['machine']['threads']} threads, load {result['machine']['load_average']})")
    print(C.table(rows, [
        ("path", "path", ""), ("seconds_per_step", "s/step", ".2f"), ("slices_per_second", "slices/s", ".2f"),
        ("speedup", "x ref", ".2f"), ("peak_mib", "peak MiB", ".0f"), ("saved_mib", "saved MiB", ".0f"),
        ("gflop_per_step", "GFLOP/step", ".0f"), ("gflops_achieved", "GFLOP/s", ".1f"),
        ("peak_fraction", "of peak", ".0%"),
    ]))
    if checks:
        print("\nchecked before timing (relative L2 against the reference): " + "; ".join(
            f"{name}: logits {c['logits']:.1e}, loss {c['loss']:.1e}, gradients {c['gradients']:.1e}"
            for name, c in checks.items()))
    print("matrix-multiply peak measured in this run (GFLOP/s, 'of peak' is against the path's dtype): "
          + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items() if v))


if __name__ == "__main__":
    main()
