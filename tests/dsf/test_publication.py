"""Plugin resources published to the sandbox as one batch of conditional creates."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsf_bridge.dsf.publication import PublicationError, publish, read_resource
from dsf_bridge.errors import ProcessModelError
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
