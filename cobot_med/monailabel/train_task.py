"""The train task: one round of fine-tuning the served adapter on the saved labels that are not held out, judged
on those that are.

MONAI Label runs a train request in a child process (``python -m monailabel.interfaces.utils.app -m
train``); the round there:

1. lists the images with a saved ``final`` label (``datastore.datalist()``) and splits them by image id into
   held-out and training labels (:func:`cobot_med.monailabel.versions.split`: fixed per image, so a label never
   trains the round it judges); the training labels are the datalist's training and validation split (the
   adapter is fitted to the annotator's own cases; the best epoch is chosen on them);
2. runs the dataset's bundle (``training``) from the served adapter version, or from the base with ``peft``
   (default ``lora+cobot``) while version 0 is the base: an MLflow run in the experiment ``cobot-med/DATASET``,
   named as every training run is (``DATASET-PEFT-ARCH-SIZE-seed0-KEY``, :mod:`cobot_med.engine.tracking`);
3. copies its ``adapter_best`` to the next version, ``OUTPUT_DIR/MODEL/adapters/vNNNN/`` (written once);
4. judges it: the new version and the served one are scored on the held-out labels by the bundle's
   ``evaluate`` run id under the ``select_prompts`` protocol (``tight`` by default: the DSC every run's
   ``val_dsc`` / ``test_dsc`` is); the new version is served from the next request when its DSC is at least
   the served one's, else the served one stays. No held-out label yet: not judged, the served one stays.
   The decision, both DSCs and the split go to ``versions.json``, the round's MLflow run (metrics
   ``heldout_dsc``, ``heldout_dsc_served``; tags ``cobot_med.adapter_version``, ``cobot_med.decision``), the
   round's result and one printed line (``GET /train/`` shows both).

Everything else of round N lives in ``OUTPUT_DIR/MODEL/rounds/round-NNNN/`` (the bundle's usual outputs;
``judging/`` holds the two evaluations).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from . import project, versions
from .errors import RequestError
from .served import ServedModel
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
    """Fine-tune the served model's adapter on the datastore's saved labels and judge it (see the module)."""

    def __init__(self, model: ModelSettings, settings: AppSettings, served: ServedModel) -> None:
        super().__init__(f"Fine-tune the {model.name} adapter ({settings.peft} for a new one) on the saved labels; "
                         "MLflow-tracked; served when it scores at least the served version on held-out labels")
        self.model, self.settings, self.served = model, settings, served
        self.model_dir = settings.model_dir(model.name)

    def config(self) -> dict[str, Any]:
        return {"max_epochs": self.settings.epochs}

    def stats(self) -> dict[str, Any]:
        return versions.summary(versions.read(self.model_dir))

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        started = time.time()
        epochs = _positive(request, "max_epochs", self.settings.epochs, int)
        optimiser = {key: _positive(request, key, None, float) for key in ("lr", "cobot_lr") if request.get(key)}
        device = str(request.get("device") or "auto")
        cases = {versions.image_id(item["image"]): {"image": item["image"], "label": item["label"]}
                 for item in datastore.datalist()}
        if not cases:
            raise RequestError("no saved labels yet: save at least one label (final) before training")
        problem = versions.nothing_to_train(self.model_dir, list(cases.values()))
        if problem:
            raise RequestError(problem)
        record = versions.read(self.model_dir)
        studies = versions.studies_of(list(cases.values()))
        held, trained = versions.split(cases, record["held_out"]["ids"], versions.trained_ids(record), studies)
        versions.pin_held_out(self.model_dir, held)
        number = next_round(self.model_dir)
        round_dir = self.model_dir / "rounds" / f"{ROUND_PREFIX}{number:04d}"
        round_dir.mkdir(parents=True, exist_ok=False)
        datalist = round_dir / "monailabel_datalist.json"
        training = [cases[i] for i in trained]
        datalist.write_text(json.dumps({"training": training, "validation": training, "test": []}, indent=2))

        start = self.served.current()
        peft = project.adapter_spec(start["adapter"]).peft if start["adapter"] else self.settings.peft
        project.train_round(self.model.run, datalist, round_dir, peft=peft, adapter=start["adapter"], epochs=epochs,
                            device=device, optimiser=optimiser)
        adapter = round_dir / "adapter_best"
        if not adapter.is_dir():
            raise RuntimeError(f"round {number} finished without {adapter}")
        run = project.finished_run(round_dir, self.settings.tracking_uri)
        new = versions.add_version(self.model_dir, adapter, {
            "round": number, "round_dir": str(round_dir), "started_from": start["version"], "peft": peft,
            "epochs": epochs, "optimiser": optimiser, "split": {"trained": trained, "held_out": held,
                      "studies": {i: studies[i] for i in trained + held if studies[i] != i}},
            "mlflow": {"tracking_uri": self.settings.tracking_uri, **run},
        })
        try:
            judged = self._judge(new, held, [cases[i] for i in held], training, round_dir, device)
        except Exception as err:  # the version stays, recorded as not judged; the round's status says why
            versions.decide(self.model_dir, new["version"], {"held_out": held, "held_out_count": len(held),
                                                             "error": f"{type(err).__name__}: {err}"})
            raise
        result = versions.decide(self.model_dir, new["version"], judged)
        if run.get("run_id"):
            project.record_judging(self.settings.tracking_uri, run["run_id"],
                                   {"heldout_dsc": judged.get("dsc"), "heldout_dsc_served": judged.get("served_dsc")},
                                   {"cobot_med.adapter_version": new["version"],
                                    "cobot_med.decision": result["judged"]["decision"],
                                    "cobot_med.decision_reason": result["judged"]["reason"]})
        summary = versions.summary(versions.read(self.model_dir))
        print(f"cobot-med round {number}: adapter version {new['version']} -- {result['judged']['reason']}; "
              f"serving version {summary['served_version']}", flush=True)
        from ..redact import redact

        # MONAI Label logs the result into the task's status (GET /train/): the store's credentials masked
        return redact({**result, "labels": len(cases), "seconds": round(time.time() - started, 1), "versions": summary})

    def _judge(self, new: dict, held: list[str], held_cases: list[dict], training: list[dict], round_dir: Path,
               device: str) -> dict[str, Any]:
        """The new version and the served one scored on the held-out labels (the bundle's ``evaluate``)."""
        served = versions.served_entry(versions.read(self.model_dir))
        protocol = self.model.run.select_prompts
        judged: dict[str, Any] = {"protocol": protocol, "held_out": held, "held_out_count": len(held),
                                  "served_version": served["version"], "dsc": None, "served_dsc": None}
        if not held:
            return judged
        folder = round_dir / "judging"
        folder.mkdir()
        datalist = folder / "datalist.json"  # evaluate scores the test split (its training split is not used)
        datalist.write_text(json.dumps({"training": training, "validation": [], "test": held_cases}, indent=2))
        scores = {}
        for name, adapter in ((f"v{new['version']:04d}", new["adapter"]), (f"v{served['version']:04d}-served",
                                                                           served["adapter"])):
            scores[name] = project.evaluate_adapter(self.model.run, datalist, folder / name, adapter=adapter,
                                                    protocol=protocol, device=device)
        candidate, current = scores.values()
        return {**judged, "dsc": candidate["dsc"], "served_dsc": current["dsc"],
                "organs": candidate["organs"], "served_organs": current["organs"],
                "evaluations": [s["evaluation"] for s in scores.values()]}
