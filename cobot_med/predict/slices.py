"""The one slice predictor: slices of an oriented volume and their box prompts -> organ probabilities.

Validation, test, ``cobot-med infer`` and the MONAI Label app all predict through
:class:`SlicePredictor`, so the same adapter on the same volume gives the same numbers everywhere.

The network is a PromptableSam, or anything with its call signature
``network(images (B,3,S,S), boxes (B,K,4) in the model grid, valid=(B,K) bool, output_size=None)
-> logits (N,1,h,w)`` for the N valid boxes in batch order and an ``image_size`` attribute S. The base
model's input recipe (:mod:`cobot_med.sam.recipes`, the network's ``recipe``; SAM's for others) turns
slices into model inputs and boxes into the model grid exactly as the training chain does, and the
logits back into probabilities at the slice's own (X, Y) grid. Each slice is sent once with all the
organs prompted on it; slices with no prompt never reach the model. :meth:`SlicePredictor.clicked` predicts
one slice from clicks (SAM point prompts, the MONAI Label app's foreground / background points), through the
same recipe. :meth:`SlicePredictor.propagate` carries key slices through a volume by SAM 2's memory when the
predictor's ``propagator`` is ``sam2_memory`` (:mod:`cobot_med.sam2_base.propagation`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ..engine.amp import autocast
from ..errors import SettingsError
from ..sam.recipes import InputRecipe, SamRecipe

if TYPE_CHECKING:
    from ..engine.precision import Precision


def recipe_of(network: Any) -> InputRecipe:
    """The network's input recipe (DDP wraps the model as ``module``); SAM's at its input size otherwise."""
    model = getattr(network, "module", network)
    recipe = getattr(model, "recipe", None)
    return recipe if isinstance(recipe, InputRecipe) else SamRecipe(int(model.image_size))


def model_images(volume: torch.Tensor, zs: list[int], recipe: InputRecipe | int) -> torch.Tensor:
    """Slices ``zs`` of an oriented (X, Y, Z) volume in [0, 255] as model inputs (B, 3, S, S) (``recipe`` an
    input recipe, or an input size for SAM's)."""
    recipe = SamRecipe(recipe) if isinstance(recipe, int) else recipe
    return recipe.prepare(volume[..., zs].permute(2, 0, 1))[0]


class SlicePredictor:
    """Runs the network on lists of (slice, prompts) in batches; returns probabilities at the slice grid.

    ``amp``: what :func:`cobot_med.engine.amp.autocast` takes, usually the run's resolved
    :class:`~cobot_med.engine.precision.Precision` (or an ``amp`` setting, resolved for the device).
    ``propagator``: how :func:`~cobot_med.predict.volume.predict_volume` carries a key slice through the volume,
    ``boxes`` or ``sam2_memory`` (a SAM 2 base only: refused here, by name, for any other network)."""

    def __init__(self, network: Any, device: torch.device | str = "cpu", batch_size: int = 8,
                 amp: Precision | bool | str = False, on_slices: Callable[[int], None] | None = None,
                 propagator: str = "boxes") -> None:
        from .volume import MEMORY, PROPAGATORS

        self.network, self.device = network, torch.device(device)
        self.batch_size, self.amp = max(int(batch_size), 1), amp
        self.recipe = recipe_of(network)
        self.on_slices = on_slices  # called with the number of slice images sent (progress)
        self.images_sent = 0
        if propagator not in PROPAGATORS:
            raise SettingsError(f"unknown propagator {propagator!r}; choose one of {list(PROPAGATORS)}")
        self.propagator = propagator
        self._memory = None
        if propagator == MEMORY:
            from ..sam2_base.propagation import MemoryPropagator

            self._memory = MemoryPropagator(network, self.device, amp, on_slice=self._sent_one)

    def _sent_one(self) -> None:
        self.images_sent += 1
        if self.on_slices:
            self.on_slices(1)

    def propagate(self, volume: torch.Tensor, keys: Mapping[int, tuple[int, Any]],
                  threshold: float) -> dict[int, torch.Tensor]:
        """``propagator`` ``sam2_memory``: {organ index: (key slice, box)} on an oriented (X, Y, Z) volume ->
        {organ index: probabilities (X, Y, Z)} (:class:`cobot_med.sam2_base.propagation.MemoryPropagator`)."""
        if self._memory is None:
            raise SettingsError(f"propagate: this predictor's propagator is {self.propagator}, not sam2_memory")
        was_training = getattr(self.network, "training", False)
        if hasattr(self.network, "eval"):
            self.network.eval()
        try:
            return self._memory(volume, keys, threshold)
        finally:
            if was_training:
                self.network.train()

    @torch.no_grad()
    def __call__(self, volume: torch.Tensor, zs: list[int], boxes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """volume (X, Y, Z); zs (N,); boxes (N, K, 4) XYXY in the slice grid; present (N, K) -> probs (N, K, X, Y)."""
        X, Y, _ = volume.shape
        K = present.shape[1]
        out = torch.zeros(len(zs), K, X, Y)
        was_training = getattr(self.network, "training", False)
        if hasattr(self.network, "eval"):
            self.network.eval()
        try:
            for start in range(0, len(zs), self.batch_size):
                chunk = list(range(start, min(start + self.batch_size, len(zs))))
                valid = present[chunk]
                if not valid.any():
                    continue
                images, geometry = self.recipe.prepare(volume[..., [zs[i] for i in chunk]].permute(2, 0, 1))
                model_boxes = self.recipe.boxes_to_model(boxes[chunk], geometry)
                with autocast(self.device, self.amp):
                    probs = self.recipe.predict(self.network, images.to(self.device), model_boxes.to(self.device),
                                                valid.to(self.device), geometry)
                probs = probs[:, 0].cpu()
                slot = valid.nonzero(as_tuple=False)  # (N, 2): (slice in chunk, organ), the order of ``logits``
                out[torch.tensor(chunk)[slot[:, 0]], slot[:, 1]] = probs
                self.images_sent += len(chunk)
                if self.on_slices:
                    self.on_slices(len(chunk))
        finally:
            if was_training:
                self.network.train()
        return out

    @torch.no_grad()
    def clicked(self, volume: torch.Tensor, z: int, points: Any, labels: Any,
                box: Any = None) -> torch.Tensor:
        """Probabilities (X, Y) of slice ``z`` of an oriented (X, Y, Z) volume from clicks: ``points`` (P, 2) XY in
        the slice grid (x along Y, as boxes), ``labels`` (P,) 1 foreground / 0 background, and ``box`` (XYXY in
        the slice grid) when the slice has one; one prompt, decoded as segment-anything's ``SamPredictor``."""
        images, geometry = self.recipe.prepare(volume[..., [z]].permute(2, 0, 1))
        coords = self.recipe.points_to_model(torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2), geometry)
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        boxes = None
        if box is not None:
            boxes = self.recipe.boxes_to_model(torch.as_tensor(box, dtype=torch.float32).reshape(1, 1, 4), geometry)
            boxes = boxes.to(self.device)
        points_in = (coords[None, None].to(self.device), labels[None, None].to(self.device))
        was_training = getattr(self.network, "training", False)
        if hasattr(self.network, "eval"):
            self.network.eval()
        try:
            with autocast(self.device, self.amp):
                probs = self.recipe.predict(self.network, images.to(self.device), boxes, None, geometry,
                                            points=points_in)
        finally:
            if was_training:
                self.network.train()
        self.images_sent += 1
        if self.on_slices:
            self.on_slices(1)
        return probs.float()[0, 0].cpu()
