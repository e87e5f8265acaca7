"""Key-slice propagation by SAM 2's memory: one box on one slice, carried up and down the volume by SAM 2's video
predictor, beside the project's own box propagation (``propagator: sam2_memory``; docs/inference.md).

A SAM 2 base (a network whose ``sam2`` attribute is SAM 2's own ``SAM2VideoPredictor``) reads a volume's axial
slices as a video's frames, slice 0 first. For one organ: the key slice's box gives a mask
(``add_new_points_or_box``, a conditioning frame); its memory (the memory encoder's features of the slice and its
mask, and the object pointer) conditions the next slice through memory attention, whose own mask joins the memory
for the one after (``propagate_in_video``); from the key slice up to the last slice, then from the key slice down
to the first (SAM 2's forward then reverse pass, the reverse pass also remembering the slices just above the key).
A direction stops at the first slice whose mask is empty (probability > ``THRESHOLD`` nowhere), as box
propagation does: an organ costs its own extent, not the whole volume. SAM 2's demos and MedSAM2's scripts track
to the end of the video instead; an organ that vanishes and comes back is not followed here.

Everything model-side is SAM 2's own API on the predictor it is handed: its ``init_state`` builds the session,
``reset_state`` clears it between organs, ``add_new_points_or_box`` and ``propagate_in_video`` run it. Only the
frames come from here: ``init_state`` reads a folder of JPEGs (``sam2.utils.misc.load_video_frames``: resize to
S x S, /255, ImageNet mean/std), so while it runs, that loader is swapped for one that hands SAM 2 this volume's
slices through the base's input recipe (:mod:`cobot_med.sam.recipes`, the network's ``recipe``, as the slice
predictor's) normalised by the recipe's ``pixel_mean`` / ``pixel_std``, one slice at a time when SAM 2 asks for it
(a CT volume at 1024 px would take gigabytes as one tensor). Boxes go into the model grid through the recipe
(``normalize_coords=False``); the video's "original resolution" is the decoder's own low-res grid (S/4), so SAM 2
hands back its logits unresized and the recipe takes them to the slice, as it does for every other prediction.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..engine.amp import autocast
from ..errors import SettingsError
from ..predict.slices import recipe_of
from ..predict.volume import MEMORY, THRESHOLD

OBJECT_ID = 1  # SAM 2's object id for the organ being propagated (one organ per pass)
_SWAPPING = threading.Lock()  # the video module's loader and progress bar are swapped for one session at a time


def video_predictor(network: Any) -> Any:
    """The ``SAM2VideoPredictor`` of a SAM 2 base (its ``sam2``; DDP wraps the model as ``module``), or a
    :class:`~cobot_med.errors.SettingsError` naming what the network is."""
    model = getattr(network, "module", network)
    sam2 = getattr(model, "sam2", None)
    if sam2 is None or not callable(getattr(sam2, "propagate_in_video", None)):
        spec = getattr(model, "spec", None)
        what = f"arch {spec.arch}" if spec is not None else type(model).__name__
        raise SettingsError(f"propagator {MEMORY} needs a SAM 2 base (arch sam2.1_hiera_t/s/b+/l or medsam2) run "
                            f"by torch; this model is {what}: use propagator boxes, or a SAM 2 base")
    return sam2


class RecipeFrames(Sequence[torch.Tensor]):
    """The slices of an oriented (X, Y, Z) volume as SAM 2's frames: ``frames[z]`` is slice z through the
    recipe (``prepare``, then its pixel mean/std), (3, S, S) float32, made when SAM 2 asks for it."""

    def __init__(self, volume: torch.Tensor, recipe: Any) -> None:
        self.volume, self.recipe = volume, recipe
        self.mean = torch.tensor(recipe.pixel_mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(recipe.pixel_std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return int(self.volume.shape[-1])

    def __getitem__(self, z: int) -> torch.Tensor:  # type: ignore[override]
        images, _ = self.recipe.prepare(self.volume[..., [int(z)]].permute(2, 0, 1))
        return (images[0].float().cpu() - self.mean) / self.std


@contextlib.contextmanager
def _video_module(sam2: Any, frames: Sequence[torch.Tensor], grid: int) -> Iterator[None]:
    """While open: the video predictor's module loads ``frames`` (at an "original" size of ``grid`` x ``grid``)
    whatever ``init_state`` is given, and its progress bars are silent (the caller counts slices)."""
    module = inspect.getmodule(type(sam2).init_state)

    def load_video_frames(**_: Any) -> tuple[Sequence[torch.Tensor], int, int]:
        return frames, grid, grid

    with _SWAPPING:
        saved = module.load_video_frames, module.tqdm
        module.load_video_frames = load_video_frames
        module.tqdm = functools.partial(saved[1], disable=True)
        try:
            yield
        finally:
            module.load_video_frames, module.tqdm = saved


class MemoryPropagator:
    """Propagates key slices through a volume by SAM 2's memory; probabilities at the slice grid, as the slice
    predictor's. ``amp`` as :class:`~cobot_med.predict.slices.SlicePredictor`'s; ``on_slice`` is called once
    per slice SAM 2 segments (progress)."""

    def __init__(self, network: Any, device: torch.device | str = "cpu", amp: Any = False,
                 on_slice: Callable[[], None] | None = None) -> None:
        self.sam2 = video_predictor(network)
        self.recipe = recipe_of(network)
        self.device, self.amp, self.on_slice = torch.device(device), amp, on_slice
        if int(self.sam2.image_size) != int(self.recipe.image_size):
            raise SettingsError(f"the SAM 2 base runs at {self.sam2.image_size} px but its input recipe at "
                                f"{self.recipe.image_size} px; build both at one image_size")

    def __call__(self, volume: torch.Tensor, keys: Mapping[int, tuple[int, Sequence[float]]],
                 threshold: float = THRESHOLD) -> dict[int, torch.Tensor]:
        """``keys`` {organ index: (key slice, XYXY box in the slice grid)} on an oriented (X, Y, Z) volume ->
        {organ index: probabilities (X, Y, Z)}, zero beyond where a direction stopped."""
        volume = torch.as_tensor(volume).float()
        X, Y, Z = volume.shape
        geometry = self.recipe.geometry((X, Y))
        out: dict[int, torch.Tensor] = {}
        with _video_module(self.sam2, RecipeFrames(volume, self.recipe), self.sam2.image_size // 4):
            with autocast(self.device, self.amp):
                state = self.sam2.init_state(video_path="volume")
            for k, (z, box) in keys.items():
                self.sam2.reset_state(state)
                probs = torch.zeros(X, Y, Z)
                for frame, slice_probs in self.track(state, int(z), box, geometry, threshold):
                    probs[..., frame] = slice_probs
                out[k] = probs
        return out

    def track(self, state: dict, z: int, box: Sequence[float], geometry: Any,
              threshold: float) -> Iterator[tuple[int, torch.Tensor]]:
        """(slice, probabilities (X, Y)) from the key slice ``z`` up, then from ``z`` down (``z`` twice), each
        direction until its first empty mask (included)."""
        model_box = self.recipe.boxes_to_model(torch.as_tensor(box, dtype=torch.float32).reshape(1, 4), geometry)
        with autocast(self.device, self.amp):
            self.sam2.add_new_points_or_box(state, frame_idx=z, obj_id=OBJECT_ID, box=model_box[0] / self.sam2.image_size,
                                            normalize_coords=False)
        for reverse in (False, True):
            steps = self.sam2.propagate_in_video(state, start_frame_idx=z, reverse=reverse)
            try:
                while True:
                    with autocast(self.device, self.amp):
                        frame, _, logits = next(steps, (None, None, None))
                    if frame is None:
                        break
                    probs = self.recipe.slice_probabilities(logits[:1].float().cpu(), geometry)[0, 0]
                    if self.on_slice is not None and not (reverse and frame == z):
                        self.on_slice()
                    yield frame, probs
                    if not (probs > threshold).any():
                        break
            finally:
                steps.close()
