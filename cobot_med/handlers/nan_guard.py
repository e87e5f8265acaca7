"""Stop training with a clear message when the loss turns NaN or infinite."""

from __future__ import annotations

import math

from ignite.engine import Engine, Events

from ..errors import CobotMedError
from .epoch_loss import loss_value


class NonFiniteLossError(CobotMedError, RuntimeError):
    """The training diverged; the message says where and what to try."""

    exit_code = 1


class StopOnNanLoss:
    """Raise (ending the run, checkpoints kept) at the first non-finite loss.

    ignite's ``TerminateOnNan`` stops silently; a user needs to know where and what to try.
    """

    def __init__(self, loss_key: str = "loss") -> None:
        self.loss_key = loss_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output.get(self.loss_key) if isinstance(output, dict) else None
        if loss is None:
            return
        value = loss_value(loss)
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"training loss became {value} at epoch {engine.state.epoch}, iteration {engine.state.iteration}; "
                "the last good checkpoint is kept. Try a lower learning rate, amp=False, or check the "
                "inputs for NaN intensities."
            )
