"""The processes a bridge has deployed: every version of each, the newest per process key, and
which deployed definition a running instance belongs to.

Instances started on version 1.0 finish on 1.0 after 1.1 arrives; a new start without a
version gets the newest (DSF's rule for ``instantiatesCanonical`` without a version).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

from dsf_bridge.engine.model import EventKind, NodeKind, ProcessDefinition
from dsf_bridge.errors import ProcessExecutionError
from dsf_bridge.plugins.registry import HandlerRegistry
from dsf_bridge.store import Database, append_event
from dsf_bridge.store import repository as repo

__all__ = ["DeployedProcess", "Deployments"]

# How many instances' definitions are remembered, so that a job needs no extra round trip.
_REMEMBERED_INSTANCES = 10_000


@dataclass(frozen=True)
class DeployedProcess:
    definition: ProcessDefinition
    handlers: HandlerRegistry
    definition_id: int
    plugin: str

    @property
    def audited_process(self) -> str:
        """``key|version`` as the store records the definition (``process_definitions``)."""
        return f"{self.definition.key}|{self.definition.version_tag or ''}"

    @cached_property
    def caught_signals(self) -> frozenset[str]:
        """Names of the signals the model catches (intermediate and boundary events)."""
        return frozenset(
            node.signal_name
            for node in self.definition.nodes.values()
            if node.event is EventKind.SIGNAL
            and node.signal_name
            and node.kind in (NodeKind.INTERMEDIATE_CATCH_EVENT, NodeKind.BOUNDARY_EVENT)
        )


class Deployments:
    """The deployed processes of one runtime, recorded in the store as they are deployed."""

    def __init__(self, database: Database, owner: str) -> None:
        self.database = database
        self.owner = owner
        self._by_key: dict[str, DeployedProcess] = {}
        self._by_version: dict[tuple[str, str], DeployedProcess] = {}
        self._by_id: dict[int, DeployedProcess] = {}
        self._definitions: OrderedDict[str, int] = OrderedDict()

    async def deploy(
        self,
        definition: ProcessDefinition,
        handlers: HandlerRegistry,
        *,
        plugin: str,
        model_hash: str,
    ) -> DeployedProcess:
        """Record a process definition and make it startable; its handlers must all exist."""
        missing = handlers.missing([definition])
        if missing:
            raise ProcessExecutionError(
                f"process {definition.key!r} uses handlers that plugin {plugin!r} does not "
                f"register: {', '.join(missing)}"
            )
        async with self.database.transaction() as session:
            definition_id = await repo.deploy_definition(
                session,
                process_key=definition.key,
                version=definition.version_tag or "",
                plugin=plugin,
                model_hash=model_hash,
            )
            await append_event(
                session,
                actor=self.owner,
                subject=f"ProcessDefinition/{definition.key}|{definition.version_tag}",
                action="process.deployed",
                reason=f"plugin {plugin}",
                payload=model_hash,
            )
        deployed = DeployedProcess(definition, handlers, definition_id, plugin)
        version = definition.version_tag or ""
        self._by_version[(definition.key, version)] = deployed
        newest = self._by_key.get(definition.key)
        if newest is None or _version_order(version) >= _version_order(
            newest.definition.version_tag or ""
        ):
            self._by_key[definition.key] = deployed
        self._by_id[definition_id] = deployed
        return deployed

    def process(self, process_key: str, version: str | None = None) -> DeployedProcess | None:
        """The deployed ``version`` of a process (as in a Task's ``instantiatesCanonical``),
        or its newest one when no version is given."""
        if version is None:
            return self._by_key.get(process_key)
        return self._by_version.get((process_key, version))

    def versions(self, process_key: str) -> list[str]:
        """The deployed versions of a process, oldest first."""
        found = [v for (key, v) in self._by_version if key == process_key]
        return sorted(found, key=_version_order)

    def catching(self, signal_name: str) -> list[int]:
        """The ids of the deployed definitions that catch ``signal_name``."""
        return [
            definition_id
            for definition_id, deployed in self._by_id.items()
            if signal_name in deployed.caught_signals
        ]

    def of_record(self, record: repo.InstanceRecord) -> DeployedProcess:
        """The deployed definition of a stored instance."""
        deployed = self._by_id.get(record.definition_id)
        if deployed is None:
            raise ProcessExecutionError(
                f"instance {record.id} belongs to process definition {record.definition_id}, "
                "which is not deployed in this bridge"
            )
        self.remember(record.id, record.definition_id)
        return deployed

    def remember(self, instance_id: str, definition_id: int) -> None:
        """An instance's definition never changes: remember it (boundedly) so that running a
        job needs no extra round trip to the store."""
        self._definitions[instance_id] = definition_id
        self._definitions.move_to_end(instance_id)
        while len(self._definitions) > _REMEMBERED_INSTANCES:
            self._definitions.popitem(last=False)

    async def of_instance(self, instance_id: str) -> DeployedProcess:
        """The deployed definition of an instance, from memory or from the store."""
        known = self._definitions.get(instance_id)
        if known is not None and known in self._by_id:
            return self._by_id[known]
        async with self.database.transaction() as session:
            record = await repo.load_instance(session, instance_id)
        if record is None:
            raise ProcessExecutionError(f"instance {instance_id} does not exist")
        return self.of_record(record)


def _version_order(version: str) -> tuple[tuple[int, str], ...]:
    """``1.10`` after ``1.9``: versions compare part by part, numbers as numbers."""
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in version.split("."))
