"""Finding plugins: Python entry points, and folders of BPMN and FHIR files.

Installed plugins declare an entry point in the group ``dsf_bridge.plugins``::

    [project.entry-points."dsf_bridge.plugins"]
    hello = "example_hello.plugin:plugin"

The object is a :class:`~dsf_bridge.plugins.api.ProcessPlugin` or a callable returning one.

A folder laid out like a DSF plugin's resources (``bpe/*.bpmn``, ``fhir/<Type>/*.xml|json``,
any depth) becomes a plugin with :func:`plugin_from_folder`. An ActivityDefinition belongs to
the process its ``url`` names (``http://<domain>/bpe/Process/<name>`` ->
``<domainWithoutDots>_<name>``); every other resource is published with each process, as the
Java plugins' ``getFhirResourcesByProcessId`` lists usually do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import date
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from dsf_bridge.engine import parse_bpmn_file
from dsf_bridge.engine.safexml import parse_xml
from dsf_bridge.errors import BridgeError, ProcessModelError
from dsf_bridge.plugins.api import ProcessPlugin
from dsf_bridge.plugins.registry import HandlerRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "as_plugin",
    "discover_plugins",
    "load_entry_point",
    "plugin_from_folder",
    "process_key",
]

ENTRY_POINT_GROUP = "dsf_bridge.plugins"
_FHIR_NS = "{http://hl7.org/fhir}"
_PROCESS_URL = re.compile(r"^https?://([^/]+)/bpe/Process/([-a-zA-Z0-9]+)$")


def process_key(canonical_url: str) -> str:
    """``http://dsf.dev/bpe/Process/ping`` -> ``dsfdev_ping`` (a version suffix is ignored)."""
    match = _PROCESS_URL.match(canonical_url.split("|", 1)[0])
    if match is None:
        raise ProcessModelError(f"{canonical_url!r} is not http(s)://<domain>/bpe/Process/<name>")
    return f"{match[1].replace('.', '')}_{match[2]}"


def as_plugin(loaded: object, label: str) -> ProcessPlugin:
    """What an entry point names, a :class:`ProcessPlugin` or a callable returning one, as the
    plugin; ``label`` names the entry point in the error."""
    if not isinstance(loaded, ProcessPlugin) and callable(loaded):
        factory: Callable[[], object] = loaded
        loaded = factory()
    if not isinstance(loaded, ProcessPlugin):
        raise ProcessModelError(f"{label} is {type(loaded).__name__}, not a ProcessPlugin")
    return loaded


def load_entry_point(entry_point: EntryPoint, where: str = "") -> ProcessPlugin:
    """Import an entry point of the group and return its plugin; any failure of the import is
    a :class:`ProcessModelError` naming it (``where`` says where it was declared)."""
    label = f"{where}plugin entry point {entry_point.name!r}"
    try:
        loaded: object = entry_point.load()
    except (Exception, SystemExit) as exc:  # a plugin's import may raise anything
        raise ProcessModelError(
            f"{label} ({entry_point.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    return as_plugin(loaded, label)


def discover_plugins() -> list[ProcessPlugin]:
    """Load every plugin registered under the entry point group, sorted by name."""
    plugins = [load_entry_point(ep) for ep in entry_points(group=ENTRY_POINT_GROUP)]
    names = [plugin.name for plugin in plugins]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ProcessModelError(f"plugins registered twice: {', '.join(duplicates)}")
    return sorted(plugins, key=lambda plugin: plugin.name)


def _fhir_type_and_url(path: Path) -> tuple[str, str | None] | None:
    data = path.read_bytes()
    try:
        if path.suffix.lower() == ".json":
            parsed = json.loads(data)
            if not isinstance(parsed, dict) or not isinstance(parsed.get("resourceType"), str):
                return None
            url = parsed.get("url")
            return parsed["resourceType"], url if isinstance(url, str) else None
        root = parse_xml(data, str(path))
    except (ValueError, BridgeError):
        return None
    tag: object = root.tag
    if not isinstance(tag, str) or not tag.startswith(_FHIR_NS):
        return None
    url_element = root.find(_FHIR_NS + "url")
    url = url_element.get("value") if url_element is not None else None
    return tag[len(_FHIR_NS) :], url


def plugin_from_folder(
    folder: Path,
    *,
    name: str,
    version: str,
    release_date: date,
    handlers: HandlerRegistry | None = None,
) -> ProcessPlugin:
    """Build a plugin from the BPMN and FHIR files found under ``folder``."""
    if not folder.is_dir():
        raise ProcessModelError(f"plugin folder {folder} does not exist")
    bpmn_files = tuple(sorted(folder.rglob("*.bpmn")))
    keys = [process.key for path in bpmn_files for process in parse_bpmn_file(path).processes]
    by_process: dict[str, list[Path]] = {key: [] for key in keys}
    shared: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in (".xml", ".json") or not path.is_file():
            continue
        found = _fhir_type_and_url(path)
        if found is None:
            continue
        resource_type, url = found
        if resource_type == "ActivityDefinition" and url is not None:
            key = process_key(url)
            if key not in by_process:
                raise ProcessModelError(f"{path}: ActivityDefinition for unknown process {key!r}")
            by_process[key].append(path)
        else:
            shared.append(path)
    resources = {key: tuple(paths + shared) for key, paths in by_process.items()}
    return ProcessPlugin(
        name=name,
        version=version,
        release_date=release_date,
        bpmn_files=bpmn_files,
        fhir_resources=resources,
        handlers=handlers or HandlerRegistry(),
    )
