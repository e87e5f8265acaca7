"""Numbered adapter versions of a served model: every training round writes one, the server switches to it only
when it scores at least the served one on held-out saved labels, and any version can be served again.

Everything of one model lives in ``OUTPUT_DIR/MODEL/`` (docs/monailabel.md, *Adapter versions*):

- ``adapters/v0001/``, ``v0002/``, ...: each round's ``adapter_best``, copied into a hidden temporary folder
  and renamed into place in one step, never written again (a version folder that exists is never replaced);
- ``versions.json``: the record, replaced in one step under a lock (``.versions.lock``) -- which version is
  served and why, and per version its folder, weights' SHA-256, MLflow run, the split of its round (the ids
  that trained it and the ids that judged it), both DSCs of its judging, the decision and its reason. Version
  0 is the adapter the server started with (``--conf adapter``) or, without one, the base model zero-shot; it
  is scored the same way, as the served version of the first judged round.

The held-out split is a fixed function of the study (:func:`study_of`: a DICOM series' StudyInstanceUID, a volume
file's id; :func:`held_out_draw`, :func:`split`): a label never trains the round it judges, one that judged once
judges for ever, and the series of one study are never on both sides. The served version is read from the
record at each request (:class:`cobot_med.monailabel.served.ServedModel`), so a switch or a rollback
(``--conf adapter_version N``, or ``POST /cobot_med/versions/MODEL/serve?version=N``: :func:`add_routes`)
takes effect from the next request, and after a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .errors import RequestError

RECORD = "versions.json"
FOLDER = "adapters"
LOCK = ".versions.lock"
HELD_OUT_FRACTION = 0.2  # of the images, by their id's draw; never changed for a study (it would move labels)
HELD_OUT_SALT = "cobot-med held-out v1"
RULE = (f"held out: the first 8 bytes of sha256('{HELD_OUT_SALT}/' + image id) / 2**64 < {HELD_OUT_FRACTION}, "
        "or held out before; with >= 2 labelled images and none held out, the one no round trained on with the "
        "smallest draw")
KEPT, SWITCHED, NOT_JUDGED = "kept", "switched", "not judged"


class VersionError(RequestError):
    """A version that cannot be served (unknown number, missing folder): 404/422 with the reason."""


# --- the held-out split ----------------------------------------------------------------------------------


def image_id(path: str | Path) -> str:
    """The datastore's id of an image: a file's name without the extension (``.nii.gz`` whole), a folder's name
    whole (the DICOMweb datastore's series folders are named by SeriesInstanceUID, dots and all)."""
    if Path(path).is_dir():
        return Path(path).name
    name = Path(path).name
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def held_out_draw(image: str) -> float:
    """A number in [0, 1) fixed by the image id alone (SHA-256): the same in every process, round and machine."""
    digest = hashlib.sha256(f"{HELD_OUT_SALT}/{image}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def study_of(image: str | Path) -> str:
    """The study an image belongs to, which the held-out split is drawn by: a DICOM series' folder (the DICOMweb
    datastore's cache) gives its StudyInstanceUID, so that two series of one patient's study (two phases, a
    re-scan) fall on the same side; a volume file is a study of its own (its :func:`image_id`)."""
    path = Path(image)
    if path.is_dir():
        import pydicom

        for member in sorted(path.iterdir()):
            try:
                study = pydicom.dcmread(str(member), stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            except Exception:  # not a DICOM file (the cache's own files): the next one
                continue
            uid = str(getattr(study, "StudyInstanceUID", "") or "")
            if uid:
                return f"study {uid}"
    return image_id(path)


def split(labelled: Iterable[str], pinned: Iterable[str] = (), trained: Iterable[str] = (),
          studies: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(held-out ids, training ids) of the labelled images, drawn per study (``studies``: image id -> study, from
    :func:`study_of`; an image missing there is a study of its own).

    Held out: every image of a study whose draw is below :data:`HELD_OUT_FRACTION`, or of a study with an image
    held out before (``pinned``, from the record). With two or more labelled studies and none of them held out,
    the study with the smallest draw among those no round has trained on (``trained``) is held out too (the
    caller pins it), so that judging starts with the second study, and never with a label a served version has
    learnt, nor with another series of a study it learnt.
    """
    studies = dict(studies or {})
    ids, pinned, trained = sorted(set(labelled)), set(pinned), set(trained)

    def study(i: str) -> str:
        return studies.get(i, i)

    held_studies = {study(i) for i in ids if held_out_draw(study(i)) < HELD_OUT_FRACTION} | {study(i) for i in pinned}
    labelled_studies = {study(i) for i in ids}
    if len(labelled_studies) >= 2 and not held_studies & labelled_studies:
        fresh = labelled_studies - {study(i) for i in trained}
        if fresh:
            held_studies.add(min(sorted(fresh), key=held_out_draw))
    held = [i for i in ids if study(i) in held_studies]
    return held, [i for i in ids if i not in held]


def studies_of(datalist: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """image id -> study (:func:`study_of`) of a datastore's datalist."""
    return {image_id(item["image"]): study_of(item["image"]) for item in datalist}


def nothing_to_train(model_dir: str | Path, datalist: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a round could not train on the saved labels of ``datalist`` (every one of them held out), or None."""
    record = read(model_dir)
    labelled = [image_id(item["image"]) for item in datalist]
    held, training = split(labelled, (record.get("held_out") or {}).get("ids", ()), trained_ids(record),
                           studies_of(datalist))
    if labelled and not training:
        return (f"every saved label is held out to judge rounds ({', '.join(held)}): save a label on another image "
                "to train on")
    return None


# --- the record ------------------------------------------------------------------------------------------


def read(model_dir: str | Path) -> dict[str, Any]:
    """The versions record ({} before the server first started on this folder)."""
    import json

    try:
        record = json.loads((Path(model_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("versions"), list) else {}


def _write(model_dir: Path, record: dict[str, Any]) -> None:
    from ..files import write_json

    write_json(model_dir / RECORD, record)  # atomic; tracking credentials masked


@contextlib.contextmanager
def locked(model_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The record, read under the model folder's lock (the server and a round's process both write it); written
    back in one step when the block ends without an error."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(model_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        record = read(model_dir)
        yield record
        if record:
            _write(model_dir, record)
    finally:
        os.close(descriptor)  # releases the lock


def entry(record: Mapping[str, Any], number: int) -> dict[str, Any]:
    """Version ``number``'s entry; :class:`VersionError` (404) naming the versions there are."""
    for item in record.get("versions", []):
        if item["version"] == number:
            return item
    have = [item["version"] for item in record.get("versions", [])]
    raise VersionError(f"no adapter version {number}: this model has versions {have} "
                       f"(GET /cobot_med/versions/MODEL lists them)", 404)


def served_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    return entry(record, int(record.get("served", 0)))


def _adapter_sha(adapter: str | None) -> str | None:
    if not adapter:
        return None
    from .project import adapter_weights_sha256

    return adapter_weights_sha256(adapter)


def in_task_process() -> bool:
    """Whether this is a MONAI Label task's own process (``python -m monailabel.interfaces.utils.app``: a training
    round, batch inference), which builds the app again but must not apply the server's start-up choices."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "") == "monailabel.interfaces.utils.app"


def open_versions(model_dir: str | Path, start_adapter: str | None, version: int | None = None) -> dict[str, Any]:
    """At server start: the record, made with version 0 (``start_adapter``, None for the base) when missing, then
    version ``version`` served when given (``--conf adapter_version``; not in a task's process, where the server
    may have switched since). A record whose version 0 is another adapter is refused (:class:`ValueError`
    naming both): its versions grew from that one."""
    start_adapter = str(start_adapter) if start_adapter else None
    with locked(model_dir) as record:
        if not record:
            record.update({
                "served": 0, "served_by": "start", "served_since": time.time(),
                "held_out": {"rule": RULE, "ids": []},
                "versions": [{"version": 0, "adapter": start_adapter, "weights_sha256": _adapter_sha(start_adapter),
                              "source": "--conf adapter" if start_adapter else "the base model, zero-shot",
                              "created": time.time(), "mlflow": None, "scores": []}],
                "history": [{"served": 0, "by": "start", "time": time.time()}],
            })
        first = entry(record, 0)["adapter"]
        if first != start_adapter:
            raise ValueError(f"{model_dir} holds adapter versions grown from {first or 'the base model'} (version "
                             f"0), not from {start_adapter or 'the base model'}: start with that --conf adapter, "
                             "or choose another --conf output_dir")
        if version is not None and not in_task_process():
            try:
                _serve(record, version, "--conf adapter_version")
            except VersionError as err:
                raise ValueError(str(err)) from None
        return dict(record)


def _serve(record: dict[str, Any], number: int, by: str) -> dict[str, Any]:
    item = entry(record, number)
    if item["adapter"] and not Path(item["adapter"]).is_dir():
        raise VersionError(f"adapter version {number}'s folder {item['adapter']} is gone: it cannot be served", 409)
    if record.get("served") != number:
        record.update(served=number, served_by=by, served_since=time.time())
        record["history"].append({"served": number, "by": by, "time": time.time()})
    return item


def serve(model_dir: str | Path, number: Any, by: str) -> dict[str, Any]:
    """Serve version ``number`` from the next request on (a rollback, or forward again); :class:`VersionError`
    (4xx) for a number that is not a version, and nothing changes."""
    try:
        number = int(str(number).strip().lstrip("v"))
    except ValueError:
        raise VersionError(f"version must be a whole number (0 is the adapter the server started with), got "
                           f"{number!r}") from None
    with locked(model_dir) as record:
        if not record:
            raise VersionError("no adapter versions yet: the server has not started on this output_dir", 409)
        _serve(record, number, by)
        return summary(record)


def add_version(model_dir: str | Path, adapter_best: str | Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Copy a round's ``adapter_best`` to the next ``adapters/vNNNN/`` (a temporary folder renamed into place:
    an existing folder is never replaced) and record it, unserved; returns its entry."""
    model_dir = Path(model_dir)
    folder = model_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    with locked(model_dir) as record:
        taken = [item["version"] for item in record["versions"]]
        taken += [int(p.name[1:]) for p in folder.glob("v[0-9]*") if p.name[1:].isdigit()]
        number = max(taken, default=0) + 1
        target = folder / f"v{number:04d}"
        temporary = folder / f".tmp-v{number:04d}-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.copytree(adapter_best, temporary)
        os.rename(temporary, target)  # fails if target exists: nothing is overwritten
        item = {"version": number, "adapter": str(target), "weights_sha256": _adapter_sha(str(target)),
                "created": time.time(), **fields, "scores": []}
        record["versions"].append(item)
        return dict(item)


def pin_held_out(model_dir: str | Path, ids: Sequence[str]) -> None:
    """Keep ``ids`` held out for good (the record's ``held_out.ids``)."""
    with locked(model_dir) as record:
        record["held_out"]["ids"] = sorted(set(record["held_out"]["ids"]) | set(ids))


def trained_ids(record: Mapping[str, Any]) -> set[str]:
    """Every image id a recorded round trained on."""
    return {i for item in record.get("versions", []) for i in (item.get("split") or {}).get("trained", [])}


def decide(model_dir: str | Path, number: int, judged: Mapping[str, Any]) -> dict[str, Any]:
    """Record version ``number``'s judging and serve it when its DSC is at least the served version's (the one
    judged against, still served now); returns its entry with ``decision`` and ``reason``."""
    with locked(model_dir) as record:
        item = entry(record, number)
        against, candidate, current = judged.get("served_version"), judged.get("dsc"), judged.get("served_dsc")
        if judged.get("error"):
            decision = NOT_JUDGED
            reason = f"not judged: judging failed ({judged['error']}); version {record['served']} is still served"
        elif judged.get("held_out_count", 0) == 0:
            decision = NOT_JUDGED
            reason = (f"not judged: no held-out labels yet (save labels on at least 2 images); version "
                      f"{record['served']} is still served, version {number} can be served on request")
        elif candidate is None or current is None:
            decision = NOT_JUDGED
            reason = (f"not judged: no organ of the held-out labels was counted (DSC {candidate} against "
                      f"{current}); version {record['served']} is still served")
        elif record.get("served") != against:
            decision = KEPT
            reason = (f"kept version {record['served']}: it was chosen ({record.get('served_by')}) while version "
                      f"{number} was judged against version {against}")
        elif candidate >= current:
            decision = SWITCHED
            reason = (f"switched to version {number}: held-out DSC {candidate:.4f} >= {current:.4f} of version "
                      f"{against}")
            _serve(record, number, f"round {item.get('round')}: judged")
        else:
            decision = KEPT
            reason = (f"kept version {against}: version {number}'s held-out DSC {candidate:.4f} < {current:.4f}")
        item["judged"] = {**judged, "decision": decision, "reason": reason, "time": time.time()}
        for version, dsc, role in ((number, candidate, "candidate"), (against, current, "served")):
            if dsc is not None and judged.get("held_out_count"):
                entry(record, version)["scores"].append({"round": item.get("round"), "as": role, "dsc": dsc,
                                                         "protocol": judged.get("protocol"),
                                                         "held_out": judged.get("held_out")})
        record["last_decision"] = {"version": number, "decision": decision, "reason": reason,
                                   "dsc": candidate, "served_version": against, "served_dsc": current,
                                   "protocol": judged.get("protocol"), "held_out": judged.get("held_out_count", 0)}
        return dict(item)


def summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """What ``GET /info/`` and a round's result say: the served and latest versions, the last decision, and one
    line per version."""
    if not record:
        return {}
    served = served_entry(record)
    return {
        "served_version": served["version"], "served_adapter": served["adapter"], "served_by": record["served_by"],
        "served_weights_sha256": served["weights_sha256"],
        "latest_version": max(item["version"] for item in record["versions"]),
        "last_decision": record.get("last_decision"),
        "versions": [{"version": item["version"], "adapter": item["adapter"], "round": item.get("round"),
                      "dsc": (item.get("judged") or {}).get("dsc"),
                      "decision": (item.get("judged") or {}).get("decision"),
                      "mlflow_run_id": (item.get("mlflow") or {}).get("run_id")} for item in record["versions"]],
    }


# --- the rollback request --------------------------------------------------------------------------------


def add_routes(settings: Any) -> None:
    """In the server: ``GET /cobot_med/versions/MODEL`` (the record) and ``POST
    /cobot_med/versions/MODEL/serve?version=N`` (serve version N from the next request; 404 for an unknown
    model or version, 422 for a number that is not one, and the served version stays). Added to the FastAPI
    app of ``monailabel.app`` (MONAI Label 0.8.5 has no hook for an app's own endpoints); the app built again
    (reload) replaces them."""
    server = sys.modules.get("monailabel.app")
    if server is None:
        return
    from monailabel.config import settings as server_settings

    prefix = f"{server_settings.MONAI_LABEL_API_STR}/cobot_med/versions"
    models = {model.name: settings.model_dir(model.name) for model in settings.models}

    def model_dir(model: str) -> Path:
        if model not in models:
            raise _http(RequestError(f"unknown model {model!r}: this app serves {sorted(models)}", 404))
        return models[model]

    def listed(model: str) -> dict:
        record = read(model_dir(model))
        return {**summary(record), "record": record}

    def serve_version(model: str, version: str = "") -> dict:
        try:
            return serve(model_dir(model), version, "request")
        except RequestError as err:
            raise _http(err) from None

    web = server.app
    paths = {f"{prefix}/{{model}}", f"{prefix}/{{model}}/serve"}
    web.router.routes[:] = [r for r in web.router.routes if getattr(r, "path", None) not in paths]
    web.add_api_route(f"{prefix}/{{model}}", listed, methods=["GET"], summary="cobot-med: the adapter versions")
    web.add_api_route(f"{prefix}/{{model}}/serve", serve_version, methods=["POST"],
                      summary="cobot-med: serve an adapter version (rollback)")


def _http(err: RequestError):
    from .errors import http_error

    return http_error(err)
