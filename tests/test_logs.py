"""Logging: JSON lines with bound process context, readable console lines, redaction."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from dsf_bridge.logs import bound_context, configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    yield None
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    structlog.reset_defaults()


def test_json_lines_carry_bound_context() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("test")
    with bound_context(task_id="t-1", business_key="bk-9", instance_id=None):
        log.info("task.received", process="dsfdev_ping")
    log.info("instance.completed")

    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "task.received"
    assert first["task_id"] == "t-1"
    assert first["business_key"] == "bk-9"
    assert "instance_id" not in first
    assert first["level"] == "info"
    assert first["timestamp"].endswith("Z")
    assert "task_id" not in second


def test_stdlib_records_go_through_the_same_renderer() -> None:
    out = io.StringIO()
    configure_logging("warning", "json", stream=out)
    logging.getLogger("some.library").warning("disk %s", "full")
    logging.getLogger("some.library").info("hidden below the level")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["event"] == "disk full"


def test_sensitive_values_are_redacted() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    structlog.get_logger().info(
        "task.sent", payload={"patient": "Doe"}, token="abc", target="org-2"
    )
    record = json.loads(out.getvalue())
    assert record["payload"] == "[redacted]"
    assert record["token"] == "[redacted]"
    assert record["target"] == "org-2"
    assert "Doe" not in out.getvalue()


def test_console_format_is_not_json() -> None:
    out = io.StringIO()
    configure_logging("info", "console", stream=out)
    structlog.get_logger().info("bridge.started", port=8080)
    text = out.getvalue()
    assert "bridge.started" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_unknown_context_key_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log context"), bound_context(taskid="x"):
        pass
