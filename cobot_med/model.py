"""Build a PEFT-adapted, promptable SAM from one small spec (what an adapter checkpoint records)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .peft import apply_peft
from .sam import PromptableSam, build_sam, load_sam_checkpoint
from .sam.attention import DEFAULT_KIND, set_attention
from .sam.build import default_checkpoint, get_architecture
from .sam.recipes import InputRecipe, make_recipe
from .sam.speed import apply_speed_switches


@dataclasses.dataclass
class ModelSpec:
    """Everything needed to rebuild the same network: arch, input size, method and its options."""

    arch: str = "vit_b"
    image_size: int | None = None  # None: the arch's default (1024 for the official ones, 256 for lite_medsam)
    peft: str = "lora+cobot"
    peft_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    attention: str = DEFAULT_KIND  # "auto": the kind measured fastest per device, dtype and mode; or onehot, sdpa, eager
    # speed switches (issue #7, cobot_med.sam.speed); exact, so they do not change the model's outputs
    skip_window_padding: bool = True
    gradient_checkpointing: str = "none"  # "none", "global" or "all" encoder blocks
    # the base model's input recipe (cobot_med.sam.recipes): overrides such as {"ct_window": [-200, 300]};
    # after construction, the whole recipe in force (a recorded one is rebuilt as it was)
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        architecture = get_architecture(self.arch)
        if self.image_size is None:
            self.image_size = architecture.default_image_size
        self.image_size = int(self.image_size)
        self.recipe = make_recipe(architecture.recipe, self.image_size, self.recipe).to_dict()

    def input_recipe(self) -> InputRecipe:
        """The recipe object in force (prepare / boxes_to_model / logits_to_slices)."""
        return make_recipe(get_architecture(self.arch).recipe, self.image_size, self.recipe)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_model(spec: ModelSpec, sam_checkpoint: str | Path | None = None, *, base: bool = True) -> PromptableSam:
    """SAM for ``spec``, the checkpoint loaded strictly, then the PEFT method injected.

    Without ``sam_checkpoint``, an arch whose weights ship with a package (``lite_medsam``) loads
    those; the others stay randomly initialised. ``base=False`` loads no base weights at all (for a
    full-weights adapter, which brings every tensor). ``base_sha256`` is the loaded file's SHA-256.
    A SAM 2 arch gives :class:`~cobot_med.sam2_base.promptable.PromptableSam2` (sam2's model as ``.sam2``).
    """
    sam = build_sam(spec.arch, spec.image_size)
    set_attention(sam.image_encoder, spec.attention)
    sam_checkpoint = (sam_checkpoint or default_checkpoint(spec.arch)) if base else None
    sha256 = load_sam_checkpoint(sam, sam_checkpoint) if sam_checkpoint else None
    config, adapter_keys = apply_peft(sam, spec.peft, spec.peft_options)
    spec = dataclasses.replace(spec, peft_options=config.to_dict())
    # --- speed switches (issue #7): one place, see cobot_med.sam.speed ---
    apply_speed_switches(sam, spec.skip_window_padding, spec.gradient_checkpointing)
    promptable = PromptableSam
    if get_architecture(spec.arch).encoder == "hiera":
        from .sam2_base.promptable import PromptableSam2 as promptable
    return promptable(sam, spec=spec, adapter_keys=adapter_keys, base_sha256=sha256)
