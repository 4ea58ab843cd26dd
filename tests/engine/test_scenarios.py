"""One scenario per reference process, with stub handlers under the Java class names the models
use, run by the test harness: the real runtime over an in-memory store, so every state is
written to SQL and read back after every step, which is what a restart between any two steps
looks like.
"""

from __future__ import annotations

import json

import pytest

from dsf_bridge.engine import CorrelationError
from dsf_bridge.plugins.registry import (
    BpmnError,
    HandlerContext,
    HandlerRegistry,
    SendContext,
)
from dsf_bridge.runtime.testing import ProcessHarness
from tests.engine.corpus import PING_PONG, load_reference

HELLO_WORLD = "dsf-process-hello-world/src/main/resources/bpe/"
TUTORIAL = "dsf-process-tutorial/solutions-exercise-7/tutorial-process/src/main/resources/bpe/"
DATA_TRANSFER = "mii-process-data-transfer/src/main/resources/bpe/"
MII = "de.medizininformatik_initiative.process.data_transfer."


def _target(index: int) -> dict[str, object]:
    return {
        "organizationIdentifier": f"org{index}.example.org",
        "endpointIdentifier": f"endpoint{index}",
        "endpointAddress": f"https://org{index}.example.org/fhir",
        "correlationKey": f"ck-{index}",
    }


def _noop(_: HandlerContext) -> None:
    return None


def _registry(*names: str) -> HandlerRegistry:
    registry = HandlerRegistry()
    for name in names:
        registry.register(name, "service", _noop)
    return registry


# -- ping / pong ----------------------------------------------------------------------------


def _ping_handlers() -> HandlerRegistry:
    handlers = _registry(
        "dev.dsf.bpe.service.LogPong",
        "dev.dsf.bpe.service.LogNoResponse",
        "dev.dsf.bpe.service.LogSendError",
    )

    @handlers.service("dev.dsf.bpe.service.SelectPingTargets")
    def select_targets(ctx: HandlerContext) -> None:
        ctx.set("targets", {"entries": [_target(1), _target(2), _target(3)]})

    @handlers.listener("dev.dsf.bpe.listener.SetCorrelationKeyListener")
    def set_correlation_key(ctx: HandlerContext) -> None:
        target = ctx.get("target")
        assert isinstance(target, dict)
        ctx.set_local("correlationKey", target["correlationKey"])

    @handlers.message_send("dev.dsf.bpe.message.SendPing")
    def send_ping(ctx: SendContext) -> None:
        ctx.add_input("http://dsf.dev/fhir/CodeSystem/ping", "endpoint-identifier", "local")

    @handlers.service("dev.dsf.bpe.service.SaveResults")
    def save_results(ctx: HandlerContext) -> None:
        ctx.set("saved", True)

    return handlers


async def test_ping_multi_instance_one_pong_two_timeouts() -> None:
    ping = load_reference(PING_PONG + "ping.bpmn")
    async with ProcessHarness([ping], _ping_handlers()) as harness:
        instance = await harness.start("dsfdev_ping", "startPing", business_key="bk-ping")

        assert instance.status == "running"
        assert [task.correlation_key for task in harness.sent] == ["ck-1", "ck-2", "ck-3"]
        assert {task.instantiates_canonical for task in harness.sent} == {
            "http://dsf.dev/bpe/Process/pong|1.0"
        }
        assert harness.sent[0].profile == "http://dsf.dev/fhir/StructureDefinition/task-ping|1.0"
        assert harness.sent[0].message_name == "ping"
        assert harness.sent[0].inputs[0]["code"] == "endpoint-identifier"
        assert await harness.open_timers() == 3
        # Three executions wait for "pong": without a correlation key the Task is ambiguous.
        with pytest.raises(CorrelationError, match="Unable to correlate Task t-x: 3 waiting"):
            await harness.message("pong", business_key="bk-ping", task_id="t-x")
        with pytest.raises(CorrelationError, match="0 waiting"):
            await harness.message("pong", business_key="bk-ping", correlation_key="ck-unknown")

        await harness.message("pong", business_key="bk-ping", correlation_key="ck-2")

        assert harness.handler_calls("dev.dsf.bpe.service.LogPong") == 1
        assert await harness.open_timers() == 2
        assert instance.status == "running"
        await harness.advance(19)
        assert harness.handler_calls("dev.dsf.bpe.service.LogNoResponse") == 0
        await harness.advance(2)
        assert harness.handler_calls("dev.dsf.bpe.service.LogNoResponse") == 2
        assert harness.handler_calls("dev.dsf.bpe.service.SaveResults") == 1
        assert instance.status == "completed"
        assert instance.variables["saved"] is True
        assert harness.task_status["bk-ping"] == "completed"
        assert await harness.open_timers() == 0
        # The pong of a finished execution no longer correlates.
        with pytest.raises(CorrelationError):
            await harness.message("pong", business_key="bk-ping", correlation_key="ck-2")


