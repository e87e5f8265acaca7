"""One SAM ViT-B attention layer (qkv, rel-pos attention, proj) in every attention kind: ms per call
(one JSON line + a table), beside the kind the ``auto`` rule picks (``cobot_med.sam.attention.AUTO_RULES``).

    python benchmarks/attention.py [--grids window256 global256 global512 global1024] [--repeats 5]
        [--dtypes fp32 bf16] [--modes inference train] [--device auto]

``--dtypes`` defaults to fp32 and, where ``amp=auto`` picks it on this machine, the half dtype
(bf16 on a CPU without fast bf16 would take hours).

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

from cobot_med.engine import precision as P  # noqa: E402
from cobot_med.sam.attention import KINDS, auto_kind  # noqa: E402

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


def rule_variant(device: str, dtype: str, train: bool) -> str:
    """The variant the ``auto`` rule runs (onehot's core: sdpa on CUDA and in fp32, else matmul)."""
    kind, _ = auto_kind(torch.device(device).type, dtype, train)
    if kind != "onehot":
        return kind
    return "onehot/sdpa" if torch.device(device).type == "cuda" or dtype == "fp32" else "onehot/matmul"


def call(layer, x, dtype: str, train: bool, device: str):
    with C.autocast(device, dtype):
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
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: fp32, and the half dtype amp=auto picks here")
    parser.add_argument("--modes", nargs="+", default=["inference", "train"], choices=["inference", "train"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    args.device = C.pick_device(args.device)
    precision = P.resolve_precision("auto", args.device)
    if args.dtypes is None:
        args.dtypes = list(dict.fromkeys(["fp32", precision.name]))
    threads = P.plan_threads(args.device, num_workers=0).apply()
    print(f"machine class: {C.machine_class(args.device)}; amp=auto -> {precision.reason}; {threads.reason}",
          file=sys.stderr, flush=True)

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

                def fn(variant, layer=layer, xg=xg, dtype=dtype, train=train):
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
                row["auto"] = rule_variant(args.device, dtype, train)
                row["auto_vs_fastest"] = row[row["auto"]] / row[row["fastest"]]
                row["fp32_max_error"] = errors
                rows.append(row)
                print(f"{grid} {dtype} {mode}: " + " ".join(f"{v} {row[v]:.1f} ms" for v in VARIANTS),
                      file=sys.stderr, flush=True)
    result = {"benchmark": "attention", "machine": C.machine(args.device), "amp_auto": precision.describe(),
              "repeats": args.repeats, "rows": rows}
    print(json.dumps(result))
    print(f"\nms per call, one ViT-B attention layer, {args.device} ({result['machine']['threads']} threads, "
          f"load {result['machine']['load_average']})")
    print(C.table(rows, [("grid", "grid", ""), ("dtype", "dtype", ""), ("mode", "mode", "")]
                  + [(v, v, ".1f") for v in VARIANTS] + [("fastest", "fastest", ""), ("auto", "auto rule", ""),
                                                          ("auto_vs_fastest", "auto/fastest", ".2f")]))
    print(f"machine class: {result['machine']['machine_class']}")
    worst = {v: max(r["fp32_max_error"][v] for r in rows) for v in VARIANTS}
    print("\nfp32 max relative error against eager (output, input and rel-pos gradients): "
          + ", ".join(f"{v} {e:.1e}" for v, e in worst.items()))


if __name__ == "__main__":
    main()
