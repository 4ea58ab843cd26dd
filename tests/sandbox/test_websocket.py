"""The DSF websocket ``/fhir/ws`` over real TLS: ``bind``/``bound``, one frame per matching
event, ``ping <id>`` without payload, DSF's close codes for unknown subscriptions and
certificates."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from dsf_bridge.errors import RemoteError
from tests.sandbox.harness import LOCAL, REMOTE, Sandbox, forbidden_reasons, task_profile

REQUESTED_TASK = {
    "resourceType": "Task",
    "meta": {"profile": ["http://dsf.dev/fhir/StructureDefinition/task-test"]},
    "instantiatesCanonical": "http://dsf.dev/bpe/Process/test|1.0",
    "status": "requested",
    "intent": "order",
    "authoredOn": "2026-01-01T10:00:00+01:00",
    "requester": {
        "type": "Organization",
        "identifier": {"system": "http://dsf.dev/sid/organization-identifier", "value": LOCAL},
    },
    "restriction": {
        "recipient": [
            {
                "type": "Organization",
                "identifier": {
                    "system": "http://dsf.dev/sid/organization-identifier",
                    "value": LOCAL,
                },
            }
        ]
    },
    "input": [
        {
            "type": {
                "coding": [
                    {
                        "system": "http://dsf.dev/fhir/CodeSystem/bpmn-message",
                        "code": "message-name",
                    }
                ]
            },
            "valueString": "test-message",
        }
    ],
}

TAG_ALL = {"tag": [{"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "ALL"}]}
ACTIVITY_DEFINITION = {
    "resourceType": "ActivityDefinition",
    "meta": TAG_ALL,
    "url": "http://dsf.dev/bpe/Process/test",
    "version": "1.0",
    "status": "active",
    "kind": "Task",
    "extension": [
        {
            "url": "http://dsf.dev/fhir/StructureDefinition/extension-process-authorization",
            "extension": [
                {"url": "message-name", "valueString": "test-message"},
                {
                    "url": "task-profile",
                    "valueCanonical": "http://dsf.dev/fhir/StructureDefinition/task-test|1.0",
                },
                {
                    "url": "requester",
                    "valueCoding": {
                        "system": "http://dsf.dev/fhir/CodeSystem/process-authorization",
                        "code": "LOCAL_ALL",
                    },
                },
                {
                    "url": "recipient",
                    "valueCoding": {
                        "system": "http://dsf.dev/fhir/CodeSystem/process-authorization",
                        "code": "LOCAL_ALL",
                    },
                },
            ],
        }
    ],
}


def _ws_url(sandbox: Sandbox) -> str:
    return sandbox.base_url.replace("https://", "wss://") + "/ws"


async def test_bind_bound_then_one_frame_per_created_task(sandbox: Sandbox) -> None:
    subscription = sandbox.subscription_id("Task?status=requested")
    async with (
        sandbox.client(LOCAL) as client,
        websockets.connect(_ws_url(sandbox), ssl=sandbox.context(LOCAL)) as ws,
    ):
        await ws.send(f"bind {subscription}")
        assert await asyncio.wait_for(ws.recv(), 5) == f"bound {subscription}"
        await client.create(ACTIVITY_DEFINITION)
        await client.create(task_profile("http://dsf.dev/fhir/StructureDefinition/task-test|1.0"))
        created = await client.create(REQUESTED_TASK)
        frame = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(frame, str)
        task = json.loads(frame)
        assert task["resourceType"] == "Task"
        assert task["id"] == created.id
        assert task["status"] == "requested"
        # Moving on to in-progress (with a business key, as DSF's profile wants) no longer
        # matches Task?status=requested: no frame.
        task["status"] = "in-progress"
        task["input"].append(
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://dsf.dev/fhir/CodeSystem/bpmn-message",
                            "code": "business-key",
                        }
                    ]
                },
                "valueString": "bk-1",
            }
        )
        await client.update(task, if_match=1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.3)


async def test_subscription_without_payload_sends_ping(sandbox: Sandbox) -> None:
    async with sandbox.client(LOCAL) as client:
        created = await client.create(
            {
                "resourceType": "Subscription",
                "meta": TAG_ALL,
                "status": "active",
                "reason": "test",
                "criteria": "CodeSystem?status=active",
                "channel": {"type": "websocket"},
            }
        )
        async with websockets.connect(_ws_url(sandbox), ssl=sandbox.context(LOCAL)) as ws:
            await ws.send(f"bind {created.id}")
            assert await asyncio.wait_for(ws.recv(), 5) == f"bound {created.id}"
            await client.create(
                {
                    "resourceType": "CodeSystem",
                    "meta": TAG_ALL,
                    "url": "http://x.test/cs",
                    "status": "active",
                    "content": "complete",
                }
            )
            assert await asyncio.wait_for(ws.recv(), 5) == f"ping {created.id}"


async def test_unknown_subscription_closes_with_1003(sandbox: Sandbox) -> None:
    async with websockets.connect(_ws_url(sandbox), ssl=sandbox.context(LOCAL)) as ws:
        await ws.send("bind 00000000-0000-0000-0000-000000000000")
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(ws.recv(), 5)
    assert caught.value.rcvd is not None
    assert caught.value.rcvd.code == 1003
    assert "not found" in caught.value.rcvd.reason


async def test_unknown_certificate_closes_with_1008(sandbox: Sandbox, tmp_path: Path) -> None:
    unknown = sandbox.ca.issue_client("not in the allow list")
    certificate, key = tmp_path / "u.pem", tmp_path / "u-key.pem"
    unknown.write(certificate, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(sandbox.sites[LOCAL].ca))
    context.load_cert_chain(str(certificate), str(key))
    async with websockets.connect(_ws_url(sandbox), ssl=context) as ws:
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(ws.recv(), 5)
    assert caught.value.rcvd is not None
    assert caught.value.rcvd.code == 1008


async def test_remote_organization_may_not_subscribe(sandbox: Sandbox) -> None:
    # The server closes right after the opening handshake, before any bind.
    async with websockets.connect(_ws_url(sandbox), ssl=sandbox.context(REMOTE)) as ws:
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(ws.recv(), 5)
    assert caught.value.rcvd is not None
    assert caught.value.rcvd.code == 1008
    assert caught.value.rcvd.reason == "Forbidden"


QUESTIONNAIRE = {
    "resourceType": "Questionnaire",
    "meta": {"tag": [{"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "ALL"}]},
    "url": "http://dsf.dev/fhir/Questionnaire/hello-world",
    "version": "1.0",
    "status": "active",
    "item": [
        {"linkId": "business-key", "type": "string", "text": "The business-key"},
        {"linkId": "user-task-id", "type": "string", "text": "The user-task-id"},
    ],
}


def _questionnaire_response(status: str, **extra: Any) -> dict[str, Any]:
    def item(link_id: str, value: str) -> dict[str, Any]:
        # DSF 2.x's QuestionnaireResponse profile wants each item's text (its default profile
        # applies when none is named).
        text = f"The {link_id} of the process execution"
        return {"linkId": link_id, "text": text, "answer": [{"valueString": value}]}

    return {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": "http://dsf.dev/fhir/Questionnaire/hello-world|1.0",
        "status": status,
        "item": [item("business-key", "bk-1"), item("user-task-id", "ut-1")],
        **extra,
    }


async def test_user_task_flow_as_dsf(sandbox: Sandbox) -> None:
    """QuestionnaireResponse in-progress -> completed is announced on its subscription; DSF's
    rules refuse other starts, transitions, changed items and remote writers."""
    subscription = sandbox.subscription_id("QuestionnaireResponse?status=completed")
    author = {
        "identifier": {"system": "http://dsf.dev/sid/organization-identifier", "value": LOCAL}
    }
    async with (
        sandbox.client(LOCAL) as local,
        sandbox.client(REMOTE) as remote,
        websockets.connect(_ws_url(sandbox), ssl=sandbox.context(LOCAL)) as ws,
    ):
        await ws.send(f"bind {subscription}")
        assert await asyncio.wait_for(ws.recv(), 5) == f"bound {subscription}"
        # A QuestionnaireResponse needs its Questionnaire on the server (DSF validates it).
        await local.create(QUESTIONNAIRE)
        refused = [
            (
                local.create(_questionnaire_response("completed")),
                "QuestionnaireResponse.status not one of",
            ),
            (remote.create(_questionnaire_response("in-progress")), "local organization only"),
        ]
        for attempt, why in refused:
            with forbidden_reasons() as reasons, pytest.raises(RemoteError, match="forbidden"):
                await attempt
            assert any(why in r for r in reasons), reasons
        created = await local.create(_questionnaire_response("in-progress"))
        assert created.resource is not None
        with forbidden_reasons() as reasons, pytest.raises(RemoteError, match="forbidden"):
            await local.update({**created.resource, "status": "completed"})
        assert any("author not the current organization" in r for r in reasons), reasons
        tampered = _questionnaire_response("completed", author=author, authored="2026-01-01")
        tampered["item"][1]["answer"][0]["valueString"] = "ut-2"
        with forbidden_reasons() as reasons, pytest.raises(RemoteError, match="forbidden"):
            await local.update({**tampered, "id": created.id})
        assert any("user-task-id modified" in r for r in reasons), reasons
        completed = {**created.resource, "status": "completed", "author": author}
        completed["authored"] = "2026-01-01T10:00:00+01:00"
        await local.update(completed, if_match=1)
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert frame["resourceType"] == "QuestionnaireResponse"
        assert frame["status"] == "completed"
        with forbidden_reasons() as reasons, pytest.raises(RemoteError, match="forbidden"):
            await local.update({**completed, "status": "in-progress"})
        assert any("completed -> in-progress not allowed" in r for r in reasons), reasons
        amended = await local.update({**completed, "status": "amended"}, if_match=2)
        assert amended.version == 3
