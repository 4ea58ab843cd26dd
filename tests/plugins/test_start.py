"""``dsf-bridge start``: the start Task made from the plugin's draft Task as the DSF UI makes it,
accepted by a strictly validating sandbox and run by the site's bridge."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.dsf.drafts import InputField, StartForm, StartFormError, parse_input
from dsf_bridge.dsf.profiles import TaskProfile
from dsf_bridge.dsf.publication import publish, read_resource
from dsf_bridge.dsf.tasks import input_values
from dsf_bridge.dsf.vocabulary import (
    BPMN_MESSAGE_SYSTEM as BPMN_MESSAGE,
)
from dsf_bridge.dsf.vocabulary import (
    ENDPOINT_IDENTIFIER_SYSTEM,
    TASK_IDENTIFIER_SYSTEM,
)
from dsf_bridge.plugins.inference import CODESYSTEM_OMI
from dsf_bridge.plugins.inference import plugin as inference_plugin
from dsf_bridge.plugins.pingpong import plugin as pingpong_plugin
from dsf_bridge.plugins.starting import find_start_form
from dsf_bridge.sandbox.demo import plugin_resources
from tests.plugins.test_pingpong import (  # the two-site ping/pong network and its helpers
    Network,
    _finished,
    _statuses,
    network,  # noqa: F401 - the fixture
)
from tests.reference import reference_file
from tests.sandbox.harness import LOCAL, Sandbox, sandbox, sandbox_ca, sandbox_sites

__all__ = ["sandbox", "sandbox_ca", "sandbox_sites"]

ROOT = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
INFERENCE = "dsf-bridgedev_inferenceRequest"


def _omi_form() -> StartForm:
    _plugin, _definition, form = find_start_form(
        [pingpong_plugin, inference_plugin], INFERENCE, organization="Hospital_A"
    )
    return form


def _omi_profile() -> TaskProfile:
    loaded = inference_plugin.load(organization="Hospital_A", environment={})
    [profile] = [
        r
        for path, data in loaded.resources[INFERENCE]
        if (r := read_resource(path, data)).get("resourceType") == "StructureDefinition"
        and r["url"].endswith("task-start-inference-request")
    ]
    return TaskProfile.from_definitions(profile)


def test_the_omi_start_task_is_typed_by_the_profile() -> None:
    form = _omi_form()
    assert form.message_name == "startInferenceRequest"
    assert form.fields["segmentation"].types == ("boolean",)
    assert (form.fields["study-instance-uid"].min, form.fields["series-instance-uid"].min) == (1, 0)

    task = form.task(
        [
            ("study-instance-uid", "1.2.3"),
            ("dicomweb-endpoint", "https://pacs.example.org/dicom-web"),
            ("service", "tissue-composition"),
            ("segmentation", "true"),
        ],
        requester="Hospital_A",
        business_key="bk-1",
        authored_on=NOW,
    )

    assert task["status"] == "requested"
    assert task["authoredOn"] == "2026-03-01T12:00:00.000+00:00"
    assert task["requester"]["identifier"]["value"] == "Hospital_A"
    assert task["restriction"]["recipient"][0]["identifier"]["value"] == "Hospital_A"
    assert task["instantiatesCanonical"] == "http://dsf-bridge.dev/bpe/Process/inferenceRequest|1.1"
    assert "identifier" not in task  # the draft's task-identifier stays with the draft
    assert input_values(task, "segmentation", CODESYSTEM_OMI) == [True]
    assert input_values(task, "business-key") == ["bk-1"]
    # The draft's example values are not sent: result-timeout was not given.
    assert input_values(task, "result-timeout", CODESYSTEM_OMI) == []
    assert _omi_profile().problems(task) == []


COMPLETE = [
    ("study-instance-uid", "1.2.3"),
    ("dicomweb-endpoint", "https://pacs.example.org/dicom-web"),
    ("service", "tissue-composition"),
]


async def test_the_omi_start_task_is_accepted_by_a_strict_dsf_server(sandbox: Sandbox) -> None:
    """The sandbox validates it against the plugin's profile and DSF's base Task profile, and
    checks the ActivityDefinition's authorization, as a DSF 2.1 FHIR server does."""
    async with sandbox.client(LOCAL) as client:
        await publish(client, plugin_resources(LOCAL))
        _plugin, _definition, form = find_start_form(
            [inference_plugin], INFERENCE, organization=LOCAL
        )
        task = form.task(
            [*COMPLETE, ("series-instance-uid", "1.2.3.4"), ("result-timeout", "PT5M")],
            requester=LOCAL,
            authored_on=dt.datetime.now(dt.UTC),
        )
        created = await client.create(task)
    assert created.status == 201
    assert created.resource is not None
    assert created.resource["status"] == "requested"


