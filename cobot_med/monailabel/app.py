"""The cobot-med MONAI Label app: one interactive SAM model per base, its adapter trained from the labels
annotators save, served again as soon as a round finishes.

Start it with ``monailabel start_server --app apps/cobot_med --studies DIR [--conf KEY VALUE ...]``
(docs/monailabel.md; the keys: :mod:`cobot_med.monailabel.settings`).
"""

from __future__ import annotations

import os
from typing import Any

from monailabel.config import settings as server_settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore

import cobot_med

from . import settings as app_settings
from .datastore import CheckedDatastore
from .errors import RequestError, http_error
from .infer_task import CobotMedInfer
from .train_task import CobotMedTrain


class CobotMedApp(MONAILabelApp):
    """MONAI Label's app class with the project's infer and train tasks and a checking datastore."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, Any]) -> None:
        self.settings = app_settings.from_conf(conf or {}, studies)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="cobot-med",
                         description="SAM with PEFT adapters (SAM-COBOT), fine-tuned from the annotators' labels",
                         version=cobot_med.__version__, labels=dict(self.settings.organs))

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()  # DICOMweb and others: MONAI Label's own, labels unchecked
        return CheckedDatastore(self.studies, self.settings.organs,
                                extensions=server_settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                auto_reload=server_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=server_settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self) -> dict[str, CobotMedInfer]:
        return {model.name: CobotMedInfer(model, self.settings) for model in self.settings.models}

    def init_trainers(self) -> dict[str, CobotMedTrain]:
        return {name: CobotMedTrain(task.model, self.settings, task.served) for name, task in self._infers.items()}

    def infer(self, request: dict, datastore: Datastore | None = None) -> dict:
        """MONAI Label's infer, with an unknown image or a bad prompt answered 404 / 422 and the reason."""
        image = request.get("image")
        store = datastore or self.datastore()
        if isinstance(image, str) and not os.path.exists(image) and not store.get_image_uri(image):
            raise http_error(RequestError(f"image {image!r} is not in the datastore "
                                          f"({len(store.list_images())} images; see GET /datastore/?output=all)", 404))
        try:
            return super().infer(request, datastore)
        except RequestError as err:
            raise http_error(err) from None
