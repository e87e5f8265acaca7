"""Whole-volume inference, our path against the reference path: s/volume and slices/s (one JSON line + a table).

    python benchmarks/inference.py [--arch vit_b] [--image-size 256] [--organs 4] [--shape 128 128 32]
        [--batch 8] [--peft lora+cobot] [--device auto] [--repeats 2] [--budget 60] [--ablations] [--compile]
        [--amp auto|true|false|bf16|fp16 | --dtype auto|fp32|bf16|fp16] [--attention auto|onehot|sdpa|eager]
        [--threads auto|N]

The volume is synthetic, made here with numpy: K ellipsoid organs in an (X, Y, Z) array of CT-like
intensities in [0, 255], with empty slices above and below them; every axial slice (along Z) is
resized to the model's input size and prompted with the box of each organ's mask on that slice.
It measures the model-level work of a volume (resize, encode, decode, upsample, threshold,
write into a label volume), not file reading or the inference pipeline around it.

Reference: per organ, per slice that holds it, one encoder pass and one box (segment-anything's
attention, fp32, LoRA unmerged). Ours: one encoder pass per slice for all its organs, slices in
batches of ``--batch``, slices without organs skipped, LoRA merged into the frozen weights,
padded tokens skipped, and the project's defaults as they resolve on this machine (``amp=auto``:
bf16 where the CPU or GPU runs it fast, else fp32; ``attention=auto``; threads = physical cores;
printed with their reasons). Same weights (ours is a merged copy of the reference's model), same
volume, alternating after a warm-up; medians, each path timed at most ``--repeats`` times and no
more once its timed runs pass ``--budget`` seconds. Before timing, the low-res logits of every
(slice, organ) are checked against the reference's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cobot_med.peft import merge_adapters  # noqa: E402

FP32_TOLERANCE = 1e-4  # relative L2 of the logits, our path in fp32 against the reference
BF16_TOLERANCE = 5e-2  # relative L2 of the logits, our path in bf16 against the reference


def make_volume(shape=(128, 128, 32), organs: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (X, Y, Z) float32 in [0, 255] and its label map (ids 1..K) of ellipsoid organs.

    The organs overlap along Z in a staggered way; about the outer eighth of the slices at each
    end hold no organ.
    """
    rng = np.random.default_rng(seed)
    X, Y, Z = shape
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    labels = np.zeros(shape, dtype=np.int16)
    lo, hi = Z / 8, Z * 7 / 8
    for k in range(1, organs + 1):
        cz = lo + (hi - lo) * (k - 0.5) / organs
        rz = (hi - lo) / organs * rng.uniform(0.9, 1.4)
        cx, cy = rng.uniform(0.3, 0.7) * X, rng.uniform(0.3, 0.7) * Y
        rx, ry = rng.uniform(0.08, 0.2) * X, rng.uniform(0.08, 0.2) * Y
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1
        inside &= (z >= lo) & (z < hi)
        labels[inside & (labels == 0)] = k
    return ct_like(labels, organs, rng, body_radii=(0.45, 0.4)), labels


def ct_like(labels: np.ndarray, organs: int, rng: np.random.Generator, body_radii=(0.45, 0.4)) -> np.ndarray:
    """CT-like intensities in [0, 255] (float32) for a label volume: an elliptic body, organ k brighter by 20 k,
    noise."""
    X, Y, _ = labels.shape
    x, y = np.meshgrid(np.arange(X), np.arange(Y), indexing="ij")
    body = ((x - X / 2) / (body_radii[0] * X)) ** 2 + ((y - Y / 2) / (body_radii[1] * Y)) ** 2 <= 1
    image = np.where(body[..., None], 110.0, 5.0) + rng.normal(0, 12, labels.shape)
    for k in range(1, organs + 1):
        image[labels == k] += 20.0 * k
    return np.clip(image, 0, 255).astype(np.float32)


@dataclasses.dataclass
class Slices:
    """The volume's slices resized to the model grid, with boxes and presence per organ."""

    images: torch.Tensor  # (Z, 3, S, S)
    boxes: torch.Tensor  # (Z, K, 4) XYXY in the model grid
    valid: torch.Tensor  # (Z, K) bool
    hw: tuple[int, int]  # slice size (H, W) = (X, Y)


