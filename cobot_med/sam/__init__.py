"""The base models (SAM, MedSAM ViT-B, LiteMedSAM): building, checkpoint loading, input recipes,
the fast attention path and the promptable forward."""

from .build import ARCHITECTURES, SamArchitecture, build_sam, default_checkpoint
from .checkpoint import CheckpointError, file_sha256, load_sam_checkpoint
from .promptable import PromptableSam
from .recipes import RECIPES, InputRecipe, SliceGeometry, make_recipe

__all__ = [
    "ARCHITECTURES",
    "SamArchitecture",
    "build_sam",
    "default_checkpoint",
    "CheckpointError",
    "file_sha256",
    "load_sam_checkpoint",
    "PromptableSam",
    "RECIPES",
    "InputRecipe",
    "SliceGeometry",
    "make_recipe",
]
