"""The pieces MONAI's engines take from us: batch preparation, inferers, the loss and setup helpers."""
