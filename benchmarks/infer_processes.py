"""Batch inference in one process with T threads against P processes (torchrun, gloo) with T/P threads each.

The same cases, the same adapter, the same command line (``cobot-med infer``), alternating the two ways
``--repeats`` times; each way's wall time includes what a user waits for (process start, model load, every
case read, predicted and written). Prints one JSON line and a table; the label maps of the two ways are
compared (Dice agreement; they differ only where thread counts change float rounding at the threshold).

    python benchmarks/infer_processes.py                      # LiteMedSAM, 8 phantom cases, 2 x 1 vs 1 x 2
    python benchmarks/infer_processes.py --arch tiny --cases 4  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def prepare(folder: Path, arch: str, image_size: int | None, cases: int, shape: tuple[int, int, int]) -> Path:
    import torch

    from cobot_med.adapter import save_adapter
    from cobot_med.data.phantoms import make_phantoms
    from cobot_med.model import ModelSpec, build_model

    make_phantoms("adome", folder / "data", cases=cases, seed=7, shape=shape)
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch, image_size=image_size, peft="lora+cobot"))
    return save_adapter(model, folder / "adapter")


def command(folder: Path, adapter: Path, out: Path, processes: int) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return [*launcher, "-m", "cobot_med", "infer", "--config", "adome", "--input", str(folder / "data" / "Image"),
            "--output", str(out), "--adapter", str(adapter), "--labels", str(folder / "data" / "Mask"),
            "--device", "cpu", "--overwrite"]


def timed(argv: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}... failed:\n{result.stderr[-3000:]}")
    return seconds


def agreement(a: Path, b: Path) -> float:
    import nibabel as nib
    import numpy as np

    inter = total = 0
    for seg in sorted(a.glob("*_seg.nii.gz")):
        x, y = np.asarray(nib.load(str(seg)).dataobj), np.asarray(nib.load(str(b / seg.name)).dataobj)
        inter += int(((x == y) & (x > 0)).sum())
        total += int((x > 0).sum() + (y > 0).sum())
    return 2 * inter / total if total else 1.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="lite_medsam")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 160, 48))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads in all (per process: threads / processes)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    with tempfile.TemporaryDirectory(prefix="cobot-med-bench-") as scratch:
        folder = Path(scratch)
        adapter = prepare(folder, args.arch, args.image_size, args.cases, tuple(args.shape))
        ways = {"one process": (1, args.threads), f"{args.processes} processes": (args.processes,
                                                                                  max(args.threads // args.processes, 1))}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for repeat in range(args.repeats):
            order = list(ways) if repeat % 2 == 0 else list(reversed(ways))
            for name in order:
                processes, threads = ways[name]
                times[name].append(timed(command(folder, adapter, folder / name.replace(" ", "_"), processes), threads))
        dice = agreement(folder / "one_process", folder / f"{args.processes}_processes")
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["one process"]
    result = {"arch": args.arch, "cases": args.cases, "shape": list(args.shape), "threads": args.threads,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "seconds": times,
              "median_seconds": medians, "speedup": {name: base / value for name, value in medians.items()},
              "label_dice_agreement": dice}
    print(json.dumps(result))
    print(f"\n{'way':<14} {'threads each':>12} {'median s':>9} {'x one':>6}   runs")
    for name, (_, threads) in ways.items():
        runs = ", ".join(f"{v:.1f}" for v in times[name])
        print(f"{name:<14} {threads:>12} {medians[name]:>9.1f} {base / medians[name]:>6.2f}   {runs}")
    print(f"label maps of the two ways: Dice agreement {dice:.4f}; CPU {result['cpu_capability']}")
    return result


if __name__ == "__main__":
    main()