def prepare(volume: np.ndarray, labels: np.ndarray, organs: int, size: int, device: str) -> Slices:
    """Axial slices (H, W) = (X, Y) resized to S x S; per slice and organ the mask's box (x along W)."""
    X, Y, Z = volume.shape
    images = torch.from_numpy(volume).permute(2, 0, 1)[:, None]  # (Z, 1, H, W)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    boxes = torch.zeros(Z, organs, 4)
    valid = torch.zeros(Z, organs, dtype=torch.bool)
    scale = torch.tensor([size / Y, size / X, size / Y, size / X])
    for z in range(Z):
        for k in range(organs):
            rows, cols = np.nonzero(labels[:, :, z] == k + 1)
            if rows.size:
                boxes[z, k] = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) * scale
                valid[z, k] = True
    return Slices(images.contiguous().to(device), boxes.to(device), valid.to(device), (X, Y))


def _write(out: torch.Tensor, logits: torch.Tensor, zs: list[int], ks: list[int], hw) -> None:
    """Upsample low-res logits (N,1,h,w) to the slice size and write organ ids where they win (> 0)."""
    masks = F.interpolate(logits.float(), size=hw, mode="bilinear", align_corners=False)[:, 0] > 0
    for mask, z, k in zip(masks, zs, ks):
        out[z][mask] = k + 1


@torch.inference_mode()
def reference(model, s: Slices, path: C.PathConfig, device: str, keep: dict | None = None) -> torch.Tensor:
    """Per organ, per slice that holds it: one encoder pass with one box."""
    Z, K = s.valid.shape
    out = torch.zeros(Z, *s.hw, dtype=torch.int16, device=device)
    for k in range(K):
        for z in torch.nonzero(s.valid[:, k]).flatten().tolist():
            with C.amp_context(path, device):
                logits = model(s.images[z : z + 1], s.boxes[z : z + 1, k : k + 1])  # (1,1,h,w)
            logits = logits.reshape(1, 1, *logits.shape[-2:])
            if keep is not None:
                keep[(z, k)] = logits[0, 0].float().cpu()
            _write(out, logits, [z], [k], s.hw)
    return out


@torch.inference_mode()
def ours(model, s: Slices, path: C.PathConfig, device: str, batch: int, keep: dict | None = None) -> torch.Tensor:
    """One encoder pass per slice for all its organs, non-empty slices in batches."""
    Z, K = s.valid.shape
    out = torch.zeros(Z, *s.hw, dtype=torch.int16, device=device)
    zs = torch.nonzero(s.valid.any(dim=1)).flatten().tolist()
    step = batch if path.batched else 1
    for i in range(0, len(zs), step):
        chunk = zs[i : i + step]
        valid = s.valid[chunk]
        with C.amp_context(path, device):
            if path.one_pass:
                embeddings = model.encode(s.images[chunk])
                logits, _ = model.decode(embeddings, s.boxes[chunk], valid)  # (N,1,h,w), slice-major
            else:  # one encoder pass per organ, for the ablation
                parts = []
                for j in range(len(chunk)):
                    for k in torch.nonzero(valid[j]).flatten().tolist():
                        emb = model.encode(s.images[chunk[j] : chunk[j] + 1])
                        parts.append(model.decode(emb, s.boxes[chunk[j] : chunk[j] + 1, k : k + 1])[0][:, 0:1])
                logits = torch.cat(parts)
        pairs = [(z, k) for j, z in enumerate(chunk) for k in torch.nonzero(valid[j]).flatten().tolist()]
        if keep is not None:
            for (z, k), m in zip(pairs, logits):
                keep[(z, k)] = m[0].float().cpu()
        _write(out, logits, [z for z, _ in pairs], [k for _, k in pairs], s.hw)
    return out


