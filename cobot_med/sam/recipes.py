"""One input recipe per base model: how a windowed CT slice becomes that model's input, how box
prompts follow, and how its mask logits return to the slice.

Pre-processing belongs to the base model, not to the dataset: each recipe below is taken from the
model's own inference code (docs/base_models.md quotes the lines). All of the project's paths
(training slices, validation/test, inference) call the same four functions:

``prepare(slices)``
    slices (N, X, Y) in [0, 255] (the CT already windowed) -> model input (N, 3, S, S) and the
    :class:`SliceGeometry` that the other functions need.
``boxes_to_model(boxes, geometry)``
    (..., 4) XYXY in slice pixels (x along Y, y along X) -> the model's grid.
``logits_to_slices(logits, geometry)`` / ``slice_probabilities(logits, geometry)``
    the decoder's low-res logits (..., S/4, S/4) -> logits / probabilities (..., X, Y) at the slice
    grid; a mask is ``probability > MASK_THRESHOLD`` for every recipe (all three authors' rule).
``masks_to_model(masks, geometry)``
    training targets (..., X, Y) -> (..., S, S), the model grid of ``prepare``.

What the model does inside ``PromptableSam.encode`` is the recipe's ``pixel_mean`` / ``pixel_std``
(written into ``Sam``'s buffers by ``build_model``): SAM's ImageNet statistics on [0, 255] for the
SAM recipe, none (mean 0, std 1) for MedSAM and LiteMedSAM, whose inputs are min-max scaled to
[0, 1] here.

``ct_window`` is the window the data side applies before ``prepare``: ``None`` means the dataset's
own (the papers' [-500, 1000] in the bundles); MedSAM and LiteMedSAM were trained on [-160, 240]
(``pre_CT_MR.py``: level 40, width 400). A user can override it (``ModelSpec.recipe``). The recipe in
force is a small dict (:meth:`InputRecipe.to_dict`) recorded with a run and in adapter configs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .resampling import resize_area, resize_nearest_opencv, resize_spline_skimage

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
MEDSAM_CT_WINDOW = (-160.0, 240.0)  # pre_CT_MR.py: WINDOW_LEVEL 40, WINDOW_WIDTH 400
MASK_THRESHOLD = 0.5  # on probabilities, for every recipe


@dataclasses.dataclass(frozen=True)
class SliceGeometry:
    """Where a stack of (X, Y) slices sits in the S x S model input: ``content`` (h, w) is the part
    of the S x S grid that holds the image (the rest is padding; all of it for square recipes)."""

    slice_size: tuple[int, int]
    image_size: int
    content: tuple[int, int]


def _as_slices(slices: Any) -> torch.Tensor:
    slices = torch.as_tensor(np.asarray(slices) if not isinstance(slices, torch.Tensor) else slices)
    if slices.dim() == 2:
        slices = slices[None]
    if slices.dim() != 3:
        raise ValueError(f"slices must be (N, X, Y) or (X, Y), got {tuple(slices.shape)}")
    return slices.float()


def _three_channels(images: torch.Tensor) -> torch.Tensor:
    return images[:, None].expand(-1, 3, -1, -1).contiguous()


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of the last two dims of any (..., h, w) tensor."""
    lead = logits.shape[:-2]
    flat = logits.reshape(-1, 1, *logits.shape[-2:])
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)


