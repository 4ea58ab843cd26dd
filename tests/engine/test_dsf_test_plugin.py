"""The DSF BPE's own v2 test plugin (``dsfdev_test``): one branch per test activity, each
exercising a feature the Java BPE tests (field injection, catch-all error boundaries, send and
continue, parallel user task), on the real runtime through the test harness."""

from __future__ import annotations

import pytest

from dsf_bridge.plugins.registry import BpmnError, HandlerContext, HandlerRegistry, SendContext
from dsf_bridge.runtime.testing import ProcessHarness
from tests.engine.corpus import load_reference

TEST_PLUGIN = "dsf/dsf-bpe/dsf-bpe-test-plugin-v2/src/main/resources/bpe/test.bpmn"
SERVICE = "dev.dsf.bpe.test.service."


def _harness(seen: dict[str, object]) -> ProcessHarness:
    handlers = HandlerRegistry()

    @handlers.service(SERVICE + "TestActivitySelector")
    def select(ctx: HandlerContext) -> None:
        ctx.set("testActivity", ctx.get("activity"))

    @handlers.listener("dev.dsf.bpe.test.listener.StartFieldInjectionTestListener")
    def start_field_injection(ctx: HandlerContext) -> None:
        ctx.set("testVariable", ctx.fields["testVariable"])
        ctx.set("intVariable", 42)

    @handlers.service(SERVICE + "FieldInjectionTest")
    def field_injection(ctx: HandlerContext) -> None:
        seen["fields"] = dict(ctx.fields)

    @handlers.service(SERVICE + "ErrorBoundaryEventTestThrow")
    def throw(_: HandlerContext) -> None:
        raise BpmnError("test-error", "thrown on purpose")

    @handlers.service(SERVICE + "ErrorBoundaryEventTestVerify")
    def verify(ctx: HandlerContext) -> None:
        seen["error"] = (ctx.get("errorCodeVariable"), ctx.get("errorMessageVariable"))

    handlers.register(SERVICE + "ContinueSendTest", "service", lambda ctx: None)

    @handlers.message_send("dev.dsf.bpe.test.message.ContinueSendTestSend")
    def continue_send(ctx: SendContext) -> None:
        seen["sent"] = ctx.message_name

    @handlers.service(SERVICE + "ContinueSendTestEvaluate")
    def evaluate(ctx: HandlerContext) -> None:
        seen["result"] = ctx.get("result")

    @handlers.listener("dev.dsf.bpe.test.listener.StartSendTaskTestListener")
    def start_send_task(ctx: HandlerContext) -> None:
        ctx.set("testVariable", "http://dsf.dev/fhir/StructureDefinition/task-test|1.0")

    @handlers.message_send("dev.dsf.bpe.test.message.SendTaskTest")
    def send_task(ctx: SendContext) -> None:
        seen["profile"] = ctx.profile

    @handlers.service(SERVICE + "QuestionnaireTestAnswer")
    def answer(ctx: HandlerContext) -> None:
        seen["answered"] = True

    @handlers.service(SERVICE + "QuestionnaireTestAnswerCheck")
    def check(ctx: HandlerContext) -> None:
        seen["answer"] = ctx.get("answer")

    definition = load_reference(TEST_PLUGIN)
    return ProcessHarness([definition], handlers, stub_missing=True)


async def test_field_injection_with_strings_and_expressions() -> None:
    seen: dict[str, object] = {}
    async with _harness(seen) as harness:
        instance = await harness.start(
            "dsfdev_test", "start", business_key="f", variables={"activity": "FieldInjectionTest"}
        )
        assert seen["fields"] == {
            "stringField": "stringFieldValue",
            "stringFieldFromExpression": "testVariableValue",
            "intField": 42,
        }
        assert instance.status == "completed"


async def test_catch_all_error_boundary_sets_code_and_message() -> None:
    seen: dict[str, object] = {}
    async with _harness(seen) as harness:
        instance = await harness.start(
            "dsfdev_test",
            "start",
            business_key="e",
            variables={"activity": "ErrorBoundaryEventTest"},
        )
        assert seen["error"] == ("test-error", "thrown on purpose")
        assert instance.status == "completed"


async def test_send_task_profile_from_expression() -> None:
    seen: dict[str, object] = {}
    async with _harness(seen) as harness:
        await harness.start(
            "dsfdev_test", "start", business_key="s", variables={"activity": "SendTaskTest"}
        )
        assert seen["profile"] == "http://dsf.dev/fhir/StructureDefinition/task-test|1.0"
        assert harness.sent[0].instantiates_canonical == "instantiatesCanonicalValue"


@pytest.mark.parametrize(("reply", "result"), [(True, "received"), (False, "timeout")])
async def test_continue_send_receives_or_times_out(reply: bool, result: str) -> None:
    seen: dict[str, object] = {}
    async with _harness(seen) as harness:
        instance = await harness.start(
            "dsfdev_test", "start", business_key="c", variables={"activity": "ContinueSendTest"}
        )
        assert seen["sent"] == "continue-send-test"
        if reply:
            await harness.message("continue-send-test", business_key="c")
        else:
            await harness.advance(60)
        assert seen["result"] == result
        assert instance.status == "completed"


async def test_questionnaire_branch_joins_user_task_and_answer() -> None:
    seen: dict[str, object] = {}
    async with _harness(seen) as harness:
        instance = await harness.start(
            "dsfdev_test", "start", business_key="q", variables={"activity": "QuestionnaireTest"}
        )
        assert seen["answered"] is True
        assert [task.element_id for task in harness.user_tasks] == ["QuestionnaireTest"]
        assert instance.status == "running"
        await harness.complete_user_task("QuestionnaireTest", {"answer": "42"})
        assert seen["answer"] == "42"
        assert instance.status == "completed"
