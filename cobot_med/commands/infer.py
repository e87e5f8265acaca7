"""``cobot-med infer``: segment every volume of a folder through a dataset bundle's ``inference`` run id."""

from __future__ import annotations

import argparse

HELP = "segment a folder of NIfTI volumes / DICOM series with box prompts (labels, 3D boxes or key slices)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples: cobot-med infer --config bundles/adome.json --input scans/ --output preds/ "
        "--adapter outputs/adome/adapter_best --sam_checkpoint sam_vit_b_01ec64.pth --boxes boxes.json; "
        "evaluation: ... --labels labels/; with no --adapter and no --sam_checkpoint the LiteMedSAM base that ships "
        "with the install runs zero-shot (docs/inference.md)"
    )
    parser.add_argument("--config", required=True,
                        help="the dataset bundle (label map, CT window), e.g. bundles/adome.json or adome")
    parser.add_argument("--input", required=True,
                        help="folder of .nii/.nii.gz volumes and DICOM folders (never written)")
    parser.add_argument("--output", required=True, help="folder for <case>_seg.nii.gz and the other outputs")
    parser.add_argument("--adapter", default=None,
                        help="trained adapter folder (its arch, method and input size are used); none: the base zero-shot")
    parser.add_argument("--sam_checkpoint", default=None,
                        help="the base's checkpoint (Meta's SAM, MedSAM): the one the adapter was trained on, or the "
                        "base to run zero-shot (none: LiteMedSAM, whose weights ship with the install)")
    source = parser.add_argument_group("prompts (at least one)")
    source.add_argument("--labels", default=None,
                        help="label volumes with the same names: boxes from each organ's mask per slice, and metrics")
    source.add_argument("--boxes", default=None, help="JSON of 3D boxes / key slices per case and organ; "
                        "with --labels too, the labels only score")
    parser.add_argument("--organs", default=None, nargs="+", metavar="NAMES",
                        help="organs to segment (names of the label map, comma- or space-separated; default: all)")
    parser.add_argument("--overwrite", action="store_true", help="redo every case whose segmentation exists, also "
                        "another model's (without it, a folder holding another model's segmentations is refused)")
    parser.add_argument("--drop_unusable_organs", action="store_true",
                        help="segment a case whose boxes are unusable for some organs (e.g. outside the volume) with "
                        "the usable ones, and list the dropped organs in the summary (default: the case fails)")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument("--batch_size", type=int, default=None, help="slices per model call (bundle: eval_batch_size)")
    parser.add_argument("--probabilities", action="store_true", help="also write per-organ probability maps")
    parser.add_argument("--dicom_seg", action="store_true",
                        help="also write <case>_seg.dcm for each DICOM series: a DICOM-SEG referencing the series, one "
                        "segment per organ with its SNOMED-CT code (needs pip install 'cobot-med[dicom]')")
    parser.add_argument("--nsd_tolerance", type=float, default=None, help="NSD tolerance in mm (default 2)")
    parser.add_argument("--amp", default=None, help="auto (default: what the device runs fast), true, false, bf16, "
                        "fp16, fp32")
    parser.add_argument("--no_amp", action="store_true", help="full precision (the same as --amp false)")
    parser.add_argument("--attention", default=None, choices=["auto", "onehot", "sdpa", "eager"],
                        help="attention kind (default: auto, the fastest for the device and precision; the same "
                        "math, BENCHMARKS.md)")
    parser.add_argument("--no_merge", action="store_true", help="keep LoRA branches unmerged (default: merged)")
    parser.add_argument("--arch", default=None, help="zero-shot only: the base (vit_b, vit_l, vit_h, medsam_vit_b, "
                        "lite_medsam, tiny; default: lite_medsam, or vit_b with --sam_checkpoint)")
    parser.add_argument("--image_size", type=int, default=None, help="zero-shot only: model input size (default: "
                        "the base's)")
    parser.add_argument("--backend", default=None, choices=["torch", "onnxruntime", "openvino", "auto"],
                        help="what runs the model (default: torch; auto: the fastest here, measured once and cached; "
                        "onnxruntime / openvino: the model exported on first use into the cache, or --model; "
                        "docs/export.md)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="an exported model (cobot-med export): runs on onnxruntime or openvino (default: auto) "
                        "without the training stack")


def bundle_overrides(args: argparse.Namespace) -> dict:
    """The bundle settings for these arguments (paths absolute, so the run does not depend on the folder)."""

    from ..files import absolute

    def full(path: str | None) -> str:
        return str(absolute(path)) if path else ""

    overrides: dict = {
        "input_dir": full(args.input), "output_dir": full(args.output), "labels_dir": full(args.labels),
        "boxes_file": full(args.boxes), "adapter": full(args.adapter),
        "sam_checkpoint": full(args.sam_checkpoint), "infer_organs": ",".join(args.organs or []),
        "overwrite": bool(args.overwrite), "probability_maps": bool(args.probabilities),
        "drop_unusable_organs": bool(args.drop_unusable_organs), "dicom_seg": bool(args.dicom_seg),
    }
    optional = {"device": args.device, "eval_batch_size": args.batch_size, "nsd_tolerance_mm": args.nsd_tolerance,
                "arch": args.arch, "image_size": args.image_size, "amp": "false" if args.no_amp else args.amp,
                "attention": args.attention, "merge_adapters": False if args.no_merge else None,
                "backend": args.backend or ("auto" if args.model else None),
                "exported_model": full(args.model) or None}
    overrides.update({k: v for k, v in optional.items() if v is not None})
    return overrides


def run(args: argparse.Namespace) -> int:
    if args.model:
        return run_exported(args.config, bundle_overrides(args))
    from ..bundle import run_bundle

    run_bundle(args.config, "inference", **bundle_overrides(args))
    return 0


def run_exported(config: str, overrides: dict) -> int:
    """The bundle's ``inference`` steps (``settings.check('inference')``, ``run_from_settings``) for an exported
    model, with the settings read without the workflow's imports: nothing of the training stack is imported
    (docs/export.md)."""
    from ..inference import run_from_settings
    from ..logs import quiet
    from ..settings import load_settings

    quiet()
    settings = load_settings(config, workflow_imports=False, **overrides)
    run_from_settings(settings.check("inference"))
    return 0
