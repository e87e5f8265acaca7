"""The train task: one round of fine-tuning the served adapter on every label saved in the datastore.

MONAI Label runs a train request in a child process (``python -m monailabel.interfaces.utils.app -m
train``); the round there:

1. lists the images with a saved ``final`` label (``datastore.datalist()``) and writes them as a datalist,
   every labelled case in both the training and the validation split (the adapter is fitted to the
   annotator's own cases; the best epoch is chosen on them);
2. runs the dataset's bundle (``training``) from the adapter served now (the start adapter, or the last
   round's), or from the base with ``peft`` (default ``lora+cobot``) before the first round: an MLflow run
   in the experiment ``cobot-med/DATASET``, named as every training run is
   (``DATASET-PEFT-ARCH-SIZE-seed0-KEY``, :mod:`cobot_med.engine.tracking`); ``served.json`` says which
   run each round is;
3. publishes ``adapter_best`` of the round (``served.json``): the server answers the next infer request
   with it, without a restart.

Everything of round N lives in ``OUTPUT_DIR/MODEL/rounds/round-NNNN/`` (the bundle's usual outputs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from . import project
from .errors import RequestError
from .served import ServedModel, publish, read_record
from .settings import AppSettings, ModelSettings

ROUND_PREFIX = "round-"


def next_round(model_dir: Path) -> int:
    rounds = [int(p.name[len(ROUND_PREFIX):]) for p in (model_dir / "rounds").glob(f"{ROUND_PREFIX}*")
              if p.name[len(ROUND_PREFIX):].isdigit()]
    return max(rounds, default=0) + 1


def _positive(request: dict, key: str, default: Any, kind: type) -> Any:
    value = request.get(key, default)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0:
        raise RequestError(f"{key} must be a positive number, got {value!r}")
    return number


class CobotMedTrain(TrainTask):
    """Fine-tune the served model's adapter on the datastore's saved labels (see the module)."""

    def __init__(self, model: ModelSettings, settings: AppSettings, served: ServedModel) -> None:
        super().__init__(f"Fine-tune the {model.name} adapter ({settings.peft} for a new one) on the saved labels; "
                         "MLflow-tracked; served as soon as it finishes")
        self.model, self.settings, self.served = model, settings, served
        self.model_dir = settings.model_dir(model.name)

    def config(self) -> dict[str, Any]:
        return {"max_epochs": self.settings.epochs}

    def stats(self) -> dict[str, Any]:
        return read_record(self.model_dir)

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        started = time.time()
        epochs = _positive(request, "max_epochs", self.settings.epochs, int)
        optimiser = {key: _positive(request, key, None, float) for key in ("lr", "cobot_lr") if request.get(key)}
        cases = [{"image": item["image"], "label": item["label"]} for item in datastore.datalist()]
        if not cases:
            raise RequestError("no saved labels yet: save at least one label (final) before training")
        number = next_round(self.model_dir)
        round_dir = self.model_dir / "rounds" / f"{ROUND_PREFIX}{number:04d}"
        round_dir.mkdir(parents=True, exist_ok=False)
        datalist = round_dir / "monailabel_datalist.json"
        datalist.write_text(json.dumps({"training": cases, "validation": cases, "test": []}, indent=2))

        start = self.served.current().get("adapter")
        peft = project.adapter_spec(start).peft if start else self.settings.peft  # an adapter keeps its method
        project.train_round(self.model.run, datalist, round_dir, peft=peft, adapter=start, epochs=epochs,
                            device=str(request.get("device") or "auto"), optimiser=optimiser)
        adapter = round_dir / "adapter_best"
        if not adapter.is_dir():
            raise RuntimeError(f"round {number} finished without {adapter}")
        record = {
            "adapter": str(adapter), "round": number, "started_from": start, "peft": peft, "epochs": epochs,
            "labels": len(cases), "images": sorted(Path(c["image"]).name for c in cases),
            "mlflow": {"tracking_uri": self.settings.tracking_uri,
                       **project.finished_run(round_dir, self.settings.tracking_uri)},
            "seconds": round(time.time() - started, 1), "published": time.time(),
        }
        publish(self.model_dir, record)
        return record
