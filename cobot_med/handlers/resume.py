"""Resume an interrupted training from its last completed epoch, as if it had never stopped."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..adapter import adapter_state_dict, load_adapter_tensors
from ..files import atomic_path
from ._distributed import is_rank0

logger = logging.getLogger(__name__)


class ResumeCheckpoint:
    """Saves the run's identity and key, trainer progress, optimiser state and the adapter tensors after each
    epoch (atomically, to the session's ``resume.pt``) and, when the session resumes, loads them back.

    Which run resumes (and which refuses) is decided by :class:`cobot_med.engine.session.TrainingSession`
    before anything is built; the random streams of every epoch are seeded from the epoch number
    (:class:`cobot_med.handlers.EpochSeeds`), so the epoch number is all the randomness a resume needs.
    Only the adapter's tensors are stored, never the frozen SAM weights.
    """

    def __init__(self, session, network: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.session, self.network, self.optimizer = session, network, optimizer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.STARTED, self._save_last)

    def _save_last(self, engine: Engine) -> None:
        """Registered once the run starts, so the save comes after every other end-of-epoch
        handler (validation, adapter saving, MLflow logging): a kill between them then
        redoes the epoch instead of losing what it logged. A fresh run also saves its start (epoch 0)
        at once: a run stopped before its first checkpoint has already written ``adapter_best``
        (validation comes first), and without ``resume.pt`` naming its key, starting it again would
        find another run's results instead of resuming."""
        if not engine.has_event_handler(self.save, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.session.checkpoint is None and not self.session.checkpoint_path.exists():
            self.save(engine)

    def save(self, engine: Engine) -> None:
        if not is_rank0():
            return
        state = {
            "identity": self.session.identity,
            "run_key": self.session.run_key,
            "run_name": self.session.run_name,
            "trainer": engine.state_dict(),
            "epochs_done": int(engine.state.epoch),  # ignite's state_dict holds no epoch
            "optimizer": self.optimizer.state_dict(),
            "adapter": adapter_state_dict(self.network),
            "finished": False,
        }
        with atomic_path(self.session.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def load(self, engine: Engine) -> None:
        state = self.session.checkpoint
        if state is None:
            return
        max_epochs = engine.state.max_epochs
        load_adapter_tensors(self.network, state["adapter"], self.session.checkpoint_path)
        self.optimizer.load_state_dict(state["optimizer"])
        engine.load_state_dict(state["trainer"])
        engine.state.max_epochs = max_epochs
        logger.info("resumed %s from %s at epoch %d", self.session.run_name, self.session.checkpoint_path,
                    engine.state.epoch)
