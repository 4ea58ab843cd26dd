"""Plugin resources published to the sandbox as one batch of conditional creates."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsf_bridge.dsf.publication import (
    PublicationError,
    for_dsf_2,
    publication_bundle,
    publish,
    read_resource,
)
from dsf_bridge.dsf.versions import DSF_1, DSF_2
from dsf_bridge.errors import ProcessModelError, RemoteError
from tests.reference import reference_dir
from tests.sandbox.harness import LOCAL, Sandbox

PLACEHOLDERS = {
    b"#{version}": b"1.0",
    b"#{date}": b"2026-01-01",
    b"#{organization}": LOCAL.encode(),
}


def _ping_pong_files() -> list[tuple[str, bytes]]:
    root = reference_dir() / "dsf-process-ping-pong/src/main/resources/fhir"
    files = []
    for path in sorted(root.rglob("*.xml")):
        data = path.read_bytes()
        for placeholder, value in PLACEHOLDERS.items():
            data = data.replace(placeholder, value)
        files.append((str(path), data))
    return files


async def test_publishing_twice_creates_each_resource_once(sandbox: Sandbox) -> None:
    files = _ping_pong_files()
    async with sandbox.client(LOCAL) as client:
        first = await publish(client, files)
        second = await publish(client, files)
        definitions = await client.search(
            "ActivityDefinition", [("url", "http://dsf.dev/bpe/Process/ping")]
        )
        drafts = await client.search("Task", [("status", "draft")])
    assert len(first) == len(files) == len(second)
    assert {item.resource_type for item in first} >= {
        "ActivityDefinition",
        "StructureDefinition",
        "CodeSystem",
        "ValueSet",
        "Task",
    }
    assert len(definitions) == 1
    # "status managed by bpe" becomes active when the bridge runs the process.
    assert definitions[0]["status"] == "active"
    assert len(drafts) == len([f for f in first if f.resource_type == "Task"])


async def test_a_refused_resource_is_named(sandbox: Sandbox) -> None:
    files = _ping_pong_files()
    # A remote organization may not publish definitional resources on this server.
    async with sandbox.client("Site_B") as client:
        with pytest.raises(PublicationError) as caught:
            await publish(client, files[:1])
    assert Path(files[0][0]).name in str(caught.value)


def test_unreadable_files_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ProcessModelError, match="not valid JSON"):
        read_resource(tmp_path / "x.json", b"{")
    with pytest.raises(ProcessModelError, match="not a valid FHIR"):
        read_resource(tmp_path / "x.xml", b'<Nonsense xmlns="http://hl7.org/fhir"/>')


def test_structure_definition_element_ids_survive_reading_xml() -> None:
    """fhir.resources drops the ``id`` attribute of XML elements; profiles need it back."""
    files = dict(_ping_pong_files())
    [(source, data)] = [(s, d) for s, d in files.items() if s.endswith("dsf-task-ping.xml")]
    resource = read_resource(source, data)
    ids = [element.get("id") for element in resource["differential"]["element"]]
    assert ids[0] == "Task.instantiatesCanonical"
    assert "Task.input:endpoint-identifier.value[x].identifier.system" in ids
    assert None not in ids


def test_every_create_entry_has_its_own_urn_uuid_full_url() -> None:
    """DSF's CreateCommand answers 400 for a create entry without a urn:uuid fullUrl."""
    resources = [(source, read_resource(source, data)) for source, data in _ping_pong_files()]
    bundle, _published = publication_bundle(resources)
    full_urls = [entry["fullUrl"] for entry in bundle["entry"]]
    assert all(url.startswith("urn:uuid:") for url in full_urls)
    assert len(set(full_urls)) == len(full_urls)
    assert all(entry["request"]["method"] == "POST" for entry in bundle["entry"])


