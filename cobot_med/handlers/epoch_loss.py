"""The mean training loss of each epoch, as ``engine.state.metrics['train_loss']``, and the loss curve per step."""

from __future__ import annotations

import json
from pathlib import Path

from ignite.engine import Engine, Events

from ..files import atomic_path, write_json


def loss_value(loss) -> float:
    """A logged loss as a number: MONAI's trainer keeps the tensor that was back-propagated (detached here)."""
    return float(loss.detach()) if hasattr(loss, "detach") else float(loss)


class EpochLoss:
    """Averages the iteration losses of an epoch into ``engine.state.metrics['train_loss']`` (which the MLflow
    and stats handlers log per epoch) and draws the loss curve: every step's loss, the epoch means, and the
    epoch boundaries (``loss_curve.png``). The points behind it are kept beside it (``loss_curve.json``:
    ``steps`` [[iteration, loss], ...] and ``epochs`` [[epoch, last iteration, mean], ...]), so that a resumed
    run draws the whole curve, not only its own part."""

    def __init__(self, plot_path: str | Path | None = None, loss_key: str = "loss", name: str = "train_loss") -> None:
        self.plot_path = Path(plot_path) if plot_path else None
        self.loss_key, self.name = loss_key, name
        self.steps: list[tuple[int, float]] = []
        self.epochs: list[tuple[int, int, float]] = []
        self._sum, self._count = 0.0, 0

    @property
    def history(self) -> list[float]:
        """The mean loss of each epoch."""
        return [mean for _, _, mean in self.epochs]

    @property
    def data_path(self) -> Path | None:
        return self.plot_path.with_suffix(".json") if self.plot_path else None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._take_up)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _take_up(self, engine: Engine) -> None:
        """A resumed run (the trainer's state was loaded before this) keeps the points up to where it resumes."""
        done = int(engine.state.iteration)
        if done == 0 or self.data_path is None or not self.data_path.is_file():
            return
        saved = json.loads(self.data_path.read_text())
        self.steps = [(int(i), float(v)) for i, v in saved.get("steps", []) if int(i) <= done]
        self.epochs = [(int(e), int(i), float(v)) for e, i, v in saved.get("epochs", []) if int(i) <= done]

    def _reset(self, _engine: Engine) -> None:
        self._sum, self._count = 0.0, 0

    def _accumulate(self, engine: Engine) -> None:
        output = engine.state.output
        if isinstance(output, dict) and self.loss_key in output:
            value = loss_value(output[self.loss_key])
            self._sum += value
            self._count += 1
            self.steps.append((int(engine.state.iteration), value))

    def _complete(self, engine: Engine) -> None:
        value = self._sum / max(self._count, 1)
        engine.state.metrics[self.name] = value
        self.epochs.append((int(engine.state.epoch), int(engine.state.iteration), value))
        if self.plot_path is not None:
            write_json(self.data_path, {"steps": self.steps, "epochs": self.epochs})
            self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(6, 3.4))
        if self.steps:
            x, y = zip(*self.steps)
            ax.plot(x, y, color="#9bb7d4", linewidth=0.8, label="each step")
        if self.epochs:
            _, ends, means = zip(*self.epochs)
            ax.plot(ends, means, color="#1f4e8c", marker="o", label="epoch mean")
        for epoch, end, _ in self.epochs:
            ax.axvline(end, color="0.6", linestyle=":", linewidth=0.8)
            ax.annotate(f"epoch {epoch}", (end, 1.0), xycoords=("data", "axes fraction"), ha="right", va="bottom",
                        fontsize=7, color="0.35")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step (one slice batch each)")
        ax.set_ylabel("training loss (Dice + BCE)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        self.plot_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.plot_path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
