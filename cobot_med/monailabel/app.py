"""The cobot-med MONAI Label app: one interactive SAM model per base, its adapter trained from the labels
annotators save, served again as soon as a round finishes.

Start it with ``python -m cobot_med.monailabel DIR`` (a data folder: :mod:`cobot_med.monailabel.folder`) and
``monailabel start_server --app DIR --studies STUDIES [--conf KEY VALUE ...]`` (docs/monailabel.md; the keys:
:mod:`cobot_med.monailabel.settings`). A request the app cannot serve is answered 4xx with the reason, also
where MONAI Label's own endpoint would fail first (:func:`guard_requests`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Awaitable, Callable

from monailabel.config import settings as server_settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore

import cobot_med

from . import settings as app_settings
from . import versions
from .datastore import CheckedDatastore
from .dicomweb import dicomweb_datastore, is_dicomweb
from .errors import RequestError, http_error
from .folder import check_app_dir
from .infer_task import CobotMedInfer
from .train_task import CobotMedTrain


class CobotMedApp(MONAILabelApp):
    """MONAI Label's app class with the project's infer and train tasks and a checking datastore."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, Any]) -> None:
        try:
            check_app_dir(app_dir)
        except ValueError as err:
            raise app_settings.ConfError(str(err)) from None
        conf = dict(conf or {})
        if is_dicomweb(studies) and not conf.get("output_dir"):  # a URL is no folder: the app's data folder keeps it
            conf["output_dir"] = os.path.join(app_dir, "cobot_med")
        self.settings = app_settings.from_conf(conf, studies)
        guard_requests(self)
        versions.add_routes(self.settings)  # GET /cobot_med/versions/MODEL, POST .../serve?version=N (rollback)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="cobot-med",
                         description="SAM with PEFT adapters (SAM-COBOT), fine-tuned from the annotators' labels",
                         version=cobot_med.__version__, labels=organ_names(self.settings.organs))

    def init_datastore(self) -> Datastore:
        if is_dicomweb(self.studies) and server_settings.MONAI_LABEL_DATASTORE.lower() not in ("xnat", "dsa") \
                and "googleapis.com" not in self.studies:
            self.studies = self.studies.rstrip("/").strip()
            return dicomweb_datastore(self.studies, self.settings.organs)  # checked series, the project's SEG
        if is_dicomweb(self.studies):
            return super().init_datastore()  # XNAT, DSA, Google's DICOM store: MONAI Label's own, labels unchecked
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


def organ_names(organs: dict[str, int]) -> list[str]:
    """``GET /info/``'s ``labels``: the organs' names in id order, a list as OHIF's MONAI Label panel reads it (it
    appends to it; a ``{name: id}`` object there stops the panel). Each model's ``labels`` keep ``{name: id}``."""
    return [name for name, _ in sorted(organs.items(), key=lambda item: item[1])]


# --- requests MONAI Label's endpoints would answer with 500 (or 200, then fail) --------------------------------

Check = Callable[[Any], Awaitable["tuple[int, str] | None"]]


def guard_requests(app: "CobotMedApp") -> None:
    """In the server, check two requests before MONAI Label's endpoints take them: ``POST /infer/MODEL`` whose
    ``params`` form field is not a JSON object (the endpoint's ``json.loads`` would answer 500) and ``POST
    /train/MODEL`` (or ``POST /train/``, OHIF's *Update Model*) with no saved label yet, or only held-out ones (a
    training task would start, answer 200, and fail in its status).
    Each gets 422 and the reason. The checks sit in front of the server's ASGI stack (Starlette's
    ``middleware_stack``), so they do not depend on how the endpoints are routed."""
    server = sys.modules.get("monailabel.app")
    if server is None:  # not in a server (a training round's process, a test building the app)
        return

    async def params_are_json(request: Any) -> "tuple[int, str] | None":
        form = await request.form()
        text = form.get("params")
        if text is None or text == "":
            return None
        try:
            params = json.loads(text)
        except (TypeError, ValueError) as err:
            return 422, f"params is not JSON ({err}): send a JSON object, e.g. {{\"label\": \"liver\", \"roi\": [...]}}"
        if not isinstance(params, dict):
            return 422, f"params must be a JSON object, got {type(params).__name__}"
        return None

    async def labels_saved(request: Any) -> "tuple[int, str] | None":
        datalist = app.datastore().datalist()
        if not datalist:
            return 422, "no saved labels yet: save at least one label (final) before training"
        # every saved label held out: nothing to train on (POST /train/ without a model trains every model)
        named = re.search(r"/train/([^/]+)/?$", request.url.path)
        models = [named.group(1)] if named else [model.name for model in app.settings.models]
        problems = [versions.nothing_to_train(app.settings.model_dir(model), datalist) for model in models]
        return None if not problems or None in problems else (422, problems[0])

    web = server.app
    stack = web.middleware_stack if web.middleware_stack is not None else web.build_middleware_stack()
    if not isinstance(stack, _Checked):
        web.middleware_stack = _Checked(stack, [("POST", re.compile(r"/infer/[^/]+/?$"), params_are_json),
                                                ("POST", re.compile(r"/train/([^/]+/?)?$"), labels_saved)])
    else:
        stack.checks = [("POST", re.compile(r"/infer/[^/]+/?$"), params_are_json),
                        ("POST", re.compile(r"/train/([^/]+/?)?$"), labels_saved)]  # the app built again (reload)


class _Checked:
    """An ASGI app behind checks of some requests (method, path pattern, check): such a request's body is read
    once, checked, and replayed to the app; a failed check is answered ``{"detail": reason}`` with its status."""

    def __init__(self, app: Any, checks: list) -> None:
        self.app, self.checks = app, checks

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        check = None
        if scope.get("type") == "http":
            path = scope.get("path", "")
            check = next((c for method, pattern, c in self.checks
                          if scope.get("method") == method and pattern.search(path)), None)
        if check is None:
            await self.app(scope, receive, send)
            return
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)

        def replay() -> Callable[[], Awaitable[dict]]:
            sent = False

            async def receive_again() -> dict:
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            return receive_again

        problem = await check(Request(scope, replay()))
        if problem is not None:
            await JSONResponse({"detail": problem[1]}, status_code=problem[0])(scope, receive, send)
            return
        await self.app(scope, replay(), send)
