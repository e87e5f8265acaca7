"""The transform chains of ``transforms/`` (MONAI config fragments), built for a run.

The fragments are the single source of the chains: the bundles build them through these functions
(``"$cobot_med.data.chains.volume_chain(...)"``), and so does every other piece of code, with the
values of the bundle ids the fragments refer to (``@organ_ids``, ``@ct_window``...). They are found
next to the package (or under ``$COBOT_MED_ROOT``), never relative to the working directory.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from monai.transforms import Compose


@functools.lru_cache(maxsize=8)
def _fragment(name: str) -> dict:
    from monai.bundle import ConfigParser

    from ..bundle import repository_root

    return ConfigParser.load_config_file(str(repository_root() / "transforms" / f"{name}.json"))


def load_chain(fragment: str, chain_id: str, **settings: Any) -> Compose:
    """Chain ``chain_id`` of ``transforms/<fragment>.json`` with ``settings`` standing in for the bundle ids
    it refers to."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(dict(settings), globals={"torch": "torch", "monai": "monai", "cobot_med": "cobot_med"})
    parser.update({chain_id: _fragment(fragment)[chain_id]})
    return parser.get_parsed_content(chain_id, instantiate=True)


def volume_chain(organ_ids: Sequence[int], ct_window: Sequence[float] | None = (-500.0, 1000.0),
                 modality: str = "CT", layout: str | None = None) -> Compose:
    """The volume chain (labels optional): load, check, orient to RAS, window to [0, 255].

    ``layout`` names the dataset whose label values are allowed in label files (without it, only
    ``organ_ids`` and 0); values that are not ``organ_ids`` become background.
    """
    return load_chain("volume", "transforms", organ_ids=[int(i) for i in organ_ids],
                      ct_window=list(ct_window) if ct_window is not None else None, modality=modality,
                      layout=layout or "")


def slice_chain(organ_ids: Sequence[int], recipe: Any, jitter: int = 50, min_area: float = 100) -> Compose:
    """The training slice chain: box jitter, area threshold, the base model's input recipe (an
    :class:`~cobot_med.sam.recipes.InputRecipe`, or an input size for SAM's)."""
    if isinstance(recipe, int):
        from ..sam.recipes import SamRecipe

        recipe = SamRecipe(recipe)
    return load_chain("slices", "train", organ_ids=[int(i) for i in organ_ids], recipe=recipe, jitter=int(jitter),
                      min_area=float(min_area))


def run_volume_chain(settings: Any, recipe: Any) -> Compose:
    """The volume chain of a run's settings (:class:`cobot_med.settings.RunSettings`) for a model's input recipe
    (its CT window: the model's own, else the dataset's)."""
    return volume_chain(settings.organ_ids, ct_window_in_force(settings, recipe), settings.effective_modality,
                        settings.layout)


def run_slice_chain(settings: Any, recipe: Any) -> Compose:
    """The training slice chain of a run's settings for the model's input recipe."""
    return slice_chain(settings.organ_ids, recipe, settings.jitter, settings.min_area)


def ct_window_in_force(settings: Any, recipe: Any) -> list[float]:
    """The CT window the data is cut to: the recipe's (a model trained on its own window, or the user's
    ``ct_window`` setting, which the model spec carries), else the dataset layout's."""
    return [float(v) for v in recipe.window(settings.layout_spec.ct_window)]
