"""Resume an interrupted training from its last completed epoch."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..adapter import adapter_state_dict, unwrap
from ._distributed import is_rank0

logger = logging.getLogger(__name__)


class ResumeCheckpoint:
    """Saves trainer progress, optimiser state and the adapter tensors after each epoch
    (atomically, to ``path``) and, if ``path`` exists when training starts, loads them back.

    Only the adapter's tensors are stored, never the frozen SAM weights.
    """

    def __init__(self, path: str | Path, network: nn.Module, optimizer: torch.optim.Optimizer, resume: bool = True):
        self.path, self.network, self.optimizer, self.resume = Path(path), network, optimizer, resume

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.STARTED, self._save_last)

    def _save_last(self, engine: Engine) -> None:
        """Registered once the run starts, so the save comes after every other end-of-epoch
        handler (validation, adapter saving, MLflow logging): a kill between them then
        redoes the epoch instead of losing what it logged."""
        if not engine.has_event_handler(self.save, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def save(self, engine: Engine) -> None:
        if not is_rank0():
            return
        state = {
            "trainer": engine.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "adapter": adapter_state_dict(self.network),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self, engine: Engine) -> None:
        if not (self.resume and self.path.is_file()):
            return
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        max_epochs = engine.state.max_epochs
        unwrap(self.network).sam.load_state_dict(state["adapter"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        engine.load_state_dict(state["trainer"])
        engine.state.max_epochs = max_epochs
        logger.info("resumed from %s at epoch %d", self.path, engine.state.epoch)