async def test_ping_send_error_takes_the_error_path() -> None:
    handlers = _ping_handlers()
    failing = HandlerRegistry()
    for name in handlers.names():
        registered = handlers.get(name)
        assert registered is not None
        if name != "dev.dsf.bpe.message.SendPing":
            failing.register(name, registered.kind, registered.function)

    @failing.message_send("dev.dsf.bpe.message.SendPing")
    def unreachable(ctx: SendContext) -> None:
        ctx.set_local("statusCode", "not-reachable")

    async with ProcessHarness([load_reference(PING_PONG + "ping.bpmn")], failing) as harness:
        instance = await harness.start("dsfdev_ping", "startPing", business_key="bk")

        assert harness.handler_calls("dev.dsf.bpe.service.LogSendError") == 3
        assert harness.handler_calls("dev.dsf.bpe.listener.SetCorrelationKeyListener") == 0
        assert instance.status == "completed"
        assert await harness.open_timers() == 0


async def test_pong_replies_to_the_ping_with_its_correlation_key() -> None:
    pong = load_reference(PING_PONG + "pong.bpmn")
    handlers = _registry("dev.dsf.bpe.service.LogPing")

    @handlers.service("dev.dsf.bpe.service.SelectPongTarget")
    def select_target(ctx: HandlerContext) -> None:
        ctx.set("target", _target(7))

    handlers.register("dev.dsf.bpe.message.SendPong", "message_send", _noop)
    async with ProcessHarness([pong], handlers) as harness:
        instance = await harness.start("dsfdev_pong", "ping", business_key="bk-remote")

        assert instance.status == "completed"
        assert len(harness.sent) == 1
        assert harness.sent[0].message_name == "pong"
        assert harness.sent[0].correlation_key == "ck-7"
        assert harness.sent[0].instantiates_canonical == "http://dsf.dev/bpe/Process/ping|1.0"


async def test_pong_target_not_allowed_ends_through_error_boundary() -> None:
    handlers = _registry("dev.dsf.bpe.service.LogPing", "dev.dsf.bpe.message.SendPong")

    @handlers.service("dev.dsf.bpe.service.SelectPongTarget")
    def refuse(_: HandlerContext) -> None:
        raise BpmnError("target_not_allowed")

    async with ProcessHarness([load_reference(PING_PONG + "pong.bpmn")], handlers) as harness:
        instance = await harness.start("dsfdev_pong", "ping", business_key="bk")

        assert instance.status == "completed"
        assert harness.sent == []


