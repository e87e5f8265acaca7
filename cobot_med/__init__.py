"""cobot-med: parameter-efficient fine-tuning of SAM for medical volumes, on MONAI."""

__version__ = "0.1.0"
