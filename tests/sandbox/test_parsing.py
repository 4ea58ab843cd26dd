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


@pytest.mark.parametrize(
    "body",
    [[1], "Task", {"resourceType": 3}, {"input": []}, {"resourceType": "Coding"}],
)
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


def _nested(levels: int) -> dict[str, Any]:
    """A Task whose extensions nest ``levels`` deep (two JSON levels each)."""
    body: dict[str, Any] = {"resourceType": "Task"}
    innermost = body
    for _ in range(levels):
        nested: dict[str, Any] = {"url": "http://example.org/x"}
        innermost["extension"] = [nested]
        innermost = nested
    innermost["valueString"] = "deep"
    return body


def test_nesting_up_to_jacksons_limit_is_read_without_recursion() -> None:
    """Jackson (under HAPI) reads 1,000 levels; reading them must not exhaust Python's stack
    (the bridge's own bounds then refuse such a Task)."""
    parsed = as_parsed(_nested(495))  # 991 JSON levels
    depth, element = 0, parsed
    while "extension" in element:
        element, depth = element["extension"][0], depth + 1
    assert (depth, element.get("valueString")) == (495, "deep")


def test_nesting_beyond_jacksons_limit_is_unparsable() -> None:
    with pytest.raises(UnparsableBodyError, match="deeper than 1000 levels"):
        as_parsed(_nested(600))


def test_a_lone_value_of_a_repeating_element_is_a_list_and_a_list_of_a_single_one_its_last() -> (
    None
):
    body = {
        "resourceType": "Task",
        "meta": {"profile": "http://example.org/p"},
        "input": {"type": {"text": "t"}, "valueString": "v"},
        "requester": [{"display": "first"}, {"display": "last"}],
    }
    parsed = as_parsed(body)
    assert parsed["meta"] == {"profile": ["http://example.org/p"]}
    assert parsed["input"] == [{"type": {"text": "t"}, "valueString": "v"}]
    assert parsed["requester"] == {"display": "last"}


def test_a_nested_resource_without_a_known_type_makes_the_body_unparsable() -> None:
    for entry in ({"resource": {"id": "x"}}, {"resource": {"resourceType": "Coding"}}):
        with pytest.raises(UnparsableBodyError, match="unknown resourceType"):
            as_parsed({"resourceType": "Bundle", "type": "batch", "entry": [entry]})


def test_primitive_extensions_keep_their_positions() -> None:
    body = {
        "resourceType": "Patient",
        "name": [{"given": [None, "b"], "_given": [{"extension": [{"url": "u"}]}, None]}],
        "_gender": {"extension": [{"url": "v"}]},
    }
    assert as_parsed(body) == body


@pytest.mark.parametrize("levels", [150, 450])
def test_a_task_nested_deeply_is_refused_not_a_server_error(levels: int) -> None:
    """Below Jackson's limit the sandbox's validator may still run out of Python's stack:
    403, stricter than DSF (documented), never a 500."""
    dsf = DsfIntegration.start(DSF_2)
    created = _task_in_progress(dsf)
    body = {**created, "extension": _nested(levels)["extension"]}
    # Straight to the service: the fixture's own deepcopy would hit Python's limit first.
    response = dsf.service.handle(
        dsf.identity(LOCAL), "PUT", f"Task/{created['id']}", [], headers={}, body=body
    )
    assert response.status != 500
    if response.status != 200:
        assert response.status == 403, response.resource