async def test_ping_autostart_loops_until_stopped_by_signal() -> None:
    autostart = load_reference(PING_PONG + "ping-autostart.bpmn")
    handlers = _registry("dev.dsf.bpe.message.SendStartPing")

    @handlers.service("dev.dsf.bpe.service.SetTargetAndConfigureTimer")
    def configure(ctx: HandlerContext) -> None:
        ctx.set("timerInterval", "PT10M")
        ctx.set("target", _target(0))

    async with ProcessHarness([autostart], handlers) as harness:
        instance = await harness.start(
            "dsfdev_pingAutostart", "startPingAutostart", business_key="auto"
        )

        # Starting broadcasts the stop signal for older instances, then sends the first startPing.
        assert harness.signals == ["stop_dsfdev_pingAutostart_1.0"]
        assert len(harness.sent) == 1
        await harness.advance(600)
        assert len(harness.sent) == 2
        await harness.advance(600)
        assert len(harness.sent) == 3
        assert instance.status == "running"

        await harness.signal("stop_dsfdev_pingAutostart_1.0")

        assert instance.status == "completed"
        assert instance.variables["stop"] == "yes"
        assert await harness.open_timers() == 0
        await harness.advance(3600)
        assert len(harness.sent) == 3


async def test_ping_autostart_stop_message_throws_the_signal() -> None:
    autostart = load_reference(PING_PONG + "ping-autostart.bpmn")
    # Deployment needs every handler the model names (as DSF's plugin loader); none runs here.
    handlers = _registry(
        "dev.dsf.bpe.message.SendStartPing", "dev.dsf.bpe.service.SetTargetAndConfigureTimer"
    )
    async with ProcessHarness([autostart], handlers) as harness:
        instance = await harness.start(
            "dsfdev_pingAutostart", "stopPingAutostart", business_key="stop"
        )

        assert instance.status == "completed"
        assert harness.signals == ["stop_dsfdev_pingAutostart_1.0"]


# -- hello world / hello user ---------------------------------------------------------------


async def test_hello_world() -> None:
    hello = load_reference(HELLO_WORLD + "hello-world.bpmn")
    seen: list[str] = []
    handlers = HandlerRegistry()

    @handlers.service("dev.dsf.bpe.service.HelloWorld")
    def hello_world(ctx: HandlerContext) -> None:
        seen.append(ctx.business_key)

    async with ProcessHarness([hello], handlers) as harness:
        instance = await harness.start("dsfdev_helloWorld", "helloWorld", business_key="bk-hello")

        assert seen == ["bk-hello"]
        assert instance.status == "completed"


async def test_hello_user_waits_for_the_questionnaire_response() -> None:
    hello_user = load_reference(HELLO_WORLD + "hello-user.bpmn")
    answers: list[object] = []
    handlers = HandlerRegistry()

    @handlers.service("dev.dsf.bpe.service.LogUserTaskResponse")
    def log_response(ctx: HandlerContext) -> None:
        answers.append(ctx.get("answer"))

    async with ProcessHarness([hello_user], handlers) as harness:
        instance = await harness.start("dsfdev_helloUser", "helloUser", business_key="bk-user")

        assert instance.status == "running"
        assert [task.form_key for task in harness.user_tasks] == [
            "http://dsf.dev/fhir/Questionnaire/hello-user|1.0"
        ]
        assert answers == []

        await harness.complete_user_task("userTask", {"answer": "hello"})

        assert answers == ["hello"]
        assert instance.status == "completed"


# -- the tutorial: dic -> cos -> hrp -> dic -------------------------------------------------


async def test_tutorial_dic_cos_hrp_round_trip() -> None:
    dic = load_reference(TUTORIAL + "dic-process.bpmn")
    cos = load_reference(TUTORIAL + "cos-process.bpmn")
    hrp = load_reference(TUTORIAL + "hrp-process.bpmn")
    handlers = _registry(
        "org.tutorial.process.tutorial.service.CosTask",
        "org.tutorial.process.tutorial.message.HelloCosMessage",
        "org.tutorial.process.tutorial.message.HelloHrpMessage",
        "org.tutorial.process.tutorial.message.GoodbyeDicMessage",
    )

    @handlers.service("org.tutorial.process.tutorial.service.DicTask")
    def dic_task(ctx: HandlerContext) -> None:
        ctx.set("stop", False)

    @handlers.service("org.tutorial.process.tutorial.service.HrpTask")
    def hrp_task(ctx: HandlerContext) -> None:
        ctx.set("sendResponse", True)

    async with ProcessHarness([dic, cos, hrp], handlers) as harness:
        at_dic = await harness.start(
            "exampleorg_dicProcess", "startDicProcess", business_key="bk-t"
        )
        assert [task.message_name for task in harness.sent] == ["helloCos"]
        assert await harness.open_timers() == 1

        # The Tasks travel between sites: start the next process with what was sent.
        at_cos = await harness.start("exampleorg_cosProcess", "helloCos", business_key="bk-t")
        assert at_cos.status == "completed"
        assert harness.sent[-1].message_name == "helloHrp"
        at_hrp = await harness.start("exampleorg_hrpProcess", "helloHrp", business_key="bk-t")
        assert at_hrp.status == "completed"
        assert harness.sent[-1].message_name == "goodbyeDic"
        assert (
            harness.sent[-1].instantiates_canonical
            == "http://example.org/bpe/Process/dicProcess|1.0"
        )

        await harness.message("goodbyeDic", business_key="bk-t")

        assert at_dic.status == "completed"
        assert await harness.open_timers() == 0


