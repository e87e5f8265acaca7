"""SAM building, checkpoint loading, the fast attention path and the promptable forward."""

from .build import ARCHITECTURES, SamArchitecture, build_sam
from .checkpoint import CheckpointError, file_sha256, load_sam_checkpoint
from .promptable import PromptableSam

__all__ = [
    "ARCHITECTURES",
    "SamArchitecture",
    "build_sam",
    "CheckpointError",
    "file_sha256",
    "load_sam_checkpoint",
    "PromptableSam",
]
