"""Which draft Task starts a process: ``dsf-bridge start PROCESS`` finds the process among the
plugins, and the draft Task (with its profile) among that plugin's FHIR resources.

PROCESS is the process key (``dsfdev_ping``) or its URL (``http://dsf.dev/bpe/Process/ping``,
optionally ``|1.0``). A process may ship several drafts (ping-autostart: start and stop); the
one whose message starts the process is taken unless a message name is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dsf_bridge.dsf.drafts import StartForm, StartFormError
from dsf_bridge.dsf.publication import read_resource
from dsf_bridge.engine import ProcessDefinition, parse_bpmn_file
from dsf_bridge.plugins.api import ProcessPlugin
from dsf_bridge.plugins.loader import process_key

__all__ = ["find_start_form"]


def _message_of(task: dict[str, Any]) -> str | None:
    try:
        return StartForm(task, {}).message_name
    except StartFormError:
        return None


def find_start_form(
    plugins: Sequence[ProcessPlugin],
    process: str,
    *,
    organization: str,
    message: str | None = None,
) -> tuple[ProcessPlugin, ProcessDefinition, StartForm]:
    """The plugin running ``process``, its definition and the form of its draft Task (with
    placeholders replaced for ``organization``); a :class:`StartFormError` saying what exists
    when there is no such process, version or draft."""
    version: str | None = None
    if "://" in process:
        url, _, version = process.partition("|")
        key = process_key(url)
    else:
        key = process
    known: dict[str, ProcessPlugin] = {
        p.key: plugin
        for plugin in plugins
        for path in plugin.bpmn_files
        for p in parse_bpmn_file(path).processes
    }
    plugin = known.get(key)
    if plugin is None:
        raise StartFormError(
            f"unknown process {process!r}; the plugins here run {', '.join(sorted(known))}"
        )
    if version and version != plugin.resource_version:
        raise StartFormError(
            f"process {key} is at version {plugin.resource_version} here, not {version}"
        )
    loaded = plugin.load(organization=organization)
    resources = [read_resource(path, data) for path, data in loaded.resources.get(key, ())]
    drafts = [
        r
        for r in resources
        if r.get("resourceType") == "Task"
        and r.get("status") == "draft"
        and process_key(str(r.get("instantiatesCanonical", ""))) == key
    ]
    definition = loaded.definitions[key]
    if message is None:
        chosen = [d for d in drafts if _message_of(d) in definition.message_starts]
    else:
        chosen = [d for d in drafts if _message_of(d) == message]
    offered = sorted(str(_message_of(d)) for d in drafts)
    if not chosen:
        wanted = f"for message {message!r}" if message else "that starts it"
        raise StartFormError(
            f"process {key} ships no draft Task {wanted}"
            + (f"; its drafts are for {', '.join(offered)}" if offered else "")
        )
    if len(chosen) > 1:
        raise StartFormError(
            f"process {key} has drafts for {', '.join(offered)}: choose one with --message"
        )
    profiles = [r for r in resources if r.get("resourceType") == "StructureDefinition"]
    return plugin, definition, StartForm.from_draft(chosen[0], profiles)