async def test_tutorial_dic_times_out_without_goodbye() -> None:
    dic = load_reference(TUTORIAL + "dic-process.bpmn")
    handlers = _registry("org.tutorial.process.tutorial.message.HelloCosMessage")

    @handlers.service("org.tutorial.process.tutorial.service.DicTask")
    def dic_task(ctx: HandlerContext) -> None:
        ctx.set("stop", False)

    async with ProcessHarness([dic], handlers) as harness:
        instance = await harness.start(
            "exampleorg_dicProcess", "startDicProcess", business_key="bk"
        )
        await harness.advance(119)
        assert instance.status == "running"
        await harness.advance(1)
        assert instance.status == "completed"


async def test_tutorial_hrp_without_response_sends_nothing() -> None:
    hrp = load_reference(TUTORIAL + "hrp-process.bpmn")
    handlers = _registry("org.tutorial.process.tutorial.message.GoodbyeDicMessage")

    @handlers.service("org.tutorial.process.tutorial.service.HrpTask")
    def hrp_task(ctx: HandlerContext) -> None:
        ctx.set("sendResponse", False)

    async with ProcessHarness([hrp], handlers) as harness:
        instance = await harness.start("exampleorg_hrpProcess", "helloHrp", business_key="bk")
        assert instance.status == "completed"
        assert harness.sent == []


# -- MII data transfer ----------------------------------------------------------------------


def _send_handlers(*, fail_send: bool) -> HandlerRegistry:
    handlers = _registry(
        *(
            MII + "service." + name
            for name in (
                "ReadData",
                "ValidateDataDic",
                "CreateBundle",
                "EncryptData",
                "StoreData",
                "StoreReceipt",
                "DeleteData",
            )
        )
    )

    @handlers.message_send(MII + "message.SendData")
    def send_data(ctx: SendContext) -> None:
        if fail_send:
            raise BpmnError("dataSendError", "DMS not reachable")

    @handlers.service(MII + "service.HandleErrorSend")
    def handle_error(ctx: HandlerContext) -> None:
        ctx.set("handledError", ctx.get("dataSendError"))

    return handlers


async def test_data_transfer_send_error_boundary_taken() -> None:
    send = load_reference(DATA_TRANSFER + "send.bpmn")
    async with ProcessHarness([send], _send_handlers(fail_send=True)) as harness:
        instance = await harness.start(
            "medizininformatik-initiativede_dataSend", "dataSendStart", business_key="bk-send"
        )

        assert harness.sent == []
        assert instance.variables["handledError"] == "dataSendError"
        assert harness.handler_calls(MII + "service.StoreReceipt") == 1
        assert harness.handler_calls(MII + "service.DeleteData") == 1
        assert instance.status == "completed"


async def test_data_transfer_send_receives_the_receipt() -> None:
    send = load_reference(DATA_TRANSFER + "send.bpmn")
    async with ProcessHarness([send], _send_handlers(fail_send=False)) as harness:
        instance = await harness.start(
            "medizininformatik-initiativede_dataSend", "dataSendStart", business_key="bk-send"
        )
        assert [task.message_name for task in harness.sent] == ["dataSend"]
        assert instance.status == "running"

        await harness.message("dataStatus", business_key="bk-send")

        assert instance.status == "completed"
        assert harness.handler_calls(MII + "service.HandleErrorSend") == 0
        assert await harness.open_timers() == 0


