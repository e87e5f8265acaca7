"""``cobot-med demo``: the embedded default run, end to end on a CPU in a few minutes.

By default it starts from LiteMedSAM's real pretrained weights (they ship with the install): it scores the base
model zero-shot on the test split, fine-tunes ``lora+cobot`` through the adome bundle, and scores the adapter on
the same split, so the two test figures are comparable. Both are scored under two prompt protocols
(docs/evaluation.md): ``tight``, the papers' boxes from the reference label on every slice (an oracle), and
``key_slice``, one box on each organ's largest slice propagated through the volume, what a user gives.
``--arch tiny`` runs the random-init tiny SAM the tests use instead (the pipeline works; its figures say nothing
about SAM).
"""

from __future__ import annotations

import argparse
import json

from ..files import absolute

HELP = ("make AbdomenCT-1K-layout phantoms, score pretrained LiteMedSAM on them zero-shot, fine-tune lora+cobot "
        "through the adome bundle and score it again")

# Per base: input size, phantom grid, epochs and learning rates for a few minutes on 2 CPU cores (the
# authors' 1.25e-6 / 1.25e-4 are for 25 epochs of thousands of slices). On the pretrained base the adapter
# starts as a no-op ("init": "zero_b") so that fine-tuning starts from the zero-shot model; the authors'
# Xavier-normal B would perturb it at step 0, which a few CPU epochs cannot repair. The papers' box jitter
# (0-50 px) is for 512-px CT slices; on the 64-px phantom slices the same share of the slice is 0-6 px.
PRESETS = {
    "lite_medsam": {"image_size": 256, "lr": 1e-4, "cobot_lr": 1e-4, "epochs": 2, "shape": (64, 64, 20),
                    "peft_options": {"init": "zero_b"}, "jitter": 6},
    "tiny": {"image_size": 128, "lr": 2e-3, "cobot_lr": 2e-3, "epochs": 12, "shape": (64, 64, 32),
             "peft_options": {}, "jitter": 50},
}


# The demo's protocols: the papers' oracle and one a user gives (docs/evaluation.md); the others cost a pass each.
PROMPTS = ("tight", "key_slice")
REALISTIC = "key_slice"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="cobot-med-demo", help="working folder (phantoms, outputs, MLflow store)")
    parser.add_argument("--arch", default="lite_medsam", choices=sorted(PRESETS),
                        help="base model: pretrained LiteMedSAM (default) or the random-init tiny SAM of the tests")
    parser.add_argument("--cases", type=int, default=6, help="phantom cases to make")
    parser.add_argument("--epochs", type=int, default=None, help="default: 2 (lite_medsam), 12 (tiny)")
    parser.add_argument("--image_size", type=int, default=None, help="default: 256 (lite_medsam), 128 (tiny)")
    parser.add_argument("--peft", default="lora+cobot", help="the PEFT method to fine-tune (default: lora+cobot)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantoms, the split and the training")


