"""The structured log format: one JSON object per line, the ids split out of the message's
`[Service.Method] key=value` prefix (server/log_format.py)."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from server.log_format import JsonFormatter, LogConfig, event_fields

pytestmark = pytest.mark.unit


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("server.x", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_a_line_carries_the_event_and_its_ids() -> None:
    line = json.loads(
        JsonFormatter().format(
            record(
                "[Coordinator.SubmitUpdate] round_id=%s proplet_id=%s num_updates=%d",
                "r1",
                "p-1",
                2,
            )
        )
    )
    assert line["event"] == "Coordinator.SubmitUpdate"
    assert line["level"] == "INFO" and line["logger"] == "server.x"
    assert (line["round_id"], line["proplet_id"], line["experiment_id"]) == ("r1", "p-1", "")
    assert line["fields"] == {"num_updates": "2"}
    assert line["message"] == "[Coordinator.SubmitUpdate] round_id=r1 proplet_id=p-1 num_updates=2"
    # Without tracing the trace fields are there, empty.
    assert (line["trace_id"], line["span_id"]) == ("", "")


def test_record_attributes_win_and_trace_ids_come_from_the_record() -> None:
    line = json.loads(
        JsonFormatter().format(
            record(
                "[Manager.StartExperiment] round_id=from-text",
                round_id="from-extra",
                experiment_id="e1",
                otelTraceID="4bf92f3577b34da6a3ce929d0e0e4736",
                otelSpanID="00f067aa0ba902b7",
            )
        )
    )
    assert (line["round_id"], line["experiment_id"]) == ("from-extra", "e1")
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["span_id"] == "00f067aa0ba902b7"


def test_a_message_without_a_prefix_and_an_exception_stay_one_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = record("plain text, a=b\nsecond line")
        failed.exc_info = sys.exc_info()
    text = JsonFormatter().format(failed)
    assert "\n" not in text
    line = json.loads(text)
    assert line["event"] == "" and line["fields"] == {"a": "b"}
    assert "RuntimeError: boom" in line["exception"]


def test_only_text_and_json_are_formats() -> None:
    assert LogConfig.from_env({}).format == "text"
    assert LogConfig.from_env({"PROPELLER_LOG_FORMAT": "json"}).format == "json"
    with pytest.raises(ValueError, match="PROPELLER_LOG_FORMAT: 'xml' is not one of text, json"):
        LogConfig.from_env({"PROPELLER_LOG_FORMAT": "xml"})


def test_event_fields_reads_the_prefix_and_pairs() -> None:
    assert event_fields("[serve] manager pid=7 config=X(a=1)") == (
        "serve",
        {"pid": "7", "config": "X(a=1)"},
    )