def dice_agreement(a: torch.Tensor, b: torch.Tensor, organs: int) -> float:
    """Mean over organs of the Dice overlap between two label volumes (1.0: the same masks)."""
    scores = []
    for k in range(1, organs + 1):
        x, y = a == k, b == k
        total = int(x.sum() + y.sum())
        scores.append(1.0 if total == 0 else 2 * int((x & y).sum()) / total)
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_b")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--organs", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 32), metavar=("X", "Y", "Z"))
    parser.add_argument("--batch", type=int, default=8, help="slices per encoder call (ours)")
    parser.add_argument("--peft", default="lora+cobot")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--repeats", type=int, default=2, help="timed alternations (after the check or a warm-up)")
    parser.add_argument("--ablations", action="store_true", help="also time our path with each switch off")
    parser.add_argument("--compile", action="store_true", help="also time our path with torch.compile")
    parser.add_argument("--no-check", action="store_true", help="skip the output check (not recommended)")
    C.add_speed_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.device = C.pick_device(args.device)
    choices, threads = C.apply_speed_arguments(args, training=False)
    C.print_choices(choices, threads, args.device)

    volume, labels = make_volume(tuple(args.shape), args.organs, args.seed)
    slices = prepare(volume, labels, args.organs, args.image_size, args.device)
    Z = slices.valid.shape[0]
    model = C.make_model(args.arch, args.image_size, args.peft, args.device, args.seed).eval()
    merged = copy.deepcopy(model)  # ours: the same weights with LoRA folded in
    merge_adapters(merged)

    ours_path = choices.path
    paths = [C.REFERENCE, ours_path]
    if args.ablations:
        paths += C.ablations(choices, training=False)
        paths.append(dataclasses.replace(ours_path, name="ours, K encoder passes", one_pass=False, compile=False))
    if args.compile and not ours_path.compile:
        paths.append(dataclasses.replace(ours_path, name="ours + torch.compile", compile=True))
    compiled = {p.name: C.maybe_compile(merged if p.merged else model, p) for p in paths if p.compile}

    def run(path: C.PathConfig, keep: dict | None = None) -> torch.Tensor:
        net = merged if path.merged else model
        C.configure(net, path)
        net = compiled.get(path.name, net)
        if path.name == "reference" or (not path.one_pass and not path.batched):
            return reference(net, slices, path, args.device, keep)
        return ours(net, slices, path, args.device, args.batch, keep)

    checks, outputs = {}, {}
    if not args.no_check:
        kept = {}
        checked = [C.REFERENCE, ours_path] + [p for p in paths if p.compile and p is not ours_path]
        if C.dtype_name(ours_path) != "fp32":  # ours is also checked in fp32, at fp32 tolerance
            checked.insert(1, C.fp32_twin(dataclasses.replace(ours_path, compile=False), "ours in fp32"))
        for path in checked:
            kept[path.name] = {}
            outputs[path.name] = run(path, kept[path.name])
            C.progress(f"checked {path.name}")
        keys = sorted(kept["reference"])
        ref = torch.stack([kept["reference"][k] for k in keys])
        for name in [p.name for p in checked[1:]]:
            assert sorted(kept[name]) == keys, "both paths must decode the same (slice, organ) pairs"
            checks[name] = {
                "logits": C.relative_error(torch.stack([kept[name][k] for k in keys]), ref),
                "dice_agreement": dice_agreement(outputs[name], outputs["reference"], args.organs),
            }
        tolerance = {p.name: FP32_TOLERANCE if C.dtype_name(p) == "fp32" else BF16_TOLERANCE for p in checked[1:]}
        if any(checks[name]["logits"] > tolerance[name] for name in checks):
            raise SystemExit(f"our path does not match the reference: {json.dumps(checks)}")

    warm = () if args.no_check else [p.name for p in checked]
    times = C.alternate({p.name: (lambda p=p: run(p)) for p in paths}, args.repeats, args.device, warm, args.budget)

    pairs = int(slices.valid.sum())
    nonempty = int(slices.valid.any(dim=1).sum())
    ref_s = C.median(times["reference"])
    rows = []
    for path in paths:
        s = C.median(times[path.name])
        rows.append({
            "path": path.name,
            "switches": path.switches(),
            "seconds_per_volume": s,
            "seconds_all": [round(t, 3) for t in times[path.name]],
            "slices_per_second": Z / s,
            "speedup": ref_s / s,
            "encoder_passes": pairs if (path.name == "reference" or not path.one_pass) else nonempty,
        })
    result = {
        "benchmark": "inference",
        "arch": args.arch, "image_size": args.image_size, "organs": args.organs, "shape": list(args.shape),
        "slices": Z, "slices_with_organs": nonempty, "slice_organ_pairs": pairs, "batch": args.batch,
        "peft": args.peft, "repeats": args.repeats,
        "machine": C.machine(args.device),
        "choices": {**choices.describe(), "threads": threads.describe()},
        "speedup": rows[1]["speedup"],
        "check": checks,
        "paths": rows,
    }
    print(json.dumps(result))
    print()
    C.print_choices(choices, threads, args.device)
    print(f"whole-volume inference: {args.arch} at {args.image_size}px, volume {tuple(args.shape)} "
          f"({Z} slices, {nonempty} with organs, {pairs} slice-organ boxes), {args.peft}, {args.device} "
          f"({result['machine']['threads']} threads, load {result['machine']['load_average']})")
    print(C.table(rows, [
        ("path", "path", ""), ("seconds_per_volume", "s/volume", ".2f"), ("slices_per_second", "slices/s", ".2f"),
        ("speedup", "x ref", ".2f"), ("encoder_passes", "encoder images", "d"),
    ]))
    if checks:
        print("\nchecked before timing (low-res logits of every slice-organ box, relative L2 against the reference; "
              "Dice agreement of the label volumes): " + "; ".join(
                  f"{n}: {c['logits']:.1e}, Dice {c['dice_agreement']:.4f}" for n, c in checks.items()))


if __name__ == "__main__":
    main()
