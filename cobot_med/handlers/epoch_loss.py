"""The mean training loss of each epoch, as ``engine.state.metrics['train_loss']``, and its curve."""

from __future__ import annotations

from pathlib import Path

from ignite.engine import Engine, Events


def loss_value(loss) -> float:
    """A logged loss as a number: MONAI's trainer keeps the tensor that was back-propagated (detached here)."""
    return float(loss.detach()) if hasattr(loss, "detach") else float(loss)


class EpochLoss:
    """Averages the iteration losses of an epoch and draws the loss curve as a PNG.

    Written into ``engine.state.metrics`` so the MLflow and stats handlers log it per epoch.
    """

    def __init__(self, plot_path: str | Path | None = None, loss_key: str = "loss", name: str = "train_loss") -> None:
        self.plot_path = Path(plot_path) if plot_path else None
        self.loss_key, self.name = loss_key, name
        self.history: list[float] = []
        self._sum, self._count = 0.0, 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, _engine: Engine) -> None:
        self._sum, self._count = 0.0, 0

    def _accumulate(self, engine: Engine) -> None:
        output = engine.state.output
        if isinstance(output, dict) and self.loss_key in output:
            self._sum += loss_value(output[self.loss_key])
            self._count += 1

    def _complete(self, engine: Engine) -> None:
        value = self._sum / max(self._count, 1)
        engine.state.metrics[self.name] = value
        self.history.append(value)
        if self.plot_path is not None:
            self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        epochs = range(1, len(self.history) + 1)
        ax.plot(epochs, self.history, marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean training loss (Dice + BCE)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        self.plot_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)
