"""A request the app cannot serve, and its HTTP answer (MONAI Label's server answers 500 to anything else)."""

from __future__ import annotations


class RequestError(ValueError):
    """A client's mistake (unknown image, prompt outside the volume, label of the wrong shape): a 4xx answer."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def http_error(err: RequestError):
    """The FastAPI exception MONAI Label's endpoints turn into ``{"detail": message}`` with the error's status."""
    from fastapi import HTTPException

    return HTTPException(status_code=err.status, detail=str(err))
