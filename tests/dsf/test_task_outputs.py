"""A finished Task's outputs (``dsf.tasks.with_outputs``): added after those it has, never
twice, and the Task they were added to (the in-progress copy the gateway remembers) unchanged."""

from __future__ import annotations

import copy
import datetime as dt

from dsf_bridge.dsf.tasks import build_task, updated_task, with_outputs


def _output(text: str) -> dict[str, object]:
    return {
        "type": {"coding": [{"system": "http://example.org/cs", "code": "c"}]},
        "valueString": text,
    }


def test_outputs_are_added_once_after_the_tasks_own_and_the_task_is_left_as_it_was() -> None:
    task = build_task(
        instantiates_canonical="http://example.org/bpe/Process/p|1.0",
        message_name="start",
        profile="http://example.org/fhir/StructureDefinition/task-p|1.0",
        business_key="bk",
        correlation_key=None,
        requester="a.example.org",
        recipient="b.example.org",
        authored_on=dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
    )
    task["output"] = [_output("there before")]
    before = copy.deepcopy(task)
    added = [_output("first"), _output("there before"), _output("second")]
    added_before = copy.deepcopy(added)
    finished = updated_task(with_outputs(task, added), status="completed")
    assert [o["valueString"] for o in finished["output"]] == ["there before", "first", "second"]
    assert finished["status"] == "completed"
    assert task == before  # nothing of the remembered Task changed
    again = with_outputs(finished, added)  # a PUT retried after a crash: the same Task
    assert again["output"] == finished["output"]
    assert task == before
    assert added == added_before


def test_an_output_that_is_no_list_is_replaced_by_the_outputs_added() -> None:
    hostile = {"resourceType": "Task", "id": "t", "status": "in-progress", "output": {"a": 1}}
    assert with_outputs(hostile, [_output("x")])["output"] == [_output("x")]
    assert with_outputs(hostile, [])["output"] == {"a": 1}  # nothing added: left as it was
