"""The process plugin API: what a plugin is, and how it is turned into runnable definitions.

A plugin has a name, a version ``a.b.c.d`` (``a.b`` is the resource version on the wire and in
every ``camunda:versionTag``), a release date, its BPMN files, its FHIR resource files per
process, and a :class:`~dsf_bridge.plugins.registry.HandlerRegistry` for the ``camunda:class``
names its models use::

    handlers = HandlerRegistry()

    @handlers.service("org.example.process.service.Hello")
    def hello(ctx: HandlerContext) -> None:
        ctx.set("greeting", "hello")

    plugin = ProcessPlugin(
        name="example-hello",
        version="1.0.0.0",
        release_date=date(2026, 1, 1),
        bpmn_files=(HERE / "bpe/hello.bpmn",),
        fhir_resources={"exampleorg_hello": (HERE / "fhir/ActivityDefinition/hello.xml",)},
        handlers=handlers,
    )

Expose it through the entry point group ``dsf_bridge.plugins`` (see
:mod:`dsf_bridge.plugins.loader`). :meth:`ProcessPlugin.load` replaces placeholders, parses and
validates every model, and refuses a plugin whose models name a handler it does not register.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import structlog

from dsf_bridge.engine import ProcessDefinition, load_process
from dsf_bridge.errors import ProcessModelError
from dsf_bridge.plugins.placeholders import Placeholders, resource_version
from dsf_bridge.plugins.registry import HandlerRegistry

__all__ = [
    "LoadedPlugin",
    "ProcessPlugin",
    "Progress",
    "progress_of",
    "resources_per_process",
]

_log = structlog.get_logger("dsf_bridge.plugins")

#: What a plugin shows of one of its instances, beyond the engine's state: rows of a table
#: (e.g. one per site with its state), from the process key and the process variables; None
#: when it has nothing to show for that process.
Progress = Callable[[str, Mapping[str, Any]], list[dict[str, Any]] | None]


@dataclass(frozen=True)
class LoadedPlugin:
    """A plugin ready to run: definitions by process key and FHIR resources by process key,
    placeholders replaced."""

    plugin: ProcessPlugin
    definitions: Mapping[str, ProcessDefinition]
    resources: Mapping[str, tuple[tuple[Path, bytes], ...]]


@dataclass(frozen=True)
class ProcessPlugin:
    """A process plugin: models, resources and the Python handlers behind them."""

    name: str
    version: str
    release_date: date
    bpmn_files: tuple[Path, ...]
    fhir_resources: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    handlers: HandlerRegistry = field(default_factory=HandlerRegistry)
    progress: Progress | None = None

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ProcessModelError("plugin name must not be blank")
        resource_version(self.version)  # raises for anything but a.b.c.d
        if not self.bpmn_files:
            raise ProcessModelError(f"plugin {self.name!r} has no BPMN files")

    @property
    def resource_version(self) -> str:
        return resource_version(self.version)

    def placeholders(
        self, organization: str, environment: Mapping[str, str] | None = None
    ) -> Placeholders:
        return Placeholders(
            version=self.resource_version,
            date=self.release_date.isoformat(),
            organization=organization,
            environment=dict(os.environ) if environment is None else environment,
        )

    def load(
        self, *, organization: str, environment: Mapping[str, str] | None = None
    ) -> LoadedPlugin:
        """Replace placeholders, parse and validate models, check handlers and resources."""
        values = self.placeholders(organization, environment)
        definitions: dict[str, ProcessDefinition] = {}
        for path in self.bpmn_files:
            data = values.replace_bytes(path.read_bytes(), source=str(path))
            definition = load_process(data, str(path), resource_version=self.resource_version)
            if definition.key in definitions:
                raise ProcessModelError(
                    f"plugin {self.name!r}: process {definition.key!r} is defined twice"
                )
            definitions[definition.key] = definition
        unknown = sorted(set(self.fhir_resources) - set(definitions))
        if unknown:
            raise ProcessModelError(
                f"plugin {self.name!r}: FHIR resources for unknown processes {', '.join(unknown)}"
            )
        missing = self.handlers.missing(definitions.values())
        if missing:
            raise ProcessModelError(
                f"plugin {self.name!r}: no handler registered for {', '.join(missing)}"
            )
        resources = {
            key: tuple(
                (path, values.replace_fhir_bytes(path.read_bytes(), source=str(path)))
                for path in paths
            )
            for key, paths in self.fhir_resources.items()
        }
        return LoadedPlugin(self, definitions, resources)


def progress_of(
    plugins: Iterable[ProcessPlugin], process_key: str, variables: Mapping[str, Any]
) -> list[dict[str, Any]] | None:
    """The progress rows the first plugin that knows ``process_key`` shows for an instance
    (the instance page and ``dsf-bridge instances show``); None if none shows any. A plugin
    whose hook fails shows nothing: a page must not break on one instance's variables."""
    for plugin in plugins:
        if plugin.progress is None:
            continue
        try:
            rows = plugin.progress(process_key, variables)
        except Exception as exc:  # a broken hook hides its rows, never the page
            _log.warning("plugin.progress_failed", plugin=plugin.name, error=repr(exc))
            continue
        if rows is not None:
            return rows
    return None


def resources_per_process(
    folder: Path, activity_definitions: Mapping[str, str]
) -> dict[str, tuple[Path, ...]]:
    """A plugin's FHIR resources by process key, from a folder laid out as DSF plugins lay
    theirs out: ``ActivityDefinition/<file>`` per process (``activity_definitions``: process
    key -> file name), every other ``*.json`` below ``folder`` shared by all processes."""
    shared = tuple(
        sorted(path for path in folder.rglob("*.json") if path.parent.name != "ActivityDefinition")
    )
    return {
        process: (folder / "ActivityDefinition" / name, *shared)
        for process, name in activity_definitions.items()
    }
