"""FLOPs of SAM's image encoder, decoder and a PEFT training step, counted with torch.utils.flop_counter
(one JSON line + a table), and this machine's matrix-multiply peak.

    python benchmarks/flops.py [--arch vit_b] [--sizes 1024 512 256] [--organs 4] [--peft lora+cobot]
        [--no-peak]

Counts run on the meta device (shapes only, seconds). "reference" is segment-anything's own
computation (eager attention, padded tokens computed, one encoder pass per organ); "ours" the
default attention kind with padded tokens skipped and one encoder pass for all organs, counted
with each core of the ``onehot`` attention: ``matmul`` (what runs in bf16 on a CPU) and ``sdpa``
(on CUDA and in fp32; it pads v to the augmented head dim, so it counts more FLOPs). A
multiply-add counts as 2 FLOPs. The peak is the best of a few large matrix multiplies
(fp32, and bf16 where supported) on the chosen device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cobot_med.engine import precision as P  # noqa: E402
from cobot_med.model import ModelSpec, build_model  # noqa: E402
from cobot_med.sam.attention import OneHotAttention  # noqa: E402

CORES = ("matmul", "sdpa")  # the onehot attention's two cores (see cobot_med/sam/attention.py)


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def set_core(model, core: str) -> None:
    """Force the ``onehot`` attention's core (``sdpa``: CUDA and fp32; ``matmul``: bf16 on CPU)."""
    for block in model.sam.image_encoder.blocks:
        if isinstance(block.attn, OneHotAttention):
            block.attn.core = core


def count(arch: str, size: int, organs: int, peft: str) -> dict[str, float]:
    """GFLOP of SAM's encoder forward (no PEFT; reference and ours with each onehot core), one box's
    decode, and a PEFT training step (forward + backward) per slice with ``organs`` boxes."""
    out: dict[str, float] = {}
    images = torch.empty(1, 3, size, size, device="meta")
    boxes = torch.zeros(1, organs, 4, device="meta")
    plain = build_model(ModelSpec(arch=arch, image_size=size, peft="frozen")).to("meta").eval()
    C.configure(plain, C.REFERENCE)
    with torch.no_grad():
        out["encoder_reference"] = _count(lambda: plain.encode(images)) / 1e9
    onehot = dataclasses.replace(C.OURS, attention="onehot")  # counted per core (on meta, auto would not know)
    C.configure(plain, onehot)
    for core in CORES:
        set_core(plain, core)
        with torch.no_grad():
            out[f"encoder_ours_{core}"] = _count(lambda: plain.encode(images)) / 1e9
    with torch.no_grad():
        embeddings = plain.encode(images)
        out["decoder_per_box"] = _count(lambda: plain.decode(embeddings, boxes[:, :1])) / 1e9

    model = build_model(ModelSpec(arch=arch, image_size=size, peft=peft)).to("meta").train()

    def step(path):
        def run():
            groups = [slice(None)] if path.one_pass else [slice(k, k + 1) for k in range(organs)]
            for group in groups:
                model(images, boxes[:, group]).float().sum().backward()

        return run

    C.configure(model, C.REFERENCE)
    out["train_step_reference"] = _count(step(C.REFERENCE)) / 1e9
    C.configure(model, onehot)
    for core in CORES:
        set_core(model, core)
        out[f"train_step_ours_{core}"] = _count(step(onehot)) / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_b")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 512, 256])
    parser.add_argument("--organs", type=int, default=4)
    parser.add_argument("--peft", default="lora+cobot")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-peak", action="store_true", help="skip the matrix-multiply peak measurement")
    args = parser.parse_args()
    args.device = C.pick_device(args.device)
    P.plan_threads(args.device, num_workers=0).apply()

    rows = [{"image_size": size, **count(args.arch, size, args.organs, args.peft)} for size in args.sizes]
    peak = {}
    if not args.no_peak:
        peak = {"fp32": C.matmul_peak(args.device, torch.float32), "bf16": C.matmul_peak(args.device, torch.bfloat16)}
    result = {
        "benchmark": "flops", "arch": args.arch, "organs": args.organs, "peft": args.peft,
        "machine": C.machine(args.device), "matmul_peak_gflops": peak, "sizes": rows,
    }
    print(json.dumps(result))
    print(f"\nGFLOP, {args.arch}, {args.peft}, {args.organs} organs per slice (a multiply-add = 2 FLOPs)")
    print(C.table(rows, [
        ("image_size", "input", "d"), ("encoder_reference", "encoder fwd (segment-anything)", ".1f"),
        ("encoder_ours_matmul", "ours, matmul core", ".1f"), ("encoder_ours_sdpa", "ours, sdpa core", ".1f"),
        ("decoder_per_box", "decoder / box", ".2f"),
        ("train_step_reference", "train step / slice (ref)", ".1f"),
        ("train_step_ours_matmul", "ours, matmul core", ".1f"), ("train_step_ours_sdpa", "ours, sdpa core", ".1f"),
    ]))
    if peak:
        print(f"\nmatrix-multiply peak on {args.device}: " + ", ".join(
            f"{k} {v:.0f} GFLOP/s" if v else f"{k} n/a" for k, v in peak.items())
            + f" (load {result['machine']['load_average']}; machine class {result['machine']['machine_class']})")


if __name__ == "__main__":
    main()
