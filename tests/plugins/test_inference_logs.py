"""Inference failures are logged with their reason, at error, with no study UID in the line."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from dsf_bridge.logs import uid_digest
from dsf_bridge.omi.dicomweb import StudyNotFoundError
from dsf_bridge.plugins.inference import (
    NOT_DELIVERED,
    STUDY_NOT_FOUND,
    InferenceRequestError,
    inference_failed,
    record_failure,
)
from dsf_bridge.plugins.registry import HandlerContext
from tests.components import json_logs

STUDY = "1.2.826.0.1.3680043.8.498.77312904551"
ARCHIVE = "https://pacs.example.org/dicom-web"


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Every log line of the test, as JSON lines."""
    with json_logs("info") as out:
        yield out


def _only(out: io.StringIO, event: str) -> dict[str, Any]:
    records: list[dict[str, Any]] = [json.loads(line) for line in out.getvalue().splitlines()]
    (record,) = [r for r in records if r["event"] == event]
    return record


def test_a_providers_failure_is_logged_with_the_reason_and_no_study_uid(
    logs: io.StringIO,
) -> None:
    # The archive's own error text, as the execution handler turns it into the BPMN error.
    reason = str(
        StudyNotFoundError(f"study {STUDY} is not in the archive at {ARCHIVE}", url=ARCHIVE)
    )
    ctx = HandlerContext(
        "RecordFailure",
        "RecordFailure",
        "bk",
        {"errorCode": STUDY_NOT_FOUND, "errorMessage": reason},
    )
    record_failure(ctx)

    record = _only(logs, "inference.execution_failed")
    assert record["level"] == "error"
    assert record["error_code"] == STUDY_NOT_FOUND
    assert record["reason"] == f"study uid:{uid_digest(STUDY)} is not in the archive at {ARCHIVE}"
    assert STUDY not in logs.getvalue()


def test_a_failed_request_is_logged_with_the_reason_at_the_requesting_site(
    logs: io.StringIO,
) -> None:
    ctx = HandlerContext(
        "InferenceFailed",
        "InferenceFailed",
        "bk",
        {
            "errorCode": NOT_DELIVERED,
            "errorMessage": "POST https://ai.example.org/fhir/Task: connection refused",
            "provider": "ai.example.org",
        },
    )
    with pytest.raises(InferenceRequestError, match=r"not delivered to ai\.example\.org"):
        inference_failed(ctx)

    record = _only(logs, "inference.request_failed")
    assert record["level"] == "error"
    assert record["error_code"] == NOT_DELIVERED
    assert record["provider"] == "ai.example.org"
    assert record["reason"] == (
        "inference request not delivered to ai.example.org: "
        "POST https://ai.example.org/fhir/Task: connection refused"
    )


def test_a_providers_megabyte_of_reason_is_cut_short(logs: io.StringIO) -> None:
    """The reason quotes the provider's words (its result Task's error, its package's manifest
    text): a hostile provider's megabyte must not go whole into this site's log line and the
    instance's failure."""
    ctx = HandlerContext(
        handler="InferenceFailed",
        element_id="InferenceFailed",
        business_key="bk-1",
        variables={
            "errorCode": "provider-failed",
            "errorMessage": "inference failed at ai.example.org (model-error): " + "x" * 1_000_000,
            "provider": "ai.example.org",
        },
    )
    with pytest.raises(InferenceRequestError) as raised:
        inference_failed(ctx)

    assert len(str(raised.value)) < 2_000
    assert str(raised.value).startswith("provider-failed: ")
    assert "(1000050 characters)" in str(raised.value)
    record = _only(logs, "inference.request_failed")
    assert len(record["reason"]) < 2_000
