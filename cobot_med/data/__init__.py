"""Volumes to 2D slice samples with box prompts: layouts, datalists, checks, transforms, datasets, phantoms."""
