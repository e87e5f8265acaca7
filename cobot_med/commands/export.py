"""``cobot-med export``: a base or an adapter's model as ONNX (and OpenVINO IR) graphs for the CPU runtimes."""

from __future__ import annotations

import argparse

HELP = "export a base (--arch) or an adapter's model (--adapter) to ONNX / OpenVINO for backend onnxruntime / openvino"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples: cobot-med export --arch lite_medsam --format openvino --output exported/lite_medsam; "
        "cobot-med export --adapter outputs/adome/adapter_best --config adome --format onnx --output exported/adome; "
        "then cobot-med infer --model exported/adome ... (docs/export.md)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", default=None, help="a base model (lite_medsam, vit_b, vit_l, vit_h, medsam_vit_b, tiny)")
    what.add_argument("--adapter", default=None, help="a trained adapter folder (its arch, method and size are used)")
    parser.add_argument("--output", required=True, help="the folder to write (graphs and cobot_med_export.json)")
    parser.add_argument("--format", default="onnx", choices=["onnx", "openvino"],
                        help="onnx (default), or openvino: OpenVINO IR beside the ONNX graphs (needs openvino)")
    parser.add_argument("--sam_checkpoint", default=None, help="the base's checkpoint (Meta's SAM, MedSAM; none for "
                        "lite_medsam, whose weights ship with the install)")
    parser.add_argument("--image_size", type=int, default=None, help="a base's input size (default: the base's)")
    parser.add_argument("--config", default=None, help="the dataset bundle whose label map the export is for (e.g. "
                        "adome): a run on another label map is refused; none: any label map")
    parser.add_argument("--ct_window", default=None, help="the input recipe's CT window, 'LOW,HIGH' in HU (default: "
                        "the base's or the adapter's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an exported model in --output")
    quant = parser.add_argument_group("int8 (explicit only; docs/export.md)")
    quant.add_argument("--int8", action="store_true", help="quantise the image encoder to int8 (ONNX Runtime static "
                       "quantisation), calibrated on --calibration's slices; its accuracy against fp32 is printed")
    quant.add_argument("--calibration", default=None, help="the run's volumes (a folder as cobot-med infer --input)")
    quant.add_argument("--labels", default=None, help="their labels: boxes for the accuracy check, as infer --labels")
    quant.add_argument("--calibration_slices", type=int, default=64, help="at most this many calibration slices")


def run(args: argparse.Namespace) -> int:
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from ..engine.checks import check_model_files
    from ..errors import SettingsError
    from ..export.backend import torch_network
    from ..export.exporter import export_model
    from ..files import absolute
    from ..settings import load_settings

    def full(path: str | None) -> str:
        return str(absolute(path)) if path else ""

    if args.int8 and not (args.calibration and args.labels):
        raise SettingsError("--int8 needs --calibration DIR (the run's volumes) and --labels DIR (their labels, for the "
                            "accuracy check against fp32)")
    if not args.int8 and (args.calibration or args.labels):
        raise SettingsError("--calibration and --labels are for --int8")
    if args.int8 and args.format != "onnx":
        raise SettingsError("--int8 writes ONNX graphs (OpenVINO runs the quantised ONNX graph itself); leave "
                            "--format out")
    overrides = {"arch": args.arch or "auto", "adapter": full(args.adapter), "sam_checkpoint": full(args.sam_checkpoint),
                 "input_dir": full(args.calibration), "labels_dir": full(args.labels)}
    if not args.adapter:  # a base alone; an adapter runs as the method it was trained with
        overrides["peft"] = "frozen"
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.ct_window:
        overrides["ct_window"] = args.ct_window
    settings = load_settings(args.config or "adome", **overrides)
    if settings.adapter and not Path(settings.adapter).exists():
        check_model_files(settings)
    settings.resolve_arch("inference")
    check_model_files(settings)
    output = absolute(args.output)
    if output.exists() and not args.overwrite:
        raise SettingsError(f"{output} exists; choose another --output or pass --overwrite")
    print(f"cobot-med export: building {settings.arch}" + (f" with the adapter {settings.adapter}" if settings.adapter
                                                          else " (the base)"), flush=True)
    model, info = torch_network(settings, "cpu")
    adapter = None
    if settings.adapter:
        adapter = {"path": str(absolute(settings.adapter)), "weights_sha256": info["adapter_weights_sha256"]}
    label_map = dict(settings.organs) if args.config else None
    dataset = settings.dataset if args.config else None

    def say(message: str) -> None:
        print(f"  {message}", flush=True)

    target = output
    staging = None
    if args.int8:
        staging = Path(tempfile.mkdtemp(prefix=".tmp-fp32-", dir=output.parent if output.parent.exists() else None))
        target = staging / "fp32"
    try:
        folder = export_model(model, target, [args.format], label_map=label_map, dataset=dataset, adapter=adapter,
                              overwrite=args.overwrite, log=say)
        manifest = json.loads((folder / "cobot_med_export.json").read_text())
        if args.int8:
            from ..export.quantize import quantize_export

            record = quantize_export(folder, output, settings, slices=args.calibration_slices, log=say)
            accuracy = record["accuracy"]
            agreement = accuracy["label_dice_int8_vs_fp32"]
            print(f"int8 against fp32 on {accuracy['cases']} volume(s) of {args.calibration} (the calibration volumes, "
                  f"{record['calibration']['slices']} of their slices calibrated): label maps Dice agreement "
                  + ", ".join(f"{k} {v:.4f}" for k, v in agreement.items() if v is not None)
                  + f"; embeddings relative L2 {accuracy['embedding_relative_l2']:.4f}; against the labels: fp32 "
                  f"{accuracy['dice_vs_labels']['fp32']['mean']}, int8 {accuracy['dice_vs_labels']['int8']['mean']}")
            manifest = json.loads((output / "cobot_med_export.json").read_text())
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    checked = manifest.get("checked", {})
    sizes = sum(f.stat().st_size for f in output.rglob("*") if f.is_file()) / 2**20
    print(f"exported {manifest['model']['arch']}/{manifest['model']['peft']} ({manifest['model']['merged_layers']} "
          f"layers merged, precision {manifest['precision']}) to {output} ({sizes:.1f} MiB; "
          f"{', '.join(f for f in ('onnx', 'openvino') if all(f in g for g in manifest['graphs'].values()))})")
    if checked:
        print(f"checked against the torch model on {checked['backend']} (fp32): embedding max |diff| "
              f"{checked['embedding_max_abs_diff']:.2e} (of {checked['embedding_max_abs']:.3g}), low-res logits max "
              f"|diff| {checked['logits_max_abs_diff']:.2e} (of {checked['logits_max_abs']:.3g})")
    print(f"run it: cobot-med infer --model {output} --config {args.config or 'adome'} --input DIR --output DIR "
          "--labels DIR | --boxes FILE")
    return 0