async def test_data_transfer_receive() -> None:
    receive = load_reference(DATA_TRANSFER + "receive.bpmn")
    handlers = _registry(
        *(
            MII + "service." + name
            for name in (
                "DownloadData",
                "ValidateDataDms",
                "InsertData",
                "SelectTargetDic",
                "HandleErrorReceive",
            )
        ),
        MII + "message.SendReceipt",
    )

    @handlers.service(MII + "service.DecryptData")
    def decrypt(_: HandlerContext) -> None:
        raise BpmnError("dataReceiveError", "cannot decrypt")

    async with ProcessHarness([receive], handlers) as harness:
        instance = await harness.start(
            "medizininformatik-initiativede_dataReceive", "dataSend", business_key="bk-recv"
        )

        assert instance.status == "completed"
        assert harness.handler_calls(MII + "service.HandleErrorReceive") == 1
        assert harness.handler_calls(MII + "service.ValidateDataDms") == 0
        assert [task.message_name for task in harness.sent] == ["dataStatus"]
        assert instance.variables["dataReceiveError"] == "dataReceiveError"


# -- the tutorial's voting (exercise 7): multi-instance with correlation keys, user task ------


def _voting_handlers() -> HandlerRegistry:
    tutorial = "org.tutorial.process.tutorial."
    handlers = _registry(tutorial + "message.StartVote", tutorial + "message.ReturnVote")

    @handlers.service(tutorial + "service.SelectTargets")
    def select(ctx: HandlerContext) -> None:
        ctx.set("targets", {"entries": [_target(1), _target(2)]})

    @handlers.listener(tutorial + "listener.SetCorrelationKeyListener")
    def correlation(ctx: HandlerContext) -> None:
        target = ctx.get("target")
        assert isinstance(target, dict)
        ctx.set_local("correlationKey", target["correlationKey"])

    @handlers.service(tutorial + "service.SaveVotingResult")
    def save_vote(ctx: HandlerContext) -> None:
        target = ctx.get("target")
        assert isinstance(target, dict)
        ctx.set_local("result", f"{target['organizationIdentifier']}:{ctx.get('vote')}")

    @handlers.service(tutorial + "service.SaveTimeoutResult")
    def save_timeout(ctx: HandlerContext) -> None:
        ctx.set_local("result", "timeout")

    @handlers.service(tutorial + "service.AggregateResults")
    def aggregate(ctx: HandlerContext) -> None:
        ctx.set("aggregated", True)

    @handlers.service(tutorial + "service.DecideWhetherUserVote")
    def decide(ctx: HandlerContext) -> None:
        ctx.set("userVote", True)

    @handlers.task_listener(tutorial + "listener.UserVoteListener")
    def on_create(ctx: HandlerContext) -> None:
        ctx.set("listenerSaw", ctx.element_id)

    @handlers.service(tutorial + "service.SaveUserVote")
    def save_user_vote(ctx: HandlerContext) -> None:
        ctx.set("vote", ctx.get("answer"))

    handlers.register(tutorial + "service.AutomatedVote", "service", _noop)
    handlers.register(tutorial + "service.PrepareReturnVote", "service", _noop)
    return handlers