async def test_the_sandbox_refuses_create_entries_without_full_url_as_dsf(
    sandbox: Sandbox,
) -> None:
    """What a real DSF server answered the bridge before: 400 per entry, nothing created."""
    resources = [(source, read_resource(source, data)) for source, data in _ping_pong_files()]
    bundle, _published = publication_bundle(resources[:3])
    for entry in bundle["entry"]:
        del entry["fullUrl"]
    async with sandbox.client(LOCAL) as client:
        answer = await client.bundle(bundle, return_minimal=True)
        created = await client.search("StructureDefinition", [("url:below", "http://dsf.dev")])
    statuses = [entry["response"]["status"] for entry in answer["entry"]]
    assert statuses == ["400 Bad Request"] * 3
    texts = [e["response"]["outcome"]["issue"][0]["diagnostics"] for e in answer["entry"]]
    assert texts[0].startswith("Bad crete request url ")  # DSF's text, typo included
    assert created == []


def test_api_v1_resources_are_rewritten_for_dsf_2_as_the_java_bpe_does() -> None:
    resources = {
        "/".join(Path(source).parts[-2:]): read_resource(source, data)
        for source, data in _ping_pong_files()
    }
    task_ping = for_dsf_2(resources["StructureDefinition/dsf-task-ping.xml"])
    assert resources["StructureDefinition/dsf-task-ping.xml"]["baseDefinition"].endswith(
        "/task-base"
    )
    assert task_ping["baseDefinition"] == "http://dsf.dev/fhir/StructureDefinition/task"
    assert task_ping["meta"]["profile"][0] == (
        "http://dsf.dev/fhir/StructureDefinition/structure-definition"
    )
    bindings = [
        e["binding"]["valueSet"]
        for e in task_ping["differential"]["element"]
        if "binding" in e and "dsf.dev/fhir/CodeSystem/" in e["binding"]["valueSet"]
    ]
    assert all("|" not in value_set for value_set in bindings)
    activity = for_dsf_2(resources["ActivityDefinition/dsf-ping.xml"])
    assert activity["meta"]["profile"][0] == (
        "http://dsf.dev/fhir/StructureDefinition/activity-definition"
    )
    draft = resources["Task/dsf-task-start-ping.xml"]
    assert for_dsf_2(draft) == draft  # Tasks travel unchanged
    questionnaire = for_dsf_2(
        {
            "resourceType": "Questionnaire",
            "meta": {"profile": ["http://dsf.dev/fhir/StructureDefinition/questionnaire|1.5.0"]},
            "item": [
                {"linkId": "business-key", "type": "string"},
                {"linkId": "approve", "type": "boolean"},
                {"linkId": "info", "type": "display", "item": [{"linkId": "a", "type": "string"}]},
                {
                    "linkId": "group",
                    "type": "group",
                    "required": True,
                    "item": [{"linkId": "b", "type": "string"}],
                },
                {"linkId": "more", "type": "group", "item": [{"linkId": "c", "type": "string"}]},
            ],
        }
    )
    assert questionnaire["meta"]["profile"] == [
        "http://dsf.dev/fhir/StructureDefinition/questionnaire"
    ]
    items = questionnaire["item"]
    assert [item.get("required") for item in items] == [True, False, None, True, False]
    # As ProcessPluginImpl.setRequired: only the children of items it sets are looked at.
    assert "required" not in items[2]["item"][0]
    assert "required" not in items[3]["item"][0]
    assert items[4]["item"][0]["required"] is False


@pytest.mark.parametrize("rewrite", [True, False], ids=["rewritten", "as-written"])
async def test_a_dsf_2_server_knows_the_ping_profile_only_when_rewritten(
    sandbox: Sandbox, rewrite: bool
) -> None:
    """DSF 2.x deleted task-base: Tasks of a profile published unchanged cannot validate."""
    files = [(s, d) for s, d in _ping_pong_files() if "/Task/" not in s]
    release = DSF_2 if rewrite else DSF_1  # DSF_1: published as written, for 1.x
    [draft] = [
        read_resource(s, d)
        for s, d in _ping_pong_files()
        if s.endswith("/Task/dsf-task-start-ping.xml")
    ]
    async with sandbox.client(LOCAL) as client:
        await publish(client, files, dsf_release=release)
        if rewrite:
            created = await client.create(draft)
            assert created.status == 201
        else:
            with pytest.raises(RemoteError) as refused:
                await client.create(draft)
            assert refused.value.status == 403
            assert "task-base" in str(refused.value)
