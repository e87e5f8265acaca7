"""Data loader throughput: slices per second drawn from cached phantom volumes (one JSON line + a table).

    python benchmarks/loader.py [--layout adome] [--cases 6] [--shape 128 128 48] [--image-size 256]
                                [--epochs 3] [--batch-size 4] [--workers 0] [--threads 1]

The volumes are read and put through the volume chain once (``VolumeDataset``, timed as
``cache_seconds``); then a torch ``DataLoader`` over ``SliceDataset`` draws every training slice
``--epochs`` times through the slice chain (masks, jittered boxes, resize, 3 channels) and
collates batches: ``slices_per_second`` is that loop's rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cobot_med, not an installed copy

import torch  # noqa: E402
from monai.data import DataLoader  # noqa: E402

from cobot_med.data.datalist import build_datalist  # noqa: E402
from cobot_med.data.dataset import SliceDataset, VolumeDataset  # noqa: E402
from cobot_med.data.layouts import get_layout  # noqa: E402
from cobot_med.data.phantoms import make_phantoms  # noqa: E402
from cobot_med.data.chains import slice_chain  # noqa: E402
from cobot_med.data.chains import volume_chain as volume_transforms  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="adome", choices=["adome", "spleen", "segrap"])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 48), metavar=("X", "Y", "Z"))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1, as in a DataLoader worker; more contend on a busy CPU)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:

    spec = get_layout(args.layout)
    with tempfile.TemporaryDirectory() as tmp:
        make_phantoms(args.layout, tmp, cases=args.cases, seed=0, shape=tuple(args.shape))
        cases = sum(build_datalist(args.layout, tmp, 0.0, 0.0).values(), [])
        start = time.perf_counter()
        volumes = VolumeDataset(cases, volume_transforms(spec.organ_ids, spec.ct_window, layout=args.layout))
        cache_seconds = time.perf_counter() - start
        dataset = SliceDataset(volumes, slice_chain(spec.organ_ids, args.image_size), spec.organ_ids)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
        slices, start = 0, time.perf_counter()
        for _ in range(args.epochs):
            for batch in loader:
                slices += batch["image"].shape[0]
        seconds = time.perf_counter() - start
    result = {
        "benchmark": "loader", "layout": args.layout, "cases": args.cases, "shape": list(args.shape),
        "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads,
        "cache_seconds": round(cache_seconds, 3), "slices": slices, "seconds": round(seconds, 3),
        "slices_per_second": round(slices / seconds, 1),
    }
    print(json.dumps(result))
    print(f"\n{'cases cached (s)':<22}{cache_seconds:>10.2f}\n{'slices drawn':<22}{slices:>10d}\n"
          f"{'slices / second':<22}{slices / seconds:>10.1f}")
    return result


if __name__ == "__main__":
    main()
