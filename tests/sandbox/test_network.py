"""Two sandbox sites at once: site A, configured only by its ``bridge.toml``, finds itself and
site B's Endpoint on its own server, sends B a Task over mutual TLS, and B's websocket
subscriber receives it, as between two DSF sites."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import websockets

from dsf_bridge.config import load_settings
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.dsf.organization import find_local_organization
from dsf_bridge.sandbox.network import SandboxNetwork
from tests.sandbox.harness import FAST_RETRY, task_profile

ORG_SYSTEM = "http://dsf.dev/sid/organization-identifier"
ALL = {"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "ALL"}


def _coding(code: str) -> dict[str, Any]:
    return {"system": "http://dsf.dev/fhir/CodeSystem/process-authorization", "code": code}


PONG = {
    "resourceType": "ActivityDefinition",
    "meta": {"tag": [ALL]},
    "url": "http://dsf.dev/bpe/Process/pong",
    "version": "1.0",
    "status": "active",
    "kind": "Task",
    "extension": [
        {
            "url": "http://dsf.dev/fhir/StructureDefinition/extension-process-authorization",
            "extension": [
                {"url": "message-name", "valueString": "ping"},
                {
                    "url": "task-profile",
                    "valueCanonical": "http://test.org/fhir/StructureDefinition/task-network-test|1.0",
                },
                {"url": "requester", "valueCoding": _coding("REMOTE_ALL")},
                {"url": "recipient", "valueCoding": _coding("LOCAL_ALL")},
            ],
        }
    ],
}


def _client_from_config(path: Path) -> tuple[FhirClient, str]:
    dsf = load_settings(path, environ={}).dsf
    assert dsf.fhir_base_url is not None
    assert dsf.client_certificate is not None
    identity = load_identity(dsf.client_certificate, dsf.client_key)
    context = build_ssl_context(identity, dsf.ca_certificates)
    return FhirClient(dsf.fhir_base_url, ssl_context=context, retry=FAST_RETRY), dsf.fhir_base_url


async def test_a_task_travels_from_site_a_to_site_b(tmp_path: Path) -> None:
    async with SandboxNetwork(tmp_path / "net", ["A", "B"]) as network:
        local_a, base_a = _client_from_config(network.sites["A"].bridge_config)
        local_b, base_b = _client_from_config(network.sites["B"].bridge_config)
        async with local_a, local_b:
            assert base_a == network.base_url("A")
            me = await find_local_organization(local_a, base_a)
            assert me.identifier == "A"
            endpoints = await local_a.search(
                "Endpoint", {"identifier": "http://dsf.dev/sid/endpoint-identifier|B_Endpoint"}
            )
            assert [e["address"] for e in endpoints] == [base_b]
            await local_b.create(PONG)
            await local_b.create(
                task_profile("http://test.org/fhir/StructureDefinition/task-network-test|1.0")
            )
            subscriptions = await local_b.search(
                "Subscription", {"criteria:exact": "Task?status=requested"}
            )
            context_b = build_ssl_context(
                load_identity(network.sites["B"].client_certificate, network.sites["B"].client_key),
                [network.sites["B"].ca],
            )
            ws_url = base_b.replace("https://", "wss://") + "/ws"
            async with websockets.connect(ws_url, ssl=context_b) as ws:
                await ws.send(f"bind {subscriptions[0]['id']}")
                bound = await asyncio.wait_for(ws.recv(), 5)
                assert bound == f"bound {subscriptions[0]['id']}"
                # Site A posts to site B's server with A's own client certificate.
                context_a = build_ssl_context(
                    load_identity(
                        network.sites["A"].client_certificate, network.sites["A"].client_key
                    ),
                    [network.sites["A"].ca],
                )
                async with FhirClient(endpoints[0]["address"], ssl_context=context_a) as remote_b:
                    sent = await remote_b.create(_ping("A", "B"), return_minimal=True)
                assert sent.status == 201
                frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert frame["id"] == sent.id
    assert frame["requester"]["identifier"]["value"] == "A"


def _ping(requester: str, recipient: str) -> dict[str, Any]:
    def organization(value: str) -> dict[str, Any]:
        return {"type": "Organization", "identifier": {"system": ORG_SYSTEM, "value": value}}

    return {
        "resourceType": "Task",
        "meta": {"profile": ["http://test.org/fhir/StructureDefinition/task-network-test|1.0"]},
        "instantiatesCanonical": "http://dsf.dev/bpe/Process/pong|1.0",
        "status": "requested",
        "intent": "order",
        "authoredOn": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "requester": organization(requester),
        "restriction": {"recipient": [organization(recipient)]},
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
                "valueString": "ping",
            }
        ],
    }
