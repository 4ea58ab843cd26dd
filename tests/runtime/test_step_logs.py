"""What the log says of a step, on the production runtime (the harness): a raising handler is an
error record with its traceback and a Task error that says where; every record of a step, the
handler's own lines included, carries the step's context; an incident is an error record."""

from __future__ import annotations

import inspect
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from dsf_bridge.engine import load_process
from dsf_bridge.errors import ProcessExecutionError
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry, SendContext
from dsf_bridge.runtime.intake import task_variables
from dsf_bridge.runtime.testing import ProcessHarness
from tests.components import json_logs
from tests.engine.bpmn import START, model

ONE_TASK = model(
    START + '<bpmn:serviceTask id="Work" camunda:class="org.test.Work"/>'
    '<bpmn:endEvent id="e"/><bpmn:sequenceFlow id="f1" sourceRef="s" targetRef="Work"/>'
    '<bpmn:sequenceFlow id="f2" sourceRef="Work" targetRef="e"/>'
)
PATIENT = "Doe^Jane"


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Every log line of the test, as JSON lines."""
    with json_logs("debug") as out:
        yield out


def _records(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _line_of(function: Any, text: str) -> int:
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


def _start_task(task_id: str) -> dict[str, object]:
    return task_variables({"resourceType": "Task", "id": task_id, "input": []})


async def test_a_raising_handler_logs_an_error_with_its_traceback_and_the_task_says_where(
    logs: io.StringIO,
) -> None:
    registry = HandlerRegistry()

    @registry.service("org.test.Work")
    def work(ctx: HandlerContext) -> None:
        names = {"a": PATIENT}
        ctx.set("name", names["b"])

    async with ProcessHarness([ONE_TASK], registry) as harness:
        instance = await harness.start(
            "testorg_test",
            "start",
            business_key="bk-1",
            variables=_start_task("task-1"),
            task_id="task-1",
        )
        assert instance.status == "failed"

    where = f"tests/runtime/test_step_logs.py:{_line_of(work, 'names[')}"
    assert harness.task_status["task-1"] == (
        "failed: Process testorg_test has fatal error in step Work, reason: KeyError in handler "
        f"org.test.Work at element Work, {where}"
    )
    (failed,) = [r for r in _records(logs) if r["event"] == "handler.failed"]
    assert failed["level"] == "error"
    assert failed["error_type"] == "KeyError"
    assert failed["error"] == "'b'"  # the message: in the local log, not on the Task
    assert failed["location"] == where
    assert failed["handler"] == "org.test.Work"
    assert failed["exception"].startswith("Traceback (most recent call last):")
    line = where.rsplit(":", 1)[1]
    assert f'test_step_logs.py", line {line}, in work' in failed["exception"]
    assert failed["exception"].rstrip().endswith("KeyError: 'b'")
    for key, value in {
        "process": "testorg_test",
        "process_version": "1.0",
        "instance_id": instance.id,
        "business_key": "bk-1",
        "task_id": "task-1",
        "element_id": "Work",
    }.items():
        assert failed[key] == value, key
    (ended,) = [r for r in _records(logs) if r["event"] == "instance.failed"]
    assert ended["level"] == "error"
    assert ended["error"] == harness.task_status["task-1"].removeprefix("failed: ")
    assert PATIENT not in harness.task_status["task-1"]


async def test_the_location_is_the_handlers_line_not_the_library_that_raised(
    logs: io.StringIO,
) -> None:
    registry = HandlerRegistry()

    @registry.service("org.test.Work")
    def work(ctx: HandlerContext) -> None:
        ctx.set("parsed", json.loads("{not json"))

    async with ProcessHarness([ONE_TASK], registry) as harness:
        await harness.start("testorg_test", "start", business_key="bk-2", task_id="task-2")

    where = f"tests/runtime/test_step_logs.py:{_line_of(work, 'json.loads')}"
    status = harness.task_status["task-2"]
    assert status.endswith(
        f"reason: json.decoder.JSONDecodeError in handler org.test.Work at element Work, {where}"
    )
    (failed,) = [r for r in _records(logs) if r["event"] == "handler.failed"]
    assert "json/decoder.py" in failed["exception"]  # the whole traceback is in the log


async def test_the_bridges_own_error_keeps_its_message_on_the_task(logs: io.StringIO) -> None:
    registry = HandlerRegistry()

    @registry.service("org.test.Work")
    def work(ctx: HandlerContext) -> None:
        raise ProcessExecutionError("the archive refused the study")

    async with ProcessHarness([ONE_TASK], registry) as harness:
        await harness.start("testorg_test", "start", business_key="bk-3", task_id="task-3")

    assert (
        "reason: the archive refused the study (dsf_bridge.errors.ProcessExecutionError) "
        in (harness.task_status["task-3"])
    )


async def test_every_record_of_a_step_carries_its_context(logs: io.StringIO) -> None:
    registry = HandlerRegistry()
    handler_log = structlog.get_logger("my_plugin")

    @registry.service("org.test.Work")
    async def work(ctx: HandlerContext) -> None:
        handler_log.info("my_plugin.worked")
        logging.getLogger("my_plugin.stdlib").warning("plain %s", "logging")

    async with ProcessHarness([ONE_TASK], registry) as harness:
        complete = harness.gateway.complete_task

        async def completing(task_id: str, **kwargs: Any) -> None:
            # The gateway logs the Task it completes (after the step, from the outbox).
            handler_log.info("gateway.completing")
            await complete(task_id, **kwargs)

        harness.gateway.complete_task = completing  # type: ignore[method-assign]
        instance = await harness.start(
            "testorg_test",
            "start",
            business_key="bk-4",
            variables=_start_task("task-4"),
            task_id="task-4",
        )
        assert instance.status == "completed"

    records = _records(logs)
    context = {
        "process": "testorg_test",
        "process_version": "1.0",
        "instance_id": instance.id,
        "business_key": "bk-4",
        "task_id": "task-4",
    }
    own = [r for r in records if r["event"] in ("my_plugin.worked", "plain logging")]
    assert len(own) == 2
    for record in own:
        assert {key: record.get(key) for key in context} == context, record["event"]
        assert record["element_id"] == "Work"
    stepped = [r for r in records if r["event"] == "instance.stepped"]
    assert len(stepped) == 2  # the start, and the handler's step that completes it
    for record in stepped:
        assert {key: record.get(key) for key in context} == context
    (finish,) = [r for r in records if r["event"] == "gateway.completing"]
    assert (finish["instance_id"], finish["task_id"]) == (instance.id, "task-4")


async def test_an_incident_is_an_error_record_with_element_and_message(
    logs: io.StringIO,
) -> None:
    definition = model(
        START + '<bpmn:serviceTask id="Work" camunda:class="org.test.Work" '
        'camunda:asyncBefore="true"><bpmn:extensionElements><camunda:failedJobRetryTimeCycle>'
        "R0/PT5S</camunda:failedJobRetryTimeCycle><camunda:inputOutput>"
        '<camunda:inputParameter name="x">${missing}</camunda:inputParameter>'
        "</camunda:inputOutput></bpmn:extensionElements></bpmn:serviceTask>"
        '<bpmn:endEvent id="e"/><bpmn:sequenceFlow id="f1" sourceRef="s" targetRef="Work"/>'
        '<bpmn:sequenceFlow id="f2" sourceRef="Work" targetRef="e"/>'
    )
    registry = HandlerRegistry()

    @registry.service("org.test.Work")
    def work(ctx: HandlerContext) -> None:
        pass

    async with ProcessHarness([definition], registry) as harness:
        instance = await harness.start(
            "testorg_test",
            "start",
            business_key="bk-5",
            variables=_start_task("task-5"),
            task_id="task-5",
        )
        await harness.advance(60)
        (incident,) = instance.incidents

    (record,) = [r for r in _records(logs) if r["event"] == "incident.created"]
    assert record["level"] == "error"
    assert record["element_id"] == "Work"
    assert record["error"] == incident.message
    assert "missing" in record["error"]
    assert record["instance_id"] == instance.id
    assert record["process"] == "testorg_test"
    assert record["business_key"] == "bk-5"


async def test_an_expression_that_fails_the_instance_is_an_error_record(
    logs: io.StringIO,
) -> None:
    definition = model(
        START + '<bpmn:serviceTask id="Work" camunda:class="org.test.Work">'
        "<bpmn:extensionElements><camunda:inputOutput>"
        '<camunda:inputParameter name="x">${missing}</camunda:inputParameter>'
        "</camunda:inputOutput></bpmn:extensionElements></bpmn:serviceTask>"
        '<bpmn:endEvent id="e"/><bpmn:sequenceFlow id="f1" sourceRef="s" targetRef="Work"/>'
        '<bpmn:sequenceFlow id="f2" sourceRef="Work" targetRef="e"/>'
    )
    registry = HandlerRegistry()

    @registry.service("org.test.Work")
    def work(ctx: HandlerContext) -> None:
        pass

    async with ProcessHarness([definition], registry) as harness:
        instance = await harness.start(
            "testorg_test",
            "start",
            business_key="bk-6",
            variables=_start_task("task-6"),
            task_id="task-6",
        )
        assert instance.status == "failed"

    (record,) = [r for r in _records(logs) if r["event"] == "instance.failed"]
    assert record["level"] == "error"
    assert "missing" in record["error"]
    assert record["error"] == harness.task_status["task-6"].removeprefix("failed: ")
    assert (record["process"], record["task_id"], record["instance_id"]) == (
        "testorg_test",
        "task-6",
        instance.id,
    )


async def test_a_raising_send_handler_fails_the_task_saying_where(logs: io.StringIO) -> None:
    model_file = Path(__file__).with_name("request_reply.bpmn")
    definition = load_process(model_file.read_bytes(), model_file.name, resource_version="1.0")
    registry = HandlerRegistry()
    for name in ("org.test.Prepare", "org.test.StoreResult", "org.test.HandleTimeout"):
        registry.service(name)(lambda ctx: None)

    @registry.message_send("org.test.SendRequest")
    def send_request(ctx: SendContext) -> None:
        ctx.add_input("http://test.org/fhir/CodeSystem/omi", "study", int(str(PATIENT)))

    async with ProcessHarness([definition], registry) as harness:
        instance = await harness.start(
            "testorg_requestReply",
            "start",
            business_key="bk-7",
            variables=_start_task("task-7"),
            task_id="task-7",
        )
        await harness.advance(1)
        assert instance.status == "failed"
        assert harness.sent == []

    where = f"tests/runtime/test_step_logs.py:{_line_of(send_request, 'int(str(PATIENT))')}"
    # DSF fails the Tasks with the send's own text: here what and where, without the message.
    assert harness.task_status["task-7"] == (
        f"failed: ValueError in handler org.test.SendRequest at element SendRequest, {where}"
    )
    (failed,) = [r for r in _records(logs) if r["event"] == "handler.failed"]
    assert (failed["level"], failed["element_id"], failed["task_id"]) == (
        "error",
        "SendRequest",
        "task-7",
    )
    assert PATIENT in failed["error"]  # the message is the site's own log's
    assert failed["exception"].rstrip().endswith(failed["error"])


async def test_a_handler_object_is_located_at_its_call(logs: io.StringIO) -> None:
    class Work:
        def __call__(self, ctx: HandlerContext) -> None:
            names = {"a": PATIENT}
            ctx.set("name", names["b"])

    registry = HandlerRegistry()
    registry.service("org.test.Work")(Work())

    async with ProcessHarness([ONE_TASK], registry) as harness:
        await harness.start("testorg_test", "start", business_key="bk-8", task_id="task-8")

    where = f"tests/runtime/test_step_logs.py:{_line_of(Work.__call__, 'names[')}"
    assert harness.task_status["task-8"].endswith(
        f"reason: KeyError in handler org.test.Work at element Work, {where}"
    )