async def test_a_start_task_naming_what_it_needs_instead_of_a_service_is_accepted(
    sandbox: Sandbox,
) -> None:
    """'service' is optional: 'service-modality', 'service-body-part' and 'service-task' ask the
    bridge to search the OMI registry instead (docs/protocol.md)."""
    async with sandbox.client(LOCAL) as client:
        await publish(client, plugin_resources(LOCAL))
        _plugin, _definition, form = find_start_form(
            [inference_plugin], INFERENCE, organization=LOCAL
        )
        task = form.task(
            [
                *COMPLETE[:2],
                ("service-modality", "CT"),
                ("service-body-part", "CHEST"),
                ("service-task", "measurement"),
            ],
            requester=LOCAL,
            authored_on=dt.datetime.now(dt.UTC),
        )
        created = await client.create(task)
    assert created.status == 201
    codes = [i["type"]["coding"][0]["code"] for i in task["input"]]
    assert "service" not in codes
    assert {"service-modality", "service-body-part", "service-task"} <= set(codes)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (COMPLETE[:1], "missing required input dicomweb-endpoint (--input CODE=VALUE)"),
        ([*COMPLETE, ("studyuid", "1.2.3")], "unknown input 'studyuid'"),
        ([*COMPLETE, ("segmentation", "yes")], "'yes' is not a boolean (true or false)"),
        ([*COMPLETE, ("service", "b")], "input service given 2 times, at most 1"),
        ([*COMPLETE, ("result-timeout", "")], "input result-timeout: empty value"),
    ],
)
def test_clear_errors_for_inputs_that_do_not_fill_the_form(
    inputs: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(StartFormError) as raised:
        _omi_form().task(inputs, requester="Hospital_A", authored_on=NOW)
    assert message in str(raised.value)
    if "missing" in message or "unknown" in message:  # the form is listed to choose from
        assert "study-instance-uid (string, required, e.g. 1.2.3.4.5)" in str(raised.value)
        assert "segmentation (boolean, optional)" in str(raised.value)


def test_processes_by_key_or_url_and_clear_errors_for_unknown_ones() -> None:
    plugins = [pingpong_plugin, inference_plugin]
    for name in (
        "dsfdev_ping",
        "http://dsf.dev/bpe/Process/ping",
        "http://dsf.dev/bpe/Process/ping|1.0",
    ):
        _plugin, definition, form = find_start_form(plugins, name, organization="Site_A")
        assert definition.key == "dsfdev_ping"
        assert form.message_name == "startPing"
    with pytest.raises(
        StartFormError, match=r"unknown process 'dsfdev_pinq'; the plugins here run"
    ):
        find_start_form(plugins, "dsfdev_pinq", organization="Site_A")
    with pytest.raises(StartFormError, match=r"dsfdev_ping is at version 1.0 here, not 2.0"):
        find_start_form(plugins, "http://dsf.dev/bpe/Process/ping|2.0", organization="Site_A")
    # ping-autostart ships a start and a stop draft, both starting an instance: name one.
    autostart = "dsfdev_pingAutostart"
    with pytest.raises(
        StartFormError,
        match="has drafts for startPingAutostart, stopPingAutostart: choose one with --message",
    ):
        find_start_form(plugins, autostart, organization="A")
    stop = find_start_form(plugins, autostart, organization="A", message="stopPingAutostart")
    assert stop[2].message_name == "stopPingAutostart"
    with pytest.raises(StartFormError, match="no draft Task for message 'nope'; its drafts are"):
        find_start_form(plugins, autostart, organization="A", message="nope")
    assert parse_input("target-endpoints=Endpoint?identifier=a|b") == (
        "target-endpoints",
        "Endpoint?identifier=a|b",
    )
    with pytest.raises(StartFormError, match="expected CODE=VALUE"):
        parse_input("no-value")


async def _cli(*args: str, config: Path) -> tuple[int, str, str]:
    """The CLI as a user runs it, without blocking the bridges in this event loop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSF_BRIDGE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dsf_bridge",
        *args,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("network", [("sqlite", "2.1"), ("sqlite", "1.9")], indirect=True)
async def test_start_creates_the_ping_start_task_and_the_bridge_runs_it(
    network: Network,  # noqa: F811 - the fixture imported above
) -> None:
    config = network.sites["Site_A"].bridge_config
    target = f"Endpoint?identifier={ENDPOINT_IDENTIFIER_SYSTEM}|Site_B_Endpoint"

    code, out, err = await _cli(
        "start",
        "http://dsf.dev/bpe/Process/ping|1.0",
        "--input",
        f"target-endpoints={target}",
        "--business-key",
        "cli-ping-1",
        "--json",
        config=config,
    )

    assert code == 0, err
    created: dict[str, Any] = json.loads(out)
    assert created["process"] == "dsfdev_ping|1.0"
    assert created["url"] == f"{network.sites['Site_A'].base_url}/Task/{created['id']}"
    assert "status" not in created  # it did not wait
    async with network.client("Site_A") as client:
        final = await _finished(client, created["id"], 30)
    assert final["status"] == "completed", final.get("output")
    assert _statuses(final["output"]) == {"Site_B_Endpoint": "pong-received"}
    assert input_values(final, "business-key") == ["cli-ping-1"]
    assert final["requester"]["identifier"]["value"] == "Site_A"
    assert all(i.get("system") != TASK_IDENTIFIER_SYSTEM for i in final.get("identifier") or [])
    # The draft is still there, untouched, for the next start.
    drafts = [
        t
        for t in network.servers["Site_A"].service.store.all("Task")
        if t.get("status") == "draft" and "ping|" in t["instantiatesCanonical"]
    ]
    assert len(drafts) == 1

    # --wait: until the Task ends, its status and outputs printed.
    code, out, err = await _cli(
        "start", "dsfdev_ping", "-i", f"target-endpoints={target}", "--wait", "30", config=config
    )
    assert code == 0, err
    created_line, status_line, *outputs = out.splitlines()
    assert created_line.startswith("created Task/")
    # Said on stderr before the wait: a read failing later does not hide the Task made.
    task_ref = created_line.split()[1]
    assert f"created {task_ref}: " in err
    assert "waiting for its end" in err
    assert status_line.endswith(" completed")
    assert len(outputs) == 1
    assert outputs[0].startswith("  output ping-status: ")
    assert "pong-received" in outputs[0]

    code, _out, err = await _cli("start", "dsfdev_ping", "--input", "target=x", config=config)
    assert code == 1
    assert "unknown input 'target'; the inputs of this process are:" in err
    assert "target-endpoints (string, optional" in err
    code, _out, err = await _cli("start", "dsfdev_nothing", config=config)
    assert code == 1
    assert "unknown process 'dsfdev_nothing'" in err


def _slice(
    name: str, kind: str, *, minimum: int = 0, pattern: bool = False
) -> list[dict[str, Any]]:
    system = "http://example.org/fhir/CodeSystem/x"
    base = f"Task.input:{name}"
    if pattern:  # sliced by a pattern on type instead of fixed system and code
        coding = {"coding": [{"system": system, "code": name}]}
        elements = [{"id": f"{base}.type", "patternCodeableConcept": coding}]
    else:
        elements = [
            {"id": f"{base}.type.coding.system", "fixedUri": system},
            {"id": f"{base}.type.coding.code", "fixedCode": name},
        ]
    return [
        {"id": base, "sliceName": name, "min": minimum, "max": "1"},
        *elements,
        {"id": f"{base}.value[x]", "type": [{"code": kind}]},
    ]


def test_values_are_typed_as_each_slice_declares() -> None:
    profile = {
        "resourceType": "StructureDefinition",
        "url": "http://example.org/fhir/StructureDefinition/task-x",
        "version": "1.0",
        "type": "Task",
        "differential": {
            "element": [
                *_slice("count", "positiveInt", minimum=1),
                *_slice("target", "Reference"),
                *_slice("kind", "Coding", pattern=True),
                *_slice("ratio", "decimal"),
            ]
        },
    }
    draft = {
        "resourceType": "Task",
        "meta": {"profile": ["http://example.org/fhir/StructureDefinition/task-x|1.0"]},
        "instantiatesCanonical": "http://example.org/bpe/Process/x|1.0",
        "status": "draft",
        "input": [
            {
                "type": {"coding": [{"system": BPMN_MESSAGE, "code": "message-name"}]},
                "valueString": "startX",
            },
            {  # in the draft only, not sliced by the profile: typed as the draft's value
                "type": {"coding": [{"system": "http://example.org/s", "code": "extra"}]},
                "valueReference": {"reference": "Endpoint/1"},
            },
        ],
    }
    form = StartForm.from_draft(draft, [profile])
    assert {code: f.types for code, f in form.fields.items()} == {
        "count": ("positiveInt",),
        "target": ("Reference",),
        "kind": ("Coding",),
        "ratio": ("decimal",),
        "extra": ("Reference",),
    }
    task = form.task(
        [
            ("count", "3"),
            ("target", "http://example.org/sid/organization|Site_B"),
            ("kind", "http://example.org/k|big"),
            ("ratio", "0.25"),
            ("extra", "Endpoint/2"),
        ],
        requester="Site_A",
        authored_on=NOW,
    )
    values = {
        p["type"]["coding"][0]["code"]: {k: v for k, v in p.items() if k != "type"}
        for p in task["input"]
    }
    assert values == {
        "message-name": {"valueString": "startX"},
        "count": {"valuePositiveInt": 3},
        "target": {
            "valueReference": {
                "identifier": {"system": "http://example.org/sid/organization", "value": "Site_B"}
            }
        },
        "kind": {"valueCoding": {"system": "http://example.org/k", "code": "big"}},
        "ratio": {"valueDecimal": 0.25},
        "extra": {"valueReference": {"reference": "Endpoint/2"}},
    }
    for huge in ("1e400", "NaN", "-Infinity"):  # no JSON number
        with pytest.raises(StartFormError, match="is not a decimal"):
            form.task([("count", "1"), ("ratio", huge)], requester="Site_A", authored_on=NOW)
    for bad, message in [
        ("0", "0 is out of range for positiveInt"),
        ("three", re.escape("'three' is not an integer (positiveInt)")),
    ]:
        with pytest.raises(StartFormError, match=message):
            form.task([("count", bad)], requester="Site_A", authored_on=NOW)
    with pytest.raises(StartFormError, match=re.escape("'big' is not SYSTEM|CODING")):
        form.task([("count", "1"), ("kind", "big")], requester="Site_A", authored_on=NOW)


def test_a_logical_reference_keeps_the_drafts_target_type() -> None:
    """MII's dataSend start draft: dms-identifier is an Organization by identifier. The DSF
    FHIR server resolves an identifier-only reference only with its type (ResourceReference:
    without one it is UNKNOWN), so the Task keeps the draft's ``type`` as the DSF UI does."""
    fhir = "mii-process-data-transfer/src/main/resources/fhir"

    def resource(relative: str) -> dict[str, Any]:
        path = reference_file(f"{fhir}/{relative}")
        text = path.read_text(encoding="utf-8")
        for placeholder, value in (("version", "1.0"), ("organization", "Site_A")):
            text = text.replace(f"#{{{placeholder}}}", value)
        return read_resource(str(path), text.replace("#{date}", "2026-01-01").encode())

    form = StartForm.from_draft(
        resource("Task/task-data-send-start.xml"),
        [resource("StructureDefinition/task-data-send-start.xml")],
    )
    task = form.task(
        [
            ("dms-identifier", "http://dsf.dev/sid/organization-identifier|Site_B"),
            (
                "project-identifier",
                "http://medizininformatik-initiative.de/sid/project-identifier|P1",
            ),
        ],
        requester="Site_A",
        authored_on=NOW,
    )
    [dms] = [p for p in task["input"] if p["type"]["coding"][0]["code"] == "dms-identifier"]
    assert dms["valueReference"] == {
        "type": "Organization",
        "identifier": {"system": "http://dsf.dev/sid/organization-identifier", "value": "Site_B"},
    }


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        ("dateTime", "2026-03-01T10:00:00+01:00", "tomorrow"),
        ("dateTime", "2026-03-01", "2026-03-01T10:00:00"),  # a time needs its zone
        ("date", "2026-03", "01.03.2026"),
        ("instant", "2026-03-01T09:00:00.5Z", "2026-03-01"),
        ("time", "23:59:60", "24:00:00"),
        ("uri", "urn:x:y", "a b"),
        ("id", "abc-1.2", "a_b"),
        ("oid", "urn:oid:1.2.840", "1.2.840"),
    ],
)
def test_text_values_are_checked_against_their_fhir_type(kind: str, good: str, bad: str) -> None:
    """A strict DSF server refuses a Task whose primitive does not match its FHIR type: such a
    value exits before anything is sent, as docs/operations.md says."""
    message = {
        "type": {"coding": [{"system": BPMN_MESSAGE, "code": "message-name"}]},
        "valueString": "startX",
    }
    form = StartForm(
        {"input": [message]}, {"when": InputField("when", "http://example.org/s", 1, 1, (kind,))}
    )
    [_, given] = form.task([("when", good)], requester="Site_A", authored_on=NOW)["input"]
    assert given["value" + kind[0].upper() + kind[1:]] == good
    with pytest.raises(StartFormError, match=re.escape(f"{bad!r} is not a {kind} (")):
        form.task([("when", bad)], requester="Site_A", authored_on=NOW)
