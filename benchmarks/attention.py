"""One SAM ViT-B attention layer (qkv, rel-pos attention, proj) in every attention kind: ms per call
(one JSON line + a table). Picks the default kind.

    python benchmarks/attention.py [--grids window256 global256 global512 global1024] [--repeats 5]
        [--dtypes fp32 bf16] [--modes inference train] [--device auto]

Grids: the windowed blocks of two 256 px images (8 windows of 14 x 14 tokens), and a global
block at 256 (2 images, 16 x 16), 512 (32 x 32) and 1024 px (64 x 64). "train" is forward +
backward with gradients for the input and the rel-pos tables. Kinds: segment-anything's
``eager``, ``sdpa`` (N x N bias mask), ``onehot`` with its ``matmul`` and its ``sdpa`` core. All
alternate on the same inputs; medians. Exactness (fp32, forward and gradients, against eager)
is printed beside.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402
from segment_anything.modeling.image_encoder import Attention  # noqa: E402

from cobot_med.sam.attention import KINDS  # noqa: E402

GRIDS = {  # name: (tokens per side, batch)
    "window256": (14, 8),
    "global256": (16, 2),
    "global512": (32, 1),
    "global1024": (64, 1),
}
VARIANTS = {"eager": ("eager", None), "sdpa": ("sdpa", None), "onehot/matmul": ("onehot", "matmul"),
            "onehot/sdpa": ("onehot", "sdpa")}


def make_layer(tokens: int, device: str, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    layer = Attention(768, num_heads=12, qkv_bias=True, use_rel_pos=True, input_size=(tokens, tokens)).to(device)
    with torch.no_grad():
        layer.rel_pos_h.normal_(0, 0.1)
        layer.rel_pos_w.normal_(0, 0.1)
    return layer


def set_variant(layer: Attention, variant: str) -> None:
    kind, core = VARIANTS[variant]
    layer.__class__ = KINDS[kind]
    layer.__dict__.pop("core", None)
    if core:
        layer.core = core


def call(layer, x, dtype: str, train: bool, device: str):
    with C.autocast(device, dtype == "bf16"):
        if not train:
            with torch.inference_mode():
                return layer(x)
        out = layer(x)
    out.float().square().mean().backward()
    return out


def exactness(layer, x, device) -> dict[str, float]:
    """Max relative error against eager, fp32: output and gradients (input, rel-pos tables)."""
    results = {}
    for variant in VARIANTS:
        set_variant(layer, variant)
        xg = x.detach().clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = call(layer, xg, "fp32", True, device)
        results[variant] = [out.detach(), xg.grad, layer.rel_pos_h.grad, layer.rel_pos_w.grad]
    ref = results["eager"]
    return {
        v: max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(r, ref)) for v, r in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", default=["inference", "train"], choices=["inference", "train"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    args.device = C.pick_device(args.device)

    rows = []
    for grid in args.grids:
        tokens, batch = GRIDS[grid]
        layer = make_layer(tokens, args.device)
        x = torch.randn(batch, tokens, tokens, 768, device=args.device)
        errors = exactness(layer, x, args.device)
        for dtype in args.dtypes:
            for mode in args.modes:
                train = mode == "train"
                xg = x.detach().clone().requires_grad_(train)

                def fn(variant):
                    def run():
                        set_variant(layer, variant)
                        layer.zero_grad(set_to_none=True)
                        call(layer, xg, dtype, train, args.device)

                    return run

                repeats = max(2, args.repeats // 2) if tokens >= 64 else args.repeats
                times = C.alternate({v: fn(v) for v in VARIANTS}, repeats, args.device)
                row = {"grid": grid, "dtype": dtype, "mode": mode}
                row.update({v: C.median(t) * 1e3 for v, t in times.items()})
                row["fastest"] = min(VARIANTS, key=lambda v: row[v])
                row["fp32_max_error"] = errors
                rows.append(row)
                print(f"{grid} {dtype} {mode}: " + " ".join(f"{v} {row[v]:.1f} ms" for v in VARIANTS),
                      file=sys.stderr, flush=True)
    result = {"benchmark": "attention", "machine": C.machine(args.device), "repeats": args.repeats, "rows": rows}
    print(json.dumps(result))
    print(f"\nms per call, one ViT-B attention layer, {args.device} ({result['machine']['threads']} threads, "
          f"load {result['machine']['load_average']})")
    print(C.table(rows, [("grid", "grid", ""), ("dtype", "dtype", ""), ("mode", "mode", "")]
                  + [(v, v, ".1f") for v in VARIANTS] + [("fastest", "fastest", "")]))
    worst = {v: max(r["fp32_max_error"][v] for r in rows) for v in VARIANTS}
    print("\nfp32 max relative error against eager (output, input and rel-pos gradients): "
          + ", ".join(f"{v} {e:.1e}" for v, e in worst.items()))


if __name__ == "__main__":
    main()