@dataclasses.dataclass(frozen=True)
class InputRecipe:
    """Base: the settings a user may change (``image_size`` follows the model, ``ct_window``)."""

    image_size: int
    ct_window: tuple[float, float] | None = None

    name: ClassVar[str]
    pixel_mean: ClassVar[tuple[float, float, float]]
    pixel_std: ClassVar[tuple[float, float, float]]
    description: ClassVar[dict[str, str]]  # the fixed steps, for the record (MLflow params, adapter configs)

    def __post_init__(self) -> None:
        if self.ct_window is not None:
            window = tuple(float(v) for v in self.ct_window)
            if len(window) != 2 or not window[0] < window[1]:
                raise ValueError(f"ct_window must be [low, high] HU with low < high, got {self.ct_window!r}")
            object.__setattr__(self, "ct_window", window)
        object.__setattr__(self, "image_size", int(self.image_size))

    def to_dict(self) -> dict[str, Any]:
        window = list(self.ct_window) if self.ct_window is not None else None
        return {"name": self.name, "image_size": self.image_size, "ct_window": window, **self.description}

    def window(self, dataset_window: tuple[float, float]) -> tuple[float, float]:
        """The CT window in force: the recipe's own, else the dataset's."""
        return tuple(self.ct_window) if self.ct_window is not None else tuple(dataset_window)

    def geometry(self, slice_size: tuple[int, int]) -> SliceGeometry:
        return SliceGeometry(tuple(int(v) for v in slice_size), self.image_size, (self.image_size, self.image_size))

    def prepare(self, slices: Any) -> tuple[torch.Tensor, SliceGeometry]:
        raise NotImplementedError

    def boxes_to_model(self, boxes: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        raise NotImplementedError

    def points_to_model(self, points: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        """Clicks (..., 2) XY in slice pixels (x along Y) -> the model grid, moved as box corners are."""
        return self.boxes_to_model(torch.cat([points, points], dim=-1), geometry)[..., :2]

    def logits_to_slices(self, logits: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        """Low-res logits (..., h, w) -> logits at the slice grid (..., X, Y)."""
        h, w = self._low_res_content(logits, geometry)
        return _upsample(logits[..., :h, :w], geometry.slice_size)

    def slice_probabilities(self, logits: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        """Low-res logits (..., h, w) -> probabilities at the slice grid (..., X, Y)."""
        return self.logits_to_slices(logits, geometry).sigmoid()

    def masks_to_model(self, masks: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, network: Any, images: torch.Tensor, boxes: torch.Tensor | None, valid: torch.Tensor | None,
                geometry: SliceGeometry, points: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Probabilities (N, 1, X, Y) at the slice grid of the ``valid`` boxes (model grid) on ``images``;
        ``points``: clicks in the model grid (PromptableSam's ``points``), sent only when given."""
        clicks = {} if points is None else {"points": points}
        return self.slice_probabilities(network(images, boxes, valid=valid, **clicks).float(), geometry)

    def _low_res_content(self, logits: torch.Tensor, geometry: SliceGeometry) -> tuple[int, int]:
        """The image part of a low-res map: the content of the S grid scaled to the logits' own size."""
        h, w = logits.shape[-2:]
        ch, cw = geometry.content
        return (h * ch) // geometry.image_size, (w * cw) // geometry.image_size


class SamRecipe(InputRecipe):
    """Meta's SAM ViT-B/L/H as this project has always fed it.

    Square resize to S x S (MONAI ``Resize``, bilinear, anti-aliased when shrinking: the training
    chain's and the slice predictor's), intensities left in [0, 255], SAM's ImageNet mean/std inside
    the model (``Sam.preprocess``), boxes scaled per axis, logits bilinear to the slice in one step.
    The CT window is the dataset's.
    """

    name = "sam"
    pixel_mean = SAM_PIXEL_MEAN
    pixel_std = SAM_PIXEL_STD
    description = {
        "resize": "square, bilinear, anti-aliased (MONAI Resize)",
        "intensity": "[0, 255], SAM pixel mean/std in the model",
        "masks": "bilinear logits to the slice, sigmoid > 0.5",
    }

    def prepare(self, slices: Any) -> tuple[torch.Tensor, SliceGeometry]:
        from monai.transforms import Resize

        slices = _as_slices(slices)
        S = self.image_size
        geometry = self.geometry(slices.shape[-2:])
        if tuple(slices.shape[-2:]) != (S, S):  # the slices as channels: one resize for all
            resized = Resize((S, S), mode="bilinear", anti_aliasing=True)(slices)
            slices = resized.as_tensor() if hasattr(resized, "as_tensor") else torch.as_tensor(resized)
        return _three_channels(slices), geometry

    def boxes_to_model(self, boxes: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        X, Y = geometry.slice_size
        S = self.image_size
        scale = torch.tensor([S / Y, S / X, S / Y, S / X], device=boxes.device)
        return boxes * scale

    def logits_to_slices(self, logits: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        return _upsample(logits, geometry.slice_size)

    def predict(self, network: Any, images: torch.Tensor, boxes: torch.Tensor | None, valid: torch.Tensor | None,
                geometry: SliceGeometry, points: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """As the base class; the network itself resizes the logits to the slice (``output_size``: the same one
        bilinear step as :meth:`logits_to_slices`), so networks that answer at a given size plug in too."""
        clicks = {} if points is None else {"points": points}
        return network(images, boxes, valid=valid, output_size=geometry.slice_size, **clicks).float().sigmoid()

    def masks_to_model(self, masks: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        from monai.transforms import Resize

        S = self.image_size
        if tuple(masks.shape[-2:]) == (S, S):
            return masks
        flat = masks.reshape(-1, *masks.shape[-2:]).float()
        resized = Resize((S, S), mode="nearest-exact", anti_aliasing=False)(flat)
        resized = resized.as_tensor() if hasattr(resized, "as_tensor") else torch.as_tensor(resized)
        return resized.reshape(*masks.shape[:-2], S, S).to(masks.dtype)


class MedSamRecipe(InputRecipe):
    """MedSAM ViT-B (``medsam_vit_b.pth``), after ``MedSAM_Inference.py`` and ``pre_CT_MR.py`` (main branch).

    CT window [-160, 240]; ``skimage.transform.resize(img, (S, S), order=3, preserve_range=True,
    anti_aliasing=True).astype(np.uint8)`` (square, cubic spline, truncated to integers); min-max to
    [0, 1] over the slice; the encoder is called directly (no SAM mean/std); boxes
    ``box / [W, H, W, H] * S``; masks: sigmoid of the low-res logits, bilinear to the slice, > 0.5
    (probabilities are upsampled, not logits). Training targets: nearest, square (as the SAM chain).
    """

    name = "medsam"
    pixel_mean, pixel_std = NO_NORMALISATION
    description = {
        "resize": "square, cubic spline, anti-aliased, truncated to uint8 (skimage resize order=3)",
        "intensity": "min-max to [0, 1] per slice, no pixel mean/std",
        "masks": "sigmoid, bilinear probabilities to the slice, > 0.5",
    }

    def __init__(self, image_size: int = 1024, ct_window: tuple[float, float] | None = MEDSAM_CT_WINDOW) -> None:
        super().__init__(image_size, ct_window)

    def prepare(self, slices: Any) -> tuple[torch.Tensor, SliceGeometry]:
        slices = _as_slices(slices)
        S = self.image_size
        out = np.empty((len(slices), S, S), dtype=np.float32)
        for n, image in enumerate(slices.cpu().numpy()):
            resized = np.floor(resize_spline_skimage(image, (S, S)))  # .astype(np.uint8): values are >= 0
            span = max(resized.max() - resized.min(), 1e-8)
            out[n] = (resized - resized.min()) / span
        images = torch.from_numpy(out).to(slices.device)
        return _three_channels(images), self.geometry(slices.shape[-2:])

    def boxes_to_model(self, boxes: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        X, Y = geometry.slice_size
        size = torch.tensor([Y, X, Y, X], dtype=torch.float64, device=boxes.device)
        return (boxes.double() / size * self.image_size).to(boxes.dtype)

    def slice_probabilities(self, logits: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        return _upsample(logits.sigmoid(), geometry.slice_size)

    def logits_to_slices(self, logits: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        """The logit of :meth:`slice_probabilities` (``> 0`` exactly where the probability is ``> 0.5``)."""
        return torch.logit(self.slice_probabilities(logits, geometry))

    masks_to_model = SamRecipe.masks_to_model


class LiteMedSamRecipe(InputRecipe):
    """LiteMedSAM, after ``CVPR24_LiteMedSAM_infer.py`` (branch LiteMedSAM).

    CT window [-160, 240]; ``resize_longest_side``: ``cv2.resize(INTER_AREA)`` to ``int(side * 256 /
    max(H, W) + 0.5)``; min-max to [0, 1] over that resized image (before padding); zero padding at
    the bottom and right to 256 x 256; no pixel mean/std; boxes ``int(box * 256 / max(H, W))``; masks:
    the low-res logits cropped to the resized size, bilinear to (H, W), ``sigmoid > 0.5``. Training
    targets (``train_one_gpu.py``): ``cv2.INTER_NEAREST`` to the resized size, padded.
    """

    name = "lite_medsam"
    pixel_mean, pixel_std = NO_NORMALISATION
    description = {
        "resize": "longest side to 256 (OpenCV INTER_AREA), pad bottom-right",
        "intensity": "min-max to [0, 1] per slice before padding, no pixel mean/std",
        "masks": "crop the padding, bilinear logits to the slice, sigmoid > 0.5",
    }

    def __init__(self, image_size: int = 256, ct_window: tuple[float, float] | None = MEDSAM_CT_WINDOW) -> None:
        super().__init__(image_size, ct_window)

    def scale(self, geometry: SliceGeometry) -> float:
        return self.image_size / max(geometry.slice_size)

    def geometry(self, slice_size: tuple[int, int]) -> SliceGeometry:
        X, Y = (int(v) for v in slice_size)
        scale = self.image_size * 1.0 / max(X, Y)
        content = (int(X * scale + 0.5), int(Y * scale + 0.5))
        return SliceGeometry((X, Y), self.image_size, content)

    def prepare(self, slices: Any) -> tuple[torch.Tensor, SliceGeometry]:
        slices = _as_slices(slices)
        geometry = self.geometry(slices.shape[-2:])
        resized = resize_area(slices, geometry.content)
        low = resized.amin(dim=(-2, -1), keepdim=True)
        high = resized.amax(dim=(-2, -1), keepdim=True)
        normalised = (resized - low) / (high - low).clamp(min=1e-8)
        S, (h, w) = self.image_size, geometry.content
        padded = F.pad(normalised, (0, S - w, 0, S - h))
        return _three_channels(padded), geometry

    def boxes_to_model(self, boxes: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        return torch.trunc(boxes.double() * self.scale(geometry)).to(boxes.dtype)  # int(), in float64 as numpy

    def masks_to_model(self, masks: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        S, (h, w) = self.image_size, geometry.content
        return F.pad(resize_nearest_opencv(masks, (h, w)), (0, S - w, 0, S - h))


class Sam2Recipe(InputRecipe):
    """SAM 2.1 (Hiera-T/S/B+/L), after sam2's ``SAM2ImagePredictor`` and ``SAM2Transforms`` (sam2 1.1.0).

    ``ToTensor`` (the [0, 255] slice to [0, 1]), ``Resize((S, S))`` on the tensor (square, bilinear,
    antialiased: ``F.interpolate(..., antialias=True)``), ``Normalize`` with the ImageNet mean/std in [0, 1]
    units (inside the model, :class:`~cobot_med.sam2_base.promptable.PromptableSam2`); boxes
    ``transform_boxes(normalize=True)``: ``box / [W, H, W, H] * S``; masks ``postprocess_masks``: the low-res
    logits bilinear to the slice, ``> 0`` (sigmoid > 0.5). The CT window is the dataset's (SAM 2 has none).
    Training targets: nearest, square (as the SAM chain; not from SAM 2's code).
    """

    name = "sam2"
    pixel_mean = (0.485, 0.456, 0.406)
    pixel_std = (0.229, 0.224, 0.225)
    description = {
        "resize": "square, bilinear, antialiased (torchvision Resize on the tensor)",
        "intensity": "[0, 1] (ToTensor), ImageNet mean/std in the model",
        "masks": "bilinear logits to the slice, sigmoid > 0.5",
    }

    def prepare(self, slices: Any) -> tuple[torch.Tensor, SliceGeometry]:
        slices = _as_slices(slices)
        S = self.image_size
        images = slices / 255.0
        if tuple(images.shape[-2:]) != (S, S):  # torchvision's Resize on a tensor is this call
            images = F.interpolate(images[:, None], size=(S, S), mode="bilinear", align_corners=False,
                                   antialias=True)[:, 0]
        return _three_channels(images), self.geometry(slices.shape[-2:])

    def boxes_to_model(self, boxes: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        X, Y = geometry.slice_size
        size = torch.tensor([Y, X, Y, X], dtype=boxes.dtype, device=boxes.device)
        return boxes / size * self.image_size

    def logits_to_slices(self, logits: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        return _upsample(logits, geometry.slice_size)

    predict = SamRecipe.predict
    masks_to_model = SamRecipe.masks_to_model


class MedSam2Recipe(Sam2Recipe):
    """MedSAM2 (bowang-lab/MedSAM2, SAM 2.1 Hiera-T at 512 px), after ``medsam2_infer_3D_CT.py`` (main, 332f30d).

    The CT clipped to the window and min-max scaled to [0, 255] over the volume, then ``np.uint8`` (truncated);
    ``resize_grayscale_to_rgb_and_resize``: ``PIL.Image.fromarray(...).convert("RGB").resize((512, 512))``
    (Pillow's default filter, bicubic); ``/ 255``; ImageNet mean/std (in the model); boxes and masks as SAM 2's
    (``add_new_points_or_box``: ``box / [W, H] * 512``; the logits bilinear to the slice, ``> 0``). The window is
    the data's: the script reads each DeepLesion image's own DICOM window (LUNA25: level -750, width 1500), so here
    it is the dataset's unless ``ct_window`` says otherwise.
    """

    name = "medsam2"
    description = {
        "resize": "square, PIL bicubic on the uint8 slice (Image.resize default)",
        "intensity": "uint8 (truncated), [0, 1], ImageNet mean/std in the model",
        "masks": "bilinear logits to the slice, sigmoid > 0.5",
    }

    def __init__(self, image_size: int = 512, ct_window: tuple[float, float] | None = None) -> None:
        super().__init__(image_size, ct_window)

    def prepare(self, slices: Any) -> tuple[torch.Tensor, SliceGeometry]:
        from PIL import Image

        slices = _as_slices(slices)
        S = self.image_size
        out = np.empty((len(slices), S, S), dtype=np.float32)
        for n, image in enumerate(slices.cpu().numpy()):
            pixels = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))  # np.uint8(...): truncation
            out[n] = np.asarray(pixels.resize((S, S), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        return _three_channels(torch.from_numpy(out).to(slices.device)), self.geometry(slices.shape[-2:])


RECIPES: dict[str, type[InputRecipe]] = {
    r.name: r for r in (SamRecipe, MedSamRecipe, LiteMedSamRecipe, Sam2Recipe, MedSam2Recipe)
}


def make_recipe(name: str, image_size: int, overrides: Mapping[str, Any] | None = None) -> InputRecipe:
    """The recipe ``name`` at ``image_size``, with a user's ``overrides`` (``ct_window``).

    ``overrides`` may be a whole recorded :meth:`InputRecipe.to_dict`: its fixed steps must then be
    this recipe's (a recorded run is rebuilt as it ran, or refused).
    """
    if name not in RECIPES:
        raise ValueError(f"unknown input recipe {name!r}; choose one of {sorted(RECIPES)}")
    cls = RECIPES[name]
    overrides = dict(overrides or {})
    recorded = overrides.pop("name", name)
    if recorded != name:
        raise ValueError(f"recipe {recorded!r} was asked for, but this base model uses the {name!r} recipe")
    size = int(overrides.pop("image_size", image_size) or image_size)
    if size != int(image_size):
        raise ValueError(f"recipe image_size {size} differs from the model's input size {image_size}")
    for key, value in cls.description.items():
        if key in overrides and overrides.pop(key) != value:
            raise ValueError(f"the {name!r} recipe's {key!r} is fixed ({value!r}); only 'ct_window' can change")
    unknown = sorted(set(overrides) - {"ct_window"})
    if unknown:
        raise ValueError(f"unknown recipe settings {unknown}; only 'ct_window' can change")
    if "ct_window" in overrides:
        return cls(image_size=size, ct_window=overrides["ct_window"])
    return cls(image_size=size)
