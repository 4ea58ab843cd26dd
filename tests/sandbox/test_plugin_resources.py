"""A real DSF plugin on the sandbox: the ping-pong plugin's ActivityDefinitions published as a
batch of conditional creates (as the bridge publishes plugin resources), then the Tasks DSF sites
exchange authorized as a DSF FHIR server would once the ActivityDefinitions are active: the draft
start Task locally, ``ping`` from a remote organization or the local one,
``startPing`` from the local organization only.

Fixtures: ``dsf-process-ping-pong/src/main/resources/fhir/ActivityDefinition/dsf-ping.xml``,
``.../dsf-pong.xml`` and ``.../Task/dsf-task-start-ping.xml`` with ``#{version}``, ``#{date}``
and ``#{organization}`` replaced.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.dsf.publication import publication_bundle, publish, read_resource
from dsf_bridge.errors import RemoteError
from tests.reference import reference_dir
from tests.sandbox.harness import LOCAL, REMOTE, Sandbox, forbidden_reasons

VERSION = "1.0"
ORG_SYSTEM = "http://dsf.dev/sid/organization-identifier"


def _fhir_dir() -> Path:
    return reference_dir() / "dsf-process-ping-pong/src/main/resources/fhir"


def _text(relative: str) -> bytes:
    text = (_fhir_dir() / relative).read_text()
    text = text.replace("#{version}", VERSION).replace("#{date}", "2026-01-01")
    return text.replace("#{organization}", LOCAL).encode()


def _publication_bundle(status: str = "active") -> dict[str, Any]:
    """The bridge's own publication Bundle for the ping and pong ActivityDefinitions."""
    definitions = []
    for name in ("dsf-ping.xml", "dsf-pong.xml"):
        definition = read_resource(name, _text(f"ActivityDefinition/{name}"))
        # The files say "unknown" ("status managed by bpe"): the BPE activates a process's
        # resources when it deploys the process (DSF ProcessesResource), so must the bridge.
        assert definition["status"] == "unknown"
        definitions.append((name, definition))
    bundle, _published = publication_bundle(definitions, status=status)
    return bundle


def _ping_task(requester: str) -> dict[str, Any]:
    reference = {"type": "Organization", "identifier": {"system": ORG_SYSTEM, "value": requester}}
    recipient = {"type": "Organization", "identifier": {"system": ORG_SYSTEM, "value": LOCAL}}
    return {
        "resourceType": "Task",
        "meta": {"profile": [f"http://dsf.dev/fhir/StructureDefinition/task-ping|{VERSION}"]},
        "instantiatesCanonical": f"http://dsf.dev/bpe/Process/pong|{VERSION}",
        "status": "requested",
        "intent": "order",
        "authoredOn": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "requester": reference,
        "restriction": {"recipient": [recipient]},
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
            },
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://dsf.dev/fhir/CodeSystem/bpmn-message",
                            "code": "business-key",
                        }
                    ]
                },
                "valueString": "b7f3c1de-2d6a-4f0e-9a55-0c3f1b2a9e10",
            },
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://dsf.dev/fhir/CodeSystem/bpmn-message",
                            "code": "correlation-key",
                        }
                    ]
                },
                "valueString": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
            },
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://dsf.dev/fhir/CodeSystem/ping",
                            "code": "endpoint-identifier",
                        }
                    ]
                },
                "valueReference": {
                    "type": "Endpoint",
                    "identifier": {
                        "system": "http://dsf.dev/sid/endpoint-identifier",
                        "value": f"{requester}_Endpoint",
                    },
                },
            },
        ],
    }


async def test_publication_is_idempotent(sandbox: Sandbox) -> None:
    async with sandbox.client(LOCAL) as client:
        first = await client.bundle(_publication_bundle())
        second = await client.bundle(_publication_bundle())
        definitions = await client.search("ActivityDefinition", {})
    assert [e["response"]["status"] for e in first["entry"]] == ["201 Created", "201 Created"]
    assert [e["response"]["status"] for e in second["entry"]] == ["200 OK", "200 OK"]
    assert sorted(d["url"] for d in definitions) == [
        "http://dsf.dev/bpe/Process/ping",
        "http://dsf.dev/bpe/Process/pong",
    ]


def _profile_files() -> list[tuple[str, bytes]]:
    """The plugin's Task profiles, extension, CodeSystems and ValueSets: a server that
    validates Tasks as DSF does needs them."""
    return [
        (f"{kind}/{path.name}", _text(f"{kind}/{path.name}"))
        for kind in ("StructureDefinition", "CodeSystem", "ValueSet")
        for path in sorted((_fhir_dir() / kind).glob("*.xml"))
    ]


async def test_ping_pong_tasks_are_authorized_like_dsf(sandbox: Sandbox) -> None:
    start = read_resource("dsf-task-start-ping.xml", _text("Task/dsf-task-start-ping.xml"))
    async with sandbox.client(LOCAL) as local, sandbox.client(REMOTE) as remote:
        # Rewritten for the 2.x sandbox (task-base -> task) as the Java 2.x BPE does.
        await publish(local, _profile_files())
        await local.bundle(_publication_bundle(status="unknown"))
        with forbidden_reasons() as reasons, pytest.raises(RemoteError):
            await remote.create(_ping_task(REMOTE))
        assert any("no ActivityDefinition" in r for r in reasons), reasons
        for definition in await local.search("ActivityDefinition", {}):
            await local.update({**definition, "status": "active"})
        draft = await local.create(start)
        assert draft.status == 201
        with pytest.raises(RemoteError) as duplicate:
            await local.create(start)
        assert duplicate.value.status == 403
        with pytest.raises(RemoteError) as remote_draft:
            await remote.create(start)
        assert remote_draft.value.status == 403

        ping = await remote.create(_ping_task(REMOTE), return_minimal=True)
        assert ping.status == 201
        assert ping.resource is None
        # The pong process authorizes ping from remote and local requesters (a site may ping
        # itself), but startPing of the ping process only from the local organization.
        own_ping = await local.create(_ping_task(LOCAL), return_minimal=True)
        assert own_ping.status == 201
        remote_start = {
            **start,
            "status": "requested",
            "requester": _ping_task(REMOTE)["requester"],
        }
        del remote_start["identifier"]
        with forbidden_reasons() as reasons, pytest.raises(RemoteError) as forbidden:
            await remote.create(remote_start)
        assert forbidden.value.status == 403
        assert any("not allowed for requester" in r for r in reasons), reasons

        # The remote requester reads its own Task; the local organization reads everything.
        assert ping.id is not None
        mine = await remote.read("Task", ping.id)
        assert mine["status"] == "requested"
        requested = await local.search("Task", {"status": "requested"})
    assert {t["id"] for t in requested} == {ping.id, own_ping.id}
