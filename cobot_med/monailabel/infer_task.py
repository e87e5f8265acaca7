"""The interactive infer task: an ROI box and clicks -> one organ's 3D segmentation in the image's geometry.

A MONAI Label ``BasicInferTask`` of type ``deepgrow`` (3D), so 3D Slicer's MONAI Label module lists it
under *SmartEdit* with its foreground / background point tools and the ROI box, and OHIF under point
prompts. The stages are BasicInferTask's own: pre-transforms (read the prompts, take the served network,
load the volume through the run's volume chain for the network's input recipe), the inferer (the project's box / key-slice prediction, clicks as SAM point
prompts), post-transforms (back to the file's grid), the writer.
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable, Sequence

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.transform.writer import Writer

from . import clicks, project, versions
from .errors import RequestError
from .served import ServedModel
from .settings import PROPAGATIONS, AppSettings, ConfError, ModelSettings

NIFTI = (".nii.gz", ".nii")


class ReadPrompts:
    """Pre-transform: the request's organ, ROI and clicks (``data["prompted"]``), checked before any loading."""

    def __init__(self, organs: dict[str, int], propagations: Sequence[str]) -> None:
        self.organs, self.propagations = organs, list(propagations)

    def __call__(self, data: dict) -> dict:
        data["prompted"] = clicks.parse(data, self.organs, self.propagations)
        return data


class LoadVolume:
    """Pre-transform: the served network for this request's device (``data["network"]``, fixed for the whole
    request even if a round finishes meanwhile) and the image through the run's volume chain for its input
    recipe (``data["volume"]``, oriented RAS; ``data["chain"]``, inverted on the way back)."""

    def __init__(self, task: CobotMedInfer) -> None:
        self.task = task

    def __call__(self, data: dict) -> dict:
        (network, precision, chain), info = self.task.served.get(str(data.get("device") or "cpu"))
        data["network"], data["precision"], data["chain"], data["model_info"] = network, precision, chain, info
        try:
            data["volume"] = project.load_volume(data["image_path"], chain)
        except Exception as err:  # noqa: BLE001 - the reader's reason goes back to the client
            raise RequestError(f"cannot read image {data['image_path']}: {err}") from err
        return data


class ToFileGeometry:
    """Post-transform: the oriented label back into the file's own voxel grid (``data["pred"]``)."""

    def __call__(self, data: dict) -> dict:
        data["pred"] = project.to_file(data["pred"], data["volume"], data["chain"])
        return data


class CobotMedInfer(BasicInferTask):
    """SAM with the served adapter: ``label`` (segment name), ``roi``, ``foreground``, ``background``."""

    def __init__(self, model: ModelSettings, settings: AppSettings) -> None:
        self.model, self.settings = model, settings
        choices = [settings.propagation] + [p for p in PROPAGATIONS if p != settings.propagation]
        super().__init__(
            path=None, network=None, type=InferType.DEEPGROW, labels=dict(settings.organs), dimension=3,
            description=f"SAM ({model.name}) with the served PEFT adapter: ROI box and clicks -> 3D segmentation",
            config={"propagation": choices},
        )
        try:
            self.served = ServedModel(settings.model_dir(model.name), model.adapter, self._load, model.version)
        except ValueError as err:  # another start adapter's versions, or an adapter_version that is not one
            raise ConfError(f"--conf adapter / adapter_version / output_dir: {err}") from None

    def _load(self, adapter: str | None, device: str) -> tuple[Any, dict]:
        """(network, precision, volume chain) of the model serving ``adapter`` (None: the base) on ``device``."""
        run = project.with_settings(self.model.run, adapter=adapter or "")
        network, info, precision = project.load_model(run, device)
        return (network, precision, project.volume_chain(run, network)), info

    def is_valid(self) -> bool:
        return True  # the base is always there (weights from the settings, or a fixed-seed test arch)

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["served"] = self.served.current()
        info["cobot_med"] = versions.summary(versions.read(self.served.model_dir))  # versions, last decision
        info["description"] += f" (serving adapter version {info['served']['version']})"
        return info

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [ReadPrompts(self.settings.organs, PROPAGATIONS), LoadVolume(self)]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [ToFileGeometry()]

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        prompted = data["prompted"]
        network = data.pop("network")
        try:
            label, record = project.segment(network, data["volume"], prompted.organ, prompted.organ_id,
                                            prompted.interaction, prompted.propagation, device,
                                            self.model.run.slice_batch(device, network), data.pop("precision"),
                                            self.model.run.propagator)
        except project.BadPrompt as err:
            raise RequestError(str(err)) from None
        data["pred"] = label
        data["result"] = {"cobot_med": {"model": data["model_info"], "organ": prompted.organ,
                                        "label_id": prompted.organ_id, "propagation": prompted.propagation, **record}}
        return data

    def writer(self, data: dict, extension=None, dtype=None) -> tuple[Any, Any]:
        """NIfTI results are written as ``cobot-med infer`` writes them (the input's exact affine); other
        extensions a client asks for (``result_extension``, e.g. Slicer's ``.nrrd``) by MONAI Label's writer."""
        wanted = data.get("result_extension") or extension or self._extension(data["image_path"])
        if wanted not in NIFTI:
            from monai.data import MetaTensor

            volume = MetaTensor(data["pred"][0].as_tensor(), affine=data["pred"].affine)  # (X, Y, Z), file affine
            return Writer(label="pred", json="result")({**data, "pred": volume, "result_extension": wanted})
        path = tempfile.NamedTemporaryFile(suffix=wanted, delete=False).name
        project.write_label(data["pred"][0].numpy(), data["pred"], path)  # the file's own grid and affine
        return path, data["result"]

    @staticmethod
    def _extension(path: str) -> str:
        return next((s for s in NIFTI if str(path).endswith(s)), ".nii.gz")

    def __call__(self, request, callbacks=None):
        result_file, result_json = super().__call__(request, callbacks)
        cobot = result_json.get("cobot_med", {})
        result_json["label_names"] = {cobot.get("organ", ""): cobot.get("label_id", 1)}  # what the file holds
        return result_file, result_json
