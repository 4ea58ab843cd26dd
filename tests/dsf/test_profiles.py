"""Task profile checks against the DSF ping-pong plugin's own StructureDefinitions (reference
corpus) on top of DSF's task-base 1.0.0, and the same verdicts from our profiles."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.dsf.profiles import ProfileError, TaskProfile
from dsf_bridge.dsf.publication import read_resource
from dsf_bridge.dsf.tasks import build_task
from dsf_bridge.dsf.vocabulary import ENDPOINT_IDENTIFIER_SYSTEM
from dsf_bridge.plugins.pingpong import profiles_dir, status_output
from dsf_bridge.plugins.placeholders import Placeholders
from tests.reference import reference_file

PING_PONG_SD = "dsf-process-ping-pong/src/main/resources/fhir/StructureDefinition"
TASK_BASE = (
    "dsf/v1.9.0/dsf-fhir/dsf-fhir-validation/src/main/resources/fhir/StructureDefinition/"
    "dsf-task-base-1.0.0.xml"
)
PING = "http://dsf.dev/fhir/CodeSystem/ping"
_VALUES = Placeholders("1.0", "2026-01-01", "Site_A", {})


def _read(path: Path) -> dict[str, Any]:
    return read_resource(path, _VALUES.replace_fhir_bytes(path.read_bytes(), source=str(path)))


def reference_profile(name: str) -> TaskProfile:
    """``task-ping`` and friends as the Java plugin defines them, over DSF's task-base."""
    profile = _read(reference_file(f"{PING_PONG_SD}/dsf-{name}.xml"))
    return TaskProfile.from_definitions(profile, [_read(reference_file(TASK_BASE))])


def our_profile(name: str) -> TaskProfile:
    profile = _read(profiles_dir() / "StructureDefinition" / f"{name}.json")
    return TaskProfile.from_definitions(profile, [_read(reference_file(TASK_BASE))])


def _task(message: str, canonical: str, profile: str, *inputs: dict[str, object]) -> dict[str, Any]:
    return build_task(
        instantiates_canonical=f"http://dsf.dev/bpe/Process/{canonical}|1.0",
        message_name=message,
        profile=f"http://dsf.dev/fhir/StructureDefinition/{profile}|1.0",
        business_key=None if message == "startPing" else "bk-1",
        correlation_key=None if message == "startPing" else "ck-1",
        requester="Site_A",
        recipient="Site_B",
        inputs=inputs,
        authored_on=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )


ENDPOINT_INPUT: dict[str, object] = {
    "system": PING,
    "code": "endpoint-identifier",
    "value": {
        "valueReference": {
            "type": "Endpoint",
            "identifier": {"system": ENDPOINT_IDENTIFIER_SYSTEM, "value": "Site_A_Endpoint"},
        }
    },
}
TARGET = {
    "organizationIdentifier": "Site_B",
    "endpointIdentifier": "Site_B_Endpoint",
    "correlationKey": "ck-1",
}


def ping_task() -> dict[str, Any]:
    return _task("ping", "pong", "task-ping", ENDPOINT_INPUT)


def pong_task() -> dict[str, Any]:
    return _task("pong", "ping", "task-pong")


def start_task() -> dict[str, Any]:
    search: dict[str, object] = {
        "system": PING,
        "code": "target-endpoints",
        "value": "Endpoint?status=active",
    }
    task = _task("startPing", "ping", "task-start-ping", search)
    task["output"] = [status_output("ping-status", TARGET, "pong-received")]
    return task


@pytest.mark.parametrize("load", [reference_profile, our_profile], ids=["reference", "ours"])
@pytest.mark.parametrize(
    ("name", "make"),
    [("task-ping", ping_task), ("task-pong", pong_task), ("task-start-ping", start_task)],
)
def test_tasks_the_plugin_sends_conform(load: Any, name: str, make: Any) -> None:
    profile = load(name)
    assert profile.problems(make()) == []
    profile.check(make())


def _without_input(task: dict[str, Any], code: str) -> dict[str, Any]:
    broken = copy.deepcopy(task)
    broken["input"] = [i for i in broken["input"] if i["type"]["coding"][0]["code"] != code]
    return broken


def _broken_ping_string_endpoint() -> dict[str, Any]:
    broken = ping_task()
    endpoint = broken["input"][-1]
    del endpoint["valueReference"]
    endpoint["valueString"] = "Site_A_Endpoint"
    return broken


def _broken_message_name() -> dict[str, Any]:
    broken = ping_task()
    broken["input"][0]["valueString"] = "pong"
    return broken


def _broken_canonical() -> dict[str, Any]:
    broken = pong_task()
    broken["instantiatesCanonical"] = "http://dsf.dev/bpe/Process/pong|1.0"
    return broken


def _broken_requester() -> dict[str, Any]:
    broken = pong_task()
    broken["requester"]["identifier"]["system"] = "http://example.org/sid/other"
    return broken


def _broken_output() -> dict[str, Any]:
    broken = start_task()
    del broken["output"][0]["extension"]
    broken["output"][0]["valueCoding"]["system"] = "http://example.org/other"
    return broken


@pytest.mark.parametrize("load", [reference_profile, our_profile], ids=["reference", "ours"])
@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        (
            "task-ping",
            lambda: _without_input(ping_task(), "endpoint-identifier"),
            "Task.input:endpoint-identifier: 0 present, at least 1",
        ),
        ("task-ping", lambda: _without_input(ping_task(), "correlation-key"), "at least 4"),
        ("task-ping", _broken_ping_string_endpoint, "valueString given, allowed valueReference"),
        ("task-ping", _broken_message_name, "'pong' is not the fixed value 'ping'"),
        ("task-pong", _broken_canonical, "Task.instantiatesCanonical"),
        ("task-pong", _broken_requester, "Task.requester.identifier.system"),
        (
            "task-pong",
            lambda: _without_input(pong_task(), "business-key"),
            "Task.input:business-key: 0 present, at least 1",
        ),
        (
            "task-start-ping",
            _broken_output,
            "Task.output:ping-status.extension:ping-status-extension: 0 present, at least 1",
        ),
        ("task-start-ping", _broken_output, "Task.output:ping-status.value[x].system"),
    ],
)
def test_broken_tasks_are_refused(load: Any, name: str, make: Any, expected: str) -> None:
    profile = load(name)
    problems = profile.problems(make())
    assert any(expected in problem for problem in problems), problems
    with pytest.raises(ProfileError, match=r"does not conform to http://dsf\.dev/fhir/"):
        profile.check(make())
