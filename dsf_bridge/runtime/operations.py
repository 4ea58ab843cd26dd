"""What an operator may do to instances: list incidents, retry one, cancel an instance.

An incident is a job whose retries are used up (Camunda's failed-job incident): it stays
parked at its element, the instance and its other executions go on. An operator gives it new
tries (Camunda's ``setJobRetries``) or cancels the instance (``deleteProcessInstance``; its
Tasks are failed with the reason given).

Requests are checked here, against the stored state, and then queued as an ``operator`` job
in the same store the bridge works from, so they need no connection to a running bridge: the
bridge's job worker applies them in a transaction of their own, with an audit event, as soon
as it runs. A request that no longer applies when it runs (the incident was retried meanwhile,
the instance ended) is recorded in the audit trail and dropped.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from dsf_bridge.engine import state as instance_state
from dsf_bridge.errors import ProcessExecutionError
from dsf_bridge.store import Session as AsyncSession
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import JobKind

__all__ = [
    "OPERATOR_JOB",
    "IncidentListing",
    "list_incidents",
    "request_cancel",
    "request_retry",
]

OPERATOR_JOB = JobKind.OPERATOR
MAX_RETRIES = 100
MAX_REASON = 500


@dataclass(frozen=True, slots=True)
class IncidentListing:
    """One incident, with the instance it belongs to."""

    instance_id: str
    process: str
    token: str
    element: str
    message: str
    at: dt.datetime | None


async def list_incidents(session: AsyncSession) -> list[IncidentListing]:
    """Every incident of every running instance, oldest instance first."""
    rows = await repo.states_with_incidents(session)
    return [
        IncidentListing(instance_id, key, i.token, i.element, i.message, i.at)
        for instance_id, key, state in rows
        for i in instance_state.incidents(state)
    ]


def incident_moment(at: dt.datetime | None) -> str:
    """An incident's moment as the operator's form carries it (ISO 8601; empty when unknown)."""
    return at.isoformat() if at is not None else ""


async def request_retry(
    session: AsyncSession,
    instance_id: str,
    token: str,
    *,
    retries: int,
    actor: str,
    now: dt.datetime,
    seen_at: str | None = None,
) -> int:
    """Queue new tries for the incident at ``token``; returns the job id. ``seen_at``: the
    moment of the incident the operator saw (:func:`incident_moment`); an incident at the same
    token that came back since (another one) is refused, not retried on an old decision."""
    if not 1 <= retries <= MAX_RETRIES:
        raise ProcessExecutionError(f"retries must be between 1 and {MAX_RETRIES}, not {retries}")
    record = await _running(session, instance_id)
    found = {i.token: i for i in instance_state.incidents(record.state)}
    if token not in found:
        raise ProcessExecutionError(
            f"instance {instance_id} has no incident at token {token!r} "
            "(see 'dsf-bridge instances incidents')"
        )
    if seen_at is not None and incident_moment(found[token].at) != seen_at:
        raise ProcessExecutionError(
            f"the incident of instance {instance_id} at token {token!r} is not the one shown "
            f"(that was at {seen_at or 'an unknown time'}, this one at "
            f"{incident_moment(found[token].at) or 'an unknown time'}): open the page again"
        )
    return await repo.enqueue_job(
        session,
        kind=OPERATOR_JOB,
        payload={"op": "retry", "token": token, "retries": retries, "actor": actor},
        due_at=now,
        instance_id=instance_id,
        retries=0,
    )


async def request_cancel(
    session: AsyncSession, instance_id: str, *, reason: str, actor: str, now: dt.datetime
) -> int:
    """Queue the cancellation of a running instance; its Tasks fail with ``reason``."""
    reason = " ".join(reason.split())
    if not reason:
        raise ProcessExecutionError("give a reason: the instance's Tasks are failed with it")
    if len(reason) > MAX_REASON:
        raise ProcessExecutionError(f"the reason is longer than {MAX_REASON} characters")
    await _running(session, instance_id)
    return await repo.enqueue_job(
        session,
        kind=OPERATOR_JOB,
        payload={"op": "cancel", "reason": reason, "actor": actor},
        due_at=now,
        instance_id=instance_id,
        retries=0,
    )


async def _running(session: AsyncSession, instance_id: str) -> repo.InstanceRecord:
    record = await repo.load_instance(session, instance_id)
    if record is None:
        raise ProcessExecutionError(f"no instance {instance_id!r}")
    if not instance_state.is_running(record.state):
        raise ProcessExecutionError(f"instance {instance_id} has already ended ({record.status})")
    return record