def run(args: argparse.Namespace) -> int:
    from ..bundle import run_bundle
    from ..data.phantoms import make_phantoms
    from ..engine.tracking import client, find_run, protocol_metric, resolve_tracking_uri
    from ..engine.workflow import output_rows, where_lines

    preset = PRESETS[args.arch]
    epochs = args.epochs or preset["epochs"]
    out = absolute(args.out)
    data_dir, output_dir = out / "phantoms" / "adome", out / "outputs" / f"adome-{args.arch}"
    if not data_dir.is_dir():
        print(f"making {args.cases} AbdomenCT-1K-layout phantoms in {data_dir}")
        make_phantoms("adome", data_dir, cases=args.cases, seed=args.seed, shape=preset["shape"])
    common = dict(dataset_dir=str(data_dir), arch=args.arch, image_size=args.image_size or preset["image_size"], seed=args.seed,
                  overwrite=True, prompts=",".join(PROMPTS))

    zero_shot = None
    if args.arch != "tiny":  # a random-init model has no zero-shot figure worth printing
        print(f"\n[1/2] {args.arch} zero-shot (no adapter) on the test split")
        run_bundle("adome", "evaluate", peft="frozen", output_dir=str(output_dir / "zero_shot"), **common)
        zero_shot = json.loads((output_dir / "zero_shot" / "evaluation.json").read_text())
    print(f"\n[2/2] fine-tuning {args.peft} on {args.arch} for {epochs} epochs")
    options = preset["peft_options"] if args.peft.startswith("lora") else {}
    run_bundle("adome", "training", peft=args.peft, peft_options=options, epochs=epochs, output_dir=str(output_dir), lr=preset["lr"],
               cobot_lr=preset["cobot_lr"], jitter=preset["jitter"], val_at_start=args.arch == "tiny", **common)
    record = json.loads((output_dir / "resolved_settings.json").read_text())
    uri = resolve_tracking_uri("", output_dir)
    run = find_run(uri, "cobot-med/adome", record["run_name"])
    metrics = run.data.metrics
    organs = [k[len("test_dsc_"):] for k in sorted(metrics) if k.startswith("test_dsc_") and "/" not in k]

    print(f"\ncobot-med demo finished ({args.arch}, {args.peft}, {epochs} epochs, test split, 3D DSC on the whole volume)")
    print("  prompts: tight      a box from the reference label on every slice that holds the organ (the papers'\n"
          "                      protocol: an oracle, it tells the model where the organ is)\n"
          f"           {REALISTIC:<10} one box on the organ's largest slice, propagated through the volume (what a\n"
          "                      user gives; docs/evaluation.md)")
    columns = ("zero-shot", "fine-tuned") if zero_shot else ("fine-tuned",)
    labels = {p: "tight (oracle)" if p == "tight" else p for p in PROMPTS}
    width = 11 if zero_shot else 14  # one group per protocol: its label above its columns
    print(f"  {'':<10}" + "".join(f"   {labels[p]:^{(width + 1) * len(columns) - 1}}" for p in PROMPTS))
    print(f"  {'organ':<10}" + "".join("   " + " ".join(f"{c:>{width}}" for c in columns) for _ in PROMPTS))
    for organ in organs + ["mean"]:
        cells = []
        for protocol in PROMPTS:
            key = protocol_metric("test_dsc" if organ == "mean" else f"test_dsc_{organ}", protocol)
            values = ([_zero_shot(zero_shot, organ, protocol)] if zero_shot else []) + [metrics.get(key, float("nan"))]
            cells.append(" ".join(f"{v:>{width}.4f}" for v in values))
        print(f"  {organ:<10}" + "".join("   " + cell for cell in cells))
    if args.arch == "tiny":  # no zero-shot figure: show that training moved the random-init model
        history = sorted(client(uri).get_metric_history(run.info.run_id, "val_dsc"), key=lambda m: m.step)
        print(f"  validation DSC before training: {history[0].value:.4f}")
        print(f"  validation DSC after training:  {max(m.value for m in history[1:]):.4f} (best epoch)")
    print("\n".join(where_lines("training", output_rows(output_dir, "training"), (run.info.run_id, uri))))
    if zero_shot and metrics.get("test_dsc", 0.0) < zero_shot["metrics"]["test_dsc"]:
        print("  (fine-tuning did not beat the zero-shot base on these phantoms: more epochs or cases, or another lr)")
    return 0 if "test_dsc" in metrics else 1


def _zero_shot(evaluation: dict, organ: str, protocol: str) -> float:
    """The zero-shot evaluation's DSC of ``organ`` (or the ``mean``) under ``protocol`` (evaluation.json)."""
    block = evaluation["protocols"][protocol]
    value = block["dsc"] if organ == "mean" else block["organs"][organ]["dsc"]
    return float("nan") if value is None else float(value)
