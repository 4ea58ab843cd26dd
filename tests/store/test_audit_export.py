"""``dsf-bridge audit export``: the trail as JSON lines a third party can re-hash, and as FHIR R4
AuditEvent resources (IHE BALP) that validate, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent

from dsf_bridge.dsf.audit_events import AUDIT_ACTION_SYSTEM
from dsf_bridge.store import Database, seal_events
from dsf_bridge.store.audit import event_hash
from dsf_bridge.store.owner import bind_store
from tests.runtime.test_send_failures import _run
from tests.served import cli

SITE = "site-a.example.org"


async def _trail(database: Database) -> None:
    """A store bound to its site, with an instance that sent a Task, every event sealed."""
    async with database.transaction() as session:
        await bind_store(session, SITE, actor="bridge")
    status, _, _ = await _run(database, None, absorb=False)
    assert status == "completed"
    async with database.transaction() as session:
        await seal_events(session)


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


async def test_jsonl_holds_every_event_as_the_chain_hashes_it(
    database: Database, migrated_url: str, tmp_path: Path
) -> None:
    await _trail(database)
    out = tmp_path / "trail.jsonl"
    exported = cli("audit", "export", "--out", str(out), "--db-url", migrated_url)
    assert exported.returncode == 0, exported.stderr
    events = _lines(out.read_text())
    assert f"exported {len(events)} audit events to {out}" in exported.stderr
    assert [event["sequence"] for event in events] == list(range(1, len(events) + 1))
    actions = [event["action"] for event in events]
    assert actions[0] == "store.bound" and "task.sent" in actions
    previous = "0" * 64
    for event in events:
        recomputed = event_hash(
            sequence=int(str(event["sequence"])),
            occurred_at=dt.datetime.fromisoformat(str(event["occurred_at"])),
            actor=str(event["actor"]),
            subject=str(event["subject"]),
            action=str(event["action"]),
            reason=str(event["reason"]),
            payload_digest=event["payload_digest"],
            previous_hash=previous,
            record=event["record"],
        )
        assert recomputed == event["event_hash"]
        previous = recomputed


async def test_fhir_audit_events_validate_and_name_the_site_and_the_task(
    database: Database, migrated_url: str
) -> None:
    await _trail(database)
    exported = cli("audit", "export", "--format", "fhir", "--db-url", migrated_url)
    assert exported.returncode == 0, exported.stderr
    resources = _lines(exported.stdout)
    assert resources
    for resource in resources:
        FhirAuditEvent.model_validate(resource)  # raises on an invalid resource
        agent = resource["agent"][0]
        assert agent["who"]["identifier"] == {
            "system": "http://dsf.dev/sid/organization-identifier",
            "value": SITE,
        }
    by_action = {
        next(c["code"] for c in r["subtype"] if c["system"] == AUDIT_ACTION_SYSTEM): r
        for r in resources
    }
    sent = by_action["task.sent"]
    assert sent["type"]["code"] == "rest"
    assert {"system": "http://hl7.org/fhir/restful-interaction", "code": "create"} in sent[
        "subtype"
    ]
    assert sent["action"] == "C" and sent["outcome"] == "0"
    started = by_action["instance.started"]
    assert started["type"]["code"] == "110100"
    [entity] = started["entity"]
    assert entity["what"]["identifier"]["value"].startswith("urn:uuid:")
    details = {d["type"]: d["valueString"] for d in entity["detail"]}
    assert details["sequence"] == "3" and len(details["event_hash"]) == 64
    assert "process_instances/" in details["record"]


async def test_since_keeps_the_later_events(database: Database, migrated_url: str) -> None:
    await _trail(database)
    everything = _lines(cli("audit", "export", "--db-url", migrated_url).stdout)
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).date().isoformat()
    later = cli("audit", "export", "--since", tomorrow, "--db-url", migrated_url)
    assert (later.returncode, later.stdout) == (0, "")
    middle = str(everything[len(everything) // 2]["occurred_at"])
    some = _lines(cli("audit", "export", "--since", middle, "--db-url", migrated_url).stdout)
    assert 0 < len(some) < len(everything)
    assert all(str(e["occurred_at"]) >= middle for e in some)
    bad = cli("audit", "export", "--since", "last week", "--db-url", migrated_url)
    assert bad.returncode == 2
    assert "no ISO 8601 date or time" in bad.stderr
