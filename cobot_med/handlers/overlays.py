"""Pictures of a few validation slices: image, reference contour and predicted contour per organ, in the
radiological convention (the patient's right on the image's left) with orientation letters."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch

from ._distributed import is_rank0

if TYPE_CHECKING:  # the drawing is also cobot-med infer's, which runs without ignite (cobot_med.export)
    from ignite.engine import Engine

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


# Radiological convention: the patient's right on the image's left, anterior up, as seen from the feet.
ORIENTATION_LETTERS = {"R": (0.02, 0.5, "left", "center"), "L": (0.98, 0.5, "right", "center"),
                       "A": (0.5, 0.98, "center", "top"), "P": (0.5, 0.02, "center", "bottom")}


def overlay_figure(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray, organs: Mapping[str, int],
                   title: str = ""):
    """The figure of one axial slice of the RAS-oriented grid (image (X, Y), X toward the patient's right, Y
    toward anterior), in the radiological convention with orientation letters on its edges; label (X, Y)
    label map with the ``organs`` ids, or None; pred (K, X, Y) binary, K = len(organs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.imshow(image.T, cmap="gray", origin="lower")  # rows: Y, anterior up
    handles = []
    for k, (organ, label_id) in enumerate(organs.items()):
        colour = COLOURS[k % len(COLOURS)]
        if label is not None and (label == label_id).any():
            ax.contour((label == label_id).T.astype(float), levels=[0.5], colors=[colour], linewidths=1.0, linestyles="--")
        if pred[k].any():
            ax.contour(pred[k].T.astype(float), levels=[0.5], colors=[colour], linewidths=1.5)
        handles.append(Line2D([], [], color=colour, label=organ))
    ax.invert_xaxis()  # X grows toward the patient's right: right on the left of the picture
    for letter, (x, y, ha, va) in ORIENTATION_LETTERS.items():
        ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="#ffd700", fontsize=10, fontweight="bold")
    ax.legend(handles=handles, loc="upper right", bbox_to_anchor=(1.0, 0.93), fontsize=7,
              title="solid: prediction\ndashed: reference", title_fontsize=6)
    ax.set_title(f"{title}\nradiological view (patient's right on the left)" if title else
                 "radiological view (patient's right on the left)", fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    return fig


def draw_overlay(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray, organs: Mapping[str, int], path: Path,
                 title: str = "") -> None:
    """:func:`overlay_figure` saved as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = overlay_figure(image, label, pred, organs, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


class ValidationOverlays:
    """For the first ``max_cases`` validation volumes, draw the axial slice with the most reference foreground
    (``epochNNN_<case>.png``): the predicted label map's contours (solid) over the reference's (dashed)."""

    def __init__(self, output_dir: str | Path, organs: Mapping[str, int], max_cases: int = 3) -> None:
        self.output_dir, self.organs, self.max_cases = Path(output_dir), dict(organs), max_cases

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_rank0() or engine.state.iteration > self.max_cases:
            return
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        output, batch = outputs[0], batches[0]
        image = torch.as_tensor(output["image"]).detach().float().cpu().reshape(output["image"].shape[-3:]).numpy()
        label = torch.as_tensor(output["label"]).detach().cpu().reshape(output["label"].shape[-3:]).numpy()
        seg = torch.as_tensor(output["pred"]).detach().cpu().reshape(output["pred"].shape[-3:]).numpy()
        pred = np.stack([seg == i for i in self.organs.values()])
        z = int((label > 0).sum(axis=(0, 1)).argmax())
        epoch = engine.state.epoch  # MONAI's ValidationHandler runs the evaluator at the trainer's epoch
        case = batch.get("case_id", f"case{engine.state.iteration}") if isinstance(batch, dict) else None
        case = str(case[0] if isinstance(case, (list, tuple)) else case or f"case{engine.state.iteration}")
        draw_overlay(image[..., z], label[..., z], pred[..., z], self.organs,
                     self.output_dir / f"epoch{epoch:03d}_{case}.png", title=f"{case}, axial slice {z}, epoch {epoch}")

