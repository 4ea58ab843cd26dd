"""Logging: JSON lines with bound process context, readable console lines, redaction."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from dsf_bridge.logs import bound_context, configure_logging, step_log_context, uid_digest


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    yield None
    logging.captureWarnings(False)
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


def test_dicom_uids_become_digests_in_every_value_and_library_line() -> None:
    study = "1.2.826.0.1.3680043.8.498.4482903"
    uuid_uid = "2.25.329800735698586629295641978511506172918"
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    log = structlog.get_logger("test")
    log.info(f"study {study}.", reason=f"series {uuid_uid} is missing")
    logging.getLogger("urllib3.connectionpool").debug('"GET /studies/%s/series HTTP/1.1"', study)
    try:
        raise LookupError(f"no study {study}")
    except LookupError:
        log.exception("lookup.failed")
    log.info("task.outputs", values=[study, {"series": (uuid_uid,)}])
    log.info(
        "kept",
        transfer_syntax="1.2.840.10008.1.2.1",
        version="1.0.0.0",
        address="192.168.100.200",
        duration="0.25",
    )

    text = out.getvalue()
    assert study not in text
    assert uuid_uid not in text
    first, library, failed, nested, kept = (json.loads(line) for line in text.splitlines())
    assert first["event"] == f"study uid:{uid_digest(study)}."
    assert first["reason"] == f"series uid:{uid_digest(uuid_uid)} is missing"
    assert library["event"] == f'"GET /studies/uid:{uid_digest(study)}/series HTTP/1.1"'
    assert f"LookupError: no study uid:{uid_digest(study)}" in failed["exception"]
    assert nested["values"] == [
        f"uid:{uid_digest(study)}",
        {"series": [f"uid:{uid_digest(uuid_uid)}"]},
    ]
    assert kept["transfer_syntax"] == "1.2.840.10008.1.2.1"
    assert kept["version"] == "1.0.0.0"
    assert kept["address"] == "192.168.100.200"
    assert kept["duration"] == "0.25"


def test_the_uid_digest_is_short_stable_and_tells_uids_apart() -> None:
    digest = uid_digest("1.2.3.4.5.6")
    assert digest == uid_digest("1.2.3.4.5.6")
    assert digest != uid_digest("1.2.3.4.5.7")
    assert len(digest) == 12
    assert int(digest, 16) >= 0


def test_the_step_context_is_carried_past_its_block() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    with bound_context(process="p", process_version="1.0", element_id="Work", task_id=None):
        context = step_log_context()
    assert context == {"process": "p", "process_version": "1.0", "element_id": "Work"}
    with bound_context(**context):
        structlog.get_logger().info("instance.stepped")
    record = json.loads(out.getvalue())
    assert (record["process"], record["process_version"], record["element_id"]) == (
        "p",
        "1.0",
        "Work",
    )


def test_uids_archives_send_are_redacted_wherever_they_stand() -> None:
    """A UID with a leading zero in a component (pydicom warns about it, quoting it), a UID
    next to letters or an underscore, in a dict key, an exception object or bytes, and a
    warning, which Python printed straight to standard error."""
    import warnings

    odd = "1.2.826.0.1.3680043.8.498.0123456789"
    study = "1.2.826.0.1.3680043.8.498.4482903"
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    logging.getLogger("pydicom").warning("Invalid value for VR UI: '%s'.", odd)
    log = structlog.get_logger("test")
    log.info("file", path=f"series_{study}_seg.dcm", counts={study: 1})
    log.info("objects", error=LookupError(f"no study {study}"), raw=study.encode())
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"Invalid value for VR UI: '{odd}'", UserWarning, stacklevel=1)
    text = out.getvalue()
    assert odd not in text and study not in text, text
    library, file, objects, warned = (json.loads(line) for line in text.splitlines())
    assert library["event"] == f"Invalid value for VR UI: 'uid:{uid_digest(odd)}'."
    assert file["path"] == f"series_uid:{uid_digest(study)}_seg.dcm"
    assert file["counts"] == {f"uid:{uid_digest(study)}": 1}
    assert objects["error"] == f"LookupError('no study uid:{uid_digest(study)}')"
    assert warned["logger"] == "py.warnings"
    assert f"uid:{uid_digest(odd)}" in warned["event"]
