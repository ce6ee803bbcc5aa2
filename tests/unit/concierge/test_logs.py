"""``CONCIERGE_LOG_FORMAT=json`` (``concierge/logs.py``): one JSON object per record, and an
exception is its type and where it was raised, never its message (which may quote input)."""

from __future__ import annotations

import json
import logging
import logging.config

import pytest

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


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_worker_at_warning_still_logs_the_products_info_lines(
    log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Faust's own chatter stays at the level asked for; the product's lines (a partition
    rebuilt, a checkpoint loaded) come through at INFO, in the format asked for."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    levels = {name: logging.getLogger(name).level for name in ("faust", "surveillance_stream")}
    try:
        logging.config.dictConfig(faust_logging_config(log_format, "warning"))
        logging.getLogger("faust.tables").info("faust chatter")
        logging.getLogger("surveillance_stream.store").info("partition 3 rebuilt")
        logging.getLogger("faust.tables").warning("faust warning")
        lines = capsys.readouterr().err.splitlines()
    finally:
        root.handlers[:], root.level = saved
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert len(lines) == 2, lines
    assert "partition 3 rebuilt" in lines[0] and "faust warning" in lines[1]
    if log_format == "json":
        assert [json.loads(line)["level"] for line in lines] == ["INFO", "WARNING"]
    else:
        assert " INFO surveillance_stream.store: partition 3 rebuilt" in lines[0]
