"""The sandbox reads request bodies as DSF's HAPI parser does (lenient): values of the wrong
JSON kind are dropped before any rule reads them, bodies it cannot read at all are refused."""

from __future__ import annotations

from typing import Any

import pytest

from dsf_bridge.dsf.versions import DSF_1, DSF_2, DsfRelease
from dsf_bridge.sandbox.parsing import UnparsableBodyError, as_parsed
from tests.sandbox.test_dsf_fixtures import LOCAL, DsfIntegration, assert_forbidden
from tests.sandbox.test_dsf_task_integration import _task_in_progress

CODING = {"system": "http://example.org", "code": "a"}


def test_values_of_the_wrong_kind_are_dropped_recursively() -> None:
    body: dict[str, Any] = {
        "resourceType": "Task",
        "status": {"not": "a string"},
        "requester": "not an object",
        "input": [1, "x", None, [2], {"type": {"coding": [3, CODING]}, "valueString": "v"}],
        "output": [{"type": 4}],
        "authoredOn": "2026-11-29",
        "unknownElement": 5,
    }
    assert as_parsed(body) == {
        "resourceType": "Task",
        "input": [{"type": {"coding": [CODING]}, "valueString": "v"}],
        "authoredOn": "2026-11-29",
        "unknownElement": 5,
    }


def test_contained_and_bundled_resources_are_read_by_their_own_type() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [7, {"resource": {"resourceType": "Task", "input": [8], "status": "draft"}}],
    }
    assert as_parsed(bundle)["entry"] == [{"resource": {"resourceType": "Task", "status": "draft"}}]


@pytest.mark.parametrize("body", [[1], "Task", {"resourceType": 3}, {"input": []}])
def test_a_body_that_is_no_resource_is_unparsable(body: object) -> None:
    with pytest.raises(UnparsableBodyError):
        as_parsed(body)


@pytest.mark.parametrize("release", [DSF_2, DSF_1], ids=lambda r: r.name)
@pytest.mark.parametrize("inputs", [[1], ["text"], [None], [[{}]]], ids=repr)
def test_a_task_update_with_inputs_that_are_no_objects_is_forbidden(
    release: DsfRelease, inputs: list[Any]
) -> None:
    """HAPI drops the inputs, the update rule sees Task.input changed: 403, nothing stored
    (the sandbox used to crash in its rule and answer 500)."""
    dsf = DsfIntegration.start(release)
    created = _task_in_progress(dsf)
    assert_forbidden(
        dsf.update(LOCAL, {**created, "status": "completed", "input": inputs}), "update"
    )
    assert dsf.service.store.read("Task", created["id"]) == created


def test_elements_left_empty_are_dropped_up_to_the_first_one_with_content() -> None:
    body = {"resourceType": "Task", "input": [{"type": {"coding": [3]}}, {"valueString": "v"}]}
    assert as_parsed(body) == {"resourceType": "Task", "input": [{"valueString": "v"}]}


def test_nesting_deeper_than_pythons_stack_is_read() -> None:
    """A JSON parser accepts 1,000 levels (Jackson under HAPI): reading them must not crash
    the sandbox (the bridge's own bounds then refuse such a Task)."""
    body: dict[str, Any] = {"resourceType": "Task"}
    innermost = body
    for _ in range(2_000):
        nested: dict[str, Any] = {"url": "http://example.org/x"}
        innermost["extension"] = [nested]
        innermost = nested
    innermost["valueString"] = "deep"
    parsed = as_parsed(body)
    depth, element = 0, parsed
    while "extension" in element:
        element, depth = element["extension"][0], depth + 1
    assert (depth, element.get("valueString")) == (2_000, "deep")
