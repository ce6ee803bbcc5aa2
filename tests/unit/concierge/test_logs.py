"""``CONCIERGE_LOG_FORMAT=json`` (``concierge/logs.py``): one JSON object per record, and an
exception is its type and where it was raised, never its message (which may quote input)."""

from __future__ import annotations

import json
import logging

from concierge.logs import JsonFormatter, faust_logging_config


def record(message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("fhir_adapters.pipeline", logging.WARNING, __file__, 1, message,
                             args, info)  # fmt: skip


def test_a_record_is_one_json_object() -> None:
    line = JsonFormatter().format(record("ingested %d resources", 3))
    body = json.loads(line)
    assert body["message"] == "ingested 3 resources"
    assert body["level"] == "WARNING" and body["logger"] == "fhir_adapters.pipeline"
    assert body["time"].endswith("+00:00") and "\n" not in line


def test_an_exception_is_its_type_and_frames_not_its_message() -> None:
    try:
        raise ValueError("birthDate '1961-04-12' of Quixotic-Zebedee is not a date")
    except ValueError as caught:
        line = JsonFormatter().format(record("could not parse", exc=caught))
    body = json.loads(line)
    assert body["exception"]["type"] == "builtins.ValueError"
    assert any("test_logs.py" in frame for frame in body["exception"]["frames"])
    assert "Quixotic" not in line and "1961" not in line


def test_faust_gets_the_json_formatter_only_in_json_mode() -> None:
    assert faust_logging_config("text", "info") is None
    config = faust_logging_config("json", "info")
    assert config is not None
    assert config["formatters"]["json"]["()"] == "concierge.logs.JsonFormatter"
