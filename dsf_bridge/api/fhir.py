"""The Task as the FHIR server has it: what the lists show when the API can ask the server.

Beside a running bridge the admin API reads the Tasks it lists from the site's own DSF FHIR
server (the Tasks taken in live there) over the bridge's mutual-TLS client, so a page shows the
server's status, not the bridge's last record of it. A page asks for at most a page of Tasks,
a few at a time, and waits :data:`READ_TIMEOUT` seconds at most: a Task not read by then, or
that the server refuses, shows what the store knows, labelled as such.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dsf_bridge.dsf.tasks import ERROR, read_message, requester_label
from dsf_bridge.dsf.vocabulary import BPMN_MESSAGE_SYSTEM
from dsf_bridge.errors import BridgeError

__all__ = ["READ_TIMEOUT", "ServerTask", "TaskReader", "server_task"]

READ_TIMEOUT = 3.0
_CONCURRENT_READS = 8

ReadTask = Callable[[str], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True)
class ServerTask:
    """A Task as read from the FHIR server: its status, requester, message and error."""

    status: str
    requester: str
    message_name: str | None
    failure: str | None


def server_task(task: Mapping[str, Any]) -> ServerTask:
    """The facts of a Task resource (an unreadable message name is left out)."""
    try:
        message: str | None = read_message(task).message_name
    except BridgeError:
        message = None
    errors = [
        str(output.get("valueString"))
        for output in task.get("output") or []
        if any(
            coding.get("system") == BPMN_MESSAGE_SYSTEM and coding.get("code") == ERROR
            for coding in (output.get("type") or {}).get("coding") or []
        )
        and output.get("valueString")
    ]
    return ServerTask(
        status=str(task.get("status") or "unknown"),
        requester=requester_label(task),
        message_name=message,
        failure="; ".join(errors) or None,
    )


class TaskReader:
    """Reads Tasks from the local FHIR server with ``read`` (``FhirClient.read`` bound to
    ``"Task"``), a few at a time, within :data:`READ_TIMEOUT` seconds."""

    def __init__(self, read: ReadTask, *, timeout: float = READ_TIMEOUT) -> None:
        self._read = read
        self._timeout = timeout

    async def read_many(self, task_ids: Iterable[str]) -> dict[str, ServerTask | str]:
        """Each Task by id, or why it could not be read (a sentence for the page)."""
        ids = list(dict.fromkeys(task_ids))
        gate = asyncio.Semaphore(_CONCURRENT_READS)

        async def one(task_id: str) -> ServerTask | str:
            async with gate:
                try:
                    return server_task(await self._read(task_id))
                except BridgeError as exc:
                    return f"not read from the FHIR server: {exc}"

        tasks = {task_id: asyncio.ensure_future(one(task_id)) for task_id in ids}
        if tasks:
            await asyncio.wait(tasks.values(), timeout=self._timeout)
        found: dict[str, ServerTask | str] = {}
        for task_id, task in tasks.items():
            if task.done():
                found[task_id] = task.result()
            else:
                task.cancel()
                found[task_id] = f"no answer from the FHIR server within {self._timeout:g} s"
        return found
