"""The image resizers of the base models' own inference code, in torch (and scipy for MedSAM's).

Each function reproduces one library call that a base model's official pre-processing makes, so
that :mod:`cobot_med.sam.recipes` feeds every model what its authors fed it:

- :func:`resize_area`: OpenCV's ``cv2.resize(..., interpolation=cv2.INTER_AREA)`` on float images
  (LiteMedSAM's ``resize_longest_side``). Shrinking on both axes is the exact area average: output
  pixel ``i`` covers the source interval ``[i s, (i + 1) s)``, ``s = src / dst``, and each source
  pixel weighs by its overlap (OpenCV drops overlaps under 1e-3 px). Otherwise (an axis grows),
  OpenCV uses two taps per axis, ``(1 - f)`` at ``floor(i s)`` and ``f`` at the next pixel, with
  ``f = frac((i + 1) - (floor(i s) + 1) / s)`` (0 when not positive), the last pixel repeated at
  the border. Both are separable, so the resize is two matrix products.
- :func:`resize_nearest_opencv`: ``cv2.INTER_NEAREST``, source index ``floor(i * (1 / (dst / src)))``.
- :func:`resize_spline_skimage`: scikit-image's ``transform.resize(order=3, preserve_range=True,
  anti_aliasing=True)`` (MedSAM's ``MedSAM_Inference.py``): a Gaussian of sigma ``(src/dst - 1) / 2``
  on the axes that shrink, then ``scipy.ndimage.zoom(order=3, mode="mirror", grid_mode=True)``,
  clipped to the input's range (scikit-image's ``clip=True``).

The matrices are built in float64 and the products run in float64, so a float32 result is within
one rounding of OpenCV's own float32 output (checked in ``tests/test_lite_medsam.py``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=64)  # one pair of slice sizes per volume: built once (read-only afterwards)
def _area_weights(src: int, dst: int) -> torch.Tensor:
    """(dst, src) weights of OpenCV's area resize along one axis when ``dst <= src``."""
    scale = src / dst
    weights = torch.zeros(dst, src, dtype=torch.float64)
    for i in range(dst):
        start, end = i * scale, i * scale + scale
        cell = min(scale, src - start)
        first, last = math.ceil(start), min(math.floor(end), src - 1)
        first = min(first, last)
        if first - start > 1e-3:
            weights[i, first - 1] = (first - start) / cell
        weights[i, first:last] = 1.0 / cell
        if end - last > 1e-3:
            weights[i, last] = min(min(end - last, 1.0), cell) / cell
    return weights


@lru_cache(maxsize=64)
def _area_linear_weights(src: int, dst: int) -> torch.Tensor:
    """(dst, src) weights of OpenCV's INTER_AREA along one axis when the image grows (two taps)."""
    scale = src / dst
    inv_scale = dst / src
    weights = torch.zeros(dst, src, dtype=torch.float64)
    for i in range(dst):
        sx = math.floor(i * scale)
        fx = (i + 1) - (sx + 1) * inv_scale
        fx = 0.0 if fx <= 0 else fx - math.floor(fx)
        if sx >= src - 1:
            sx, fx = src - 1, 0.0
        weights[i, sx] += 1.0 - fx
        if fx:
            weights[i, sx + 1] += fx
    return weights


def resize_area(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)`` of (..., H, W) float images to ``size`` (h, w)."""
    (src_h, src_w), (dst_h, dst_w) = images.shape[-2:], size
    if (src_h, src_w) == (dst_h, dst_w):
        return images.clone()
    shrinking = src_h >= dst_h and src_w >= dst_w  # OpenCV's test: both scales >= 1
    weights = _area_weights if shrinking else _area_linear_weights
    rows = weights(src_h, dst_h).to(images.device)
    cols = weights(src_w, dst_w).to(images.device)
    out = rows @ images.to(torch.float64) @ cols.t()
    return out.to(images.dtype)


def resize_nearest_opencv(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``cv2.resize(..., interpolation=cv2.INTER_NEAREST)`` of (..., H, W) to ``size`` (h, w)."""
    (src_h, src_w), (dst_h, dst_w) = images.shape[-2:], size

    def index(src: int, dst: int) -> torch.Tensor:
        step = 1.0 / (dst / src)  # OpenCV's ``1. / inv_scale``, not ``src / dst``: the last bit can differ
        return torch.tensor([min(math.floor(i * step), src - 1) for i in range(dst)], device=images.device)

    return images.index_select(-2, index(src_h, dst_h)).index_select(-1, index(src_w, dst_w))


def resize_spline_skimage(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``skimage.transform.resize(image, size, order=3, preserve_range=True, anti_aliasing=True)`` of a 2D
    image, computed in float64 (as scikit-image does for MedSAM's uint8 input)."""
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float64)
    factors = np.divide(image.shape, size)
    filtered = image
    if any(d < s for d, s in zip(size, image.shape)):  # scikit-image anti-aliases only when an axis shrinks
        filtered = ndimage.gaussian_filter(image, np.maximum(0, (factors - 1) / 2), mode="mirror", cval=0)
    out = ndimage.zoom(filtered, [1 / f for f in factors], order=3, mode="mirror", cval=0, grid_mode=True)
    return np.clip(out, image.min(), image.max())
