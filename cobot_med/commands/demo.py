"""``cobot-med demo``: the embedded default run, end to end on a CPU in a few minutes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "make AbdomenCT-1K-layout phantoms and fine-tune a tiny SAM with lora+cobot through the adome bundle"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="cobot-med-demo", help="working folder (phantoms, outputs, MLflow store)")
    parser.add_argument("--cases", type=int, default=8, help="phantom cases to make")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--peft", default="lora+cobot")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from ..bundle import run_bundle
    from ..data.phantoms import make_phantoms
    from ..engine.tracking import client, find_run, resolve_tracking_uri

    out = Path(args.out).absolute()
    data_dir, output_dir = out / "phantoms" / "adome", out / "outputs" / "adome"
    if not data_dir.is_dir():
        print(f"making {args.cases} AbdomenCT-1K-layout phantoms in {data_dir}")
        make_phantoms("adome", data_dir, cases=args.cases, seed=args.seed)
    run_bundle("adome", "training", dataset_dir=str(data_dir), arch="tiny", image_size=args.image_size,
               peft=args.peft, epochs=args.epochs, seed=args.seed, output_dir=str(output_dir), lr=2e-3,
               cobot_lr=2e-3, val_at_start=True, overwrite=True)
    record = json.loads((output_dir / "resolved_settings.json").read_text())
    uri = resolve_tracking_uri("", output_dir)
    run = find_run(uri, "cobot-med/adome", record["run_name"])
    history = sorted(client(uri).get_metric_history(run.info.run_id, "val_dsc"), key=lambda m: m.step)
    before, after = history[0].value, max(m.value for m in history[1:])
    test = run.data.metrics.get("test_dsc")
    print("\ncobot-med demo finished")
    print(f"  validation DSC before training: {before:.4f}")
    print(f"  validation DSC after training:  {after:.4f} (best epoch)")
    if test is not None:
        print(f"  test DSC (best adapter):        {test:.4f}")
    print(f"  MLflow run:   {run.info.run_id} in {uri}  (mlflow ui --backend-store-uri {uri})")
    print(f"  adapter:      {output_dir / 'adapter_best'}")
    print(f"  predictions:  {output_dir / 'val_predictions'} (validation), {output_dir / 'test_predictions'} (test)")
    print(f"  pictures:     {output_dir / 'overlays'}, {output_dir / 'loss_curve.png'}")
    return 0 if after > before else 1
