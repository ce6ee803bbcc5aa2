"""How every service logs: text for a person at a terminal, or one JSON object per line for a
log collector (``CONCIERGE_LOG_FORMAT=json``).

What the product logs carries pseudonyms and counts only (never a name, an NHS number, a FHIR
resource id or a payload: the modules that touch identifiable data log counts, topics, offsets
and exception *types*). The JSON form keeps that promise for exceptions too: a record's
exception is its type and where it was raised (file, line, function), never its message or the
local values a traceback may quote, since a parser's message can quote the input.
``tests/integration/test_json_logs.py`` drives an ingest and requests through a real API and
checks every line.

The formatter is the standard library's ``json`` over :class:`logging.LogRecord`: a dozen
lines, so no logging library is added for it.
"""

from __future__ import annotations

import json
import logging
import logging.config
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

#: The text form (as the services logged before the JSON form existed).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The product's own loggers, at INFO when the root is quieter (catch-up progress, readiness).
PRODUCT_LOGGERS = (
    "concierge",
    "core",
    "feasibility",
    "surveillance_stream",
    "fhir_adapters",
    "recruitment",
    "infra",
    "terminology",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, ``process``, and ``exception`` (``type`` and ``frames``) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            frames = traceback.extract_tb(exc.__traceback__)
            body["exception"] = {
                "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "frames": [f"{f.filename}:{f.lineno} in {f.name}" for f in frames[-8:]],
            }
        return json.dumps(body, default=str)


def _formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(
    log_format: str,
    level: str | int = logging.WARNING,
    info: Iterable[str] = (),
) -> None:
    """The root logger writes to stderr in ``log_format`` (``text`` or ``json``) at ``level``;
    the loggers named in ``info`` log at INFO (or ``level`` if lower)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    threshold = logging.getLevelName(level) if isinstance(level, str) else level
    for name in info:
        logging.getLogger(name).setLevel(min(logging.INFO, int(threshold)))
    logging.captureWarnings(True)


def faust_logging_config(log_format: str, level: str) -> dict[str, Any]:
    """The ``logging_config`` for Faust's worker (``mode``'s dictConfig): every record on stderr
    in ``log_format`` at ``level``, and the product's own loggers at INFO when ``level`` is
    quieter, as :func:`configure_logging` does for the other services (a worker at the default
    ``warning`` still says when it rebuilt a partition, loaded a checkpoint, caught up)."""
    threshold = logging.getLevelName(level.upper())
    product = min(logging.INFO, threshold if isinstance(threshold, int) else logging.WARNING)
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["default"]},
        "loggers": {name: {"level": logging.getLevelName(product)} for name in PRODUCT_LOGGERS},
    }


__all__ = [
    "PRODUCT_LOGGERS",
    "TEXT_FORMAT",
    "JsonFormatter",
    "configure_logging",
    "faust_logging_config",
]
