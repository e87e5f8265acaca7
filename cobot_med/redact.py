"""The one redaction of credentials, for every URI the project writes or prints.

A tracking store may be ``postgresql://user:password@host/db`` or ``http://user:token@server``; what the
project writes (``resolved_settings.json``, ``resume.pt``, MLflow params and artifacts, the MONAI Label app's
``versions.json``, summaries) and prints (errors, logs) carries it as ``postgresql://user:***@host/db``. Query parameters
that carry a secret (``?password=...``, ``token``, ``access_key``...) are masked the same way. The store
itself is always reached with the URI as given; only what is recorded is redacted, so a record names the
store without holding its key.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
# scheme://user:password@  (the password is anything up to the last '@' before the host, without '/')
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)(?P<secret>[^\s/]*)(?P<at>@)")
_QUERY = re.compile(r"(?P<head>[?&;](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|access_key|"
                    r"secret_key|sig|signature)=)(?P<secret>[^&;#\s'\"]+)", re.IGNORECASE)


def redact(value: Any) -> Any:
    """``value`` with credentials masked: a string (a URI, or a message holding URIs), or the strings inside
    dicts, lists and tuples (keys included), recursively; anything else unchanged."""
    if isinstance(value, str):
        if "://" not in value and "=" not in value:
            return value
        text = _USERINFO.sub(lambda m: m["head"] + (MASK if m["secret"] else "") + m["at"], value)
        return _QUERY.sub(lambda m: m["head"] + MASK, text)
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """Masks credentials in a record before any handler formats it (for handlers the project did not configure,
    e.g. MLflow's own, which prints the tracking URI of a run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def mask_logs() -> None:
    """Put :class:`RedactingFilter` on every handler of every logger there is now (the root, MONAI's own loggers,
    MLflow's, ignite's). Idempotent; called when a run starts and when MLflow is first used."""
    loggers = [logging.getLogger()] + [item for item in list(logging.root.manager.loggerDict.values())
                                       if isinstance(item, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