async def test_tutorial_voting_one_vote_one_timeout() -> None:
    voting = load_reference(TUTORIAL + "voting-process.bpmn")
    vote = load_reference(TUTORIAL + "vote.bpmn")
    async with ProcessHarness([voting, vote], _voting_handlers()) as harness:
        coordinator = await harness.start(
            "exampleorg_votingProcess", "startVotingProcess", business_key="v"
        )
        assert [task.correlation_key for task in harness.sent] == ["ck-1", "ck-2"]

        # A participant runs the vote process: a user task decides, the answer goes back.
        participant = await harness.start("exampleorg_vote", "startVote", business_key="v-remote")
        assert [task.form_key for task in harness.user_tasks] == [
            "http://example.org/fhir/Questionnaire/user-vote|1.0"
        ]
        assert participant.variables["listenerSaw"] == "Activity_1i64l8h"
        await harness.complete_user_task("Activity_1i64l8h", {"answer": "yes"})
        assert participant.status == "completed"
        assert harness.sent[-1].message_name == "returnVote"

        await harness.message(
            "returnVote", business_key="v", correlation_key="ck-2", variables={"vote": "y"}
        )
        await harness.advance(180)

        assert coordinator.status == "completed"
        assert coordinator.variables["aggregated"] is True
        assert harness.handler_calls("org.tutorial.process.tutorial.service.SaveTimeoutResult") == 1
        assert await harness.open_timers() == 0


async def test_allow_list_download_and_update() -> None:
    allow_list = "dsf-process-allow-list/src/main/resources/bpe/"
    download = load_reference(allow_list + "download-allow-list.bpmn")
    update = load_reference(allow_list + "update-allow-list.bpmn")
    order: list[str] = []
    handlers = HandlerRegistry()
    for name in ("DownloadAllowList", "CheckAllowList", "InsertAllowList", "UpdateAllowList"):

        def _record(ctx: HandlerContext, name: str = name) -> None:
            order.append(name)

        handlers.register(f"dev.dsf.bpe.service.{name}", "service", _record)
    async with ProcessHarness([download, update], handlers) as harness:
        first = await harness.start(
            "dsfdev_downloadAllowList", "downloadAllowListMessage", business_key="a"
        )
        second = await harness.start("dsfdev_updateAllowList", "updateAllowList", business_key="b")
        assert order == [
            "DownloadAllowList",
            "CheckAllowList",
            "InsertAllowList",
            "UpdateAllowList",
        ]
        assert first.status == second.status == "completed"


async def test_a_ping_run_keeps_its_stored_state_small() -> None:
    """Every step is written to SQL and read back (the harness runs the real runtime): the
    state of a finished multi-instance ping stays under 2 KB of JSON."""
    async with ProcessHarness([load_reference(PING_PONG + "ping.bpmn")], _ping_handlers()) as h:
        instance = await h.start("dsfdev_ping", "startPing", business_key="bk")
        await h.message("pong", business_key="bk", correlation_key="ck-3")
        await h.advance(30)
        assert instance.status == "completed"
        assert h.handler_calls("dev.dsf.bpe.service.LogPong") == 1
        assert len(json.dumps(instance.state)) < 2048


async def test_ping_send_handler_that_raises_fails_the_instance_without_retry() -> None:
    """DSF's send wrapper catches what the plugin code throws: no job retry even with R3/PT5S
    on the multi-instance; the instance fails with the handler's message."""
    handlers = _ping_handlers()
    failing = HandlerRegistry()
    for name in handlers.names():
        registered = handlers.get(name)
        assert registered is not None
        if name != "dev.dsf.bpe.message.SendPing":
            failing.register(name, registered.kind, registered.function)

    @failing.message_send("dev.dsf.bpe.message.SendPing")
    def flaky(ctx: SendContext) -> None:
        if ctx.correlation_key == "ck-2":
            raise ConnectionError("ck-2 unreachable")

    async with ProcessHarness([load_reference(PING_PONG + "ping.bpmn")], failing) as harness:
        instance = await harness.start("dsfdev_ping", "startPing", business_key="bk")
        await harness.advance(60)
        assert instance.status == "failed"
        # The Task says what failed where; the exception's message stays in the local log.
        status = harness.task_status["bk"]
        assert (
            "ConnectionError in handler dev.dsf.bpe.message.SendPing at element SendPing" in status
        )
        assert "ck-2 unreachable" not in status
        # Nothing after the failure is sent: the instance ended at the failing send.
        assert [task.correlation_key for task in harness.sent] == ["ck-1"]
        assert await harness.open_timers() == 0
