"""The paper's Table 4 recipe: its methods, and which settings are the paper's and which are this project's.

The methods are Table 4's rows (``resources/paper_results.json``). The paper's training settings are those
this project records as the paper's (README, *Training on real data*: "Defaults follow the paper"), and they
are the bundles' defaults (``bundles/common.json``; a test keeps the two equal). Everything else a run needs
and the paper does not fix here (the split, validation, the metric) is this project's and is said so.
"""

from __future__ import annotations

from typing import Any

# setting -> (the paper's value, what it is). Passed to every run (arch, image_size, epochs) or left to the
# bundle's default, which equals it (lr, cobot_lr, batch_size, jitter).
PAPER_SETTINGS: dict[str, tuple[Any, str]] = {
    "arch": ("vit_b", "SAM ViT-B base (Table 4 is ViT-B)"),
    "image_size": (1024, "input size in pixels"),
    "epochs": (25, "training epochs"),
    "lr": (1.25e-6, "Adam learning rate of the method's parameters and the mask decoder"),
    "cobot_lr": (1.25e-4, "Adam learning rate of COBOT's own parameters"),
    "batch_size": (1, "slices per step"),
    "jitter": (50, "box jitter in training, 0-50 px per side (the authors' code uses 20)"),
}
PASSED = ("arch", "image_size", "epochs")  # given to every run explicitly (they are the sweep's match keys)

# What the runs use that is this project's choice, not a setting of the paper (said in the plan and the docs).
OURS: tuple[str, ...] = (
    "the split: the fixed split of the dataset folder (cases sorted by id, MONAI's partition_dataset with seed 0: "
    "60% training, 20% validation, 20% test), the same for every method and seed",
    "validation every epoch; the adapter with the best validation 3D DSC is the one tested",
    "test metric: 3D DSC per case and organ (MONAI's DiceMetric), averaged; tight boxes from the labels",
    "the Freeze row: the base model zero-shot (the evaluate run id with peft frozen, once: it has no seed to vary)",
)


def paper_methods() -> list[str]:
    """Table 4's rows in the paper's order (Freeze, Lightweight, LoRA, LoRA+Ours, Adaptformer, Adaptformer+Ours)."""
    from ..compare.runs import paper_results

    return list(paper_results()["methods"])


def bundle_defaults(dataset: str) -> dict[str, Any]:
    """The literal top-level settings of the dataset's bundle layers (common.json beneath)."""
    from ..bundle import config_files
    from ..sweep import bundle_settings

    return bundle_settings(config_files(dataset))


def settings_in_force(dataset: str, values: dict[str, Any], overrides: dict[str, str]) -> list[tuple[str, Any, Any, bool]]:
    """(setting, value in force, the paper's value, equal) for every paper setting: ``values`` (reproduce's own
    flags) first, then bundle overrides after ``--``, then the bundle's default."""
    defaults = bundle_defaults(dataset)
    rows = []
    for name, (paper, _) in PAPER_SETTINGS.items():
        value = values.get(name)
        if value is None:
            value = overrides.get(name, defaults.get(name))
        rows.append((name, value, paper, _same(value, paper)))
    return rows


def _same(value: Any, paper: Any) -> bool:
    try:
        return float(value) == float(paper)
    except (TypeError, ValueError):
        return str(value) == str(paper)
