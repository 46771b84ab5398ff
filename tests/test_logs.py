"""Log lines in the two formats LOG_FORMAT chooses."""

from __future__ import annotations

import json
import logging

import pytest

from schemas import config
from schemas.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    """configure_logging binds the process-wide logger to this test's stderr: undo it."""
    logger = logging.getLogger("streamlens")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def test_text_lines_carry_time_level_logger_and_message(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("text")
    logging.getLogger("streamlens.dataflow").warning("postgres unavailable: %s", "refused")
    [line] = capsys.readouterr().err.splitlines()
    when, level, name, message = line.split(" ", 3)
    assert when.endswith("Z") and "T" in when
    assert (level, name, message) == ("WARNING", "streamlens.dataflow:", "postgres unavailable: refused")


def test_json_lines_are_one_object_each_with_the_extra_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    logging.getLogger("streamlens.ingestion").info("broker back", extra={"outage_seconds": 12.5})
    logging.getLogger("streamlens.ingestion").debug("not shown: below INFO")
    [line] = capsys.readouterr().err.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "INFO" and entry["logger"] == "streamlens.ingestion"
    assert entry["message"] == "broker back" and entry["outage_seconds"] == 12.5
    assert entry["time"].endswith("Z")


def test_log_format_is_text_or_json() -> None:
    assert config.load({}).log_format == "text"
    assert config.load({"LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(config.ConfigError, match="LOG_FORMAT='xml', expected text or json"):
        config.load({"LOG_FORMAT": "xml"})
