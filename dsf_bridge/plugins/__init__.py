"""The process plugin API (how BPMN service tasks find Python handlers) and the plugins we ship.

- :mod:`~dsf_bridge.plugins.api`: :class:`ProcessPlugin`, what a plugin is;
- :mod:`~dsf_bridge.plugins.registry`: :class:`HandlerRegistry` and the handler contexts;
- :mod:`~dsf_bridge.plugins.placeholders`: ``#{version}``, ``#{date}``, ``#{organization}``...;
- :mod:`~dsf_bridge.plugins.loader`: entry points and plugin folders;
- :mod:`~dsf_bridge.plugins.check`: ``dsf-bridge plugins check``.

Plugin tests run on the real runtime: :mod:`dsf_bridge.runtime.testing`.
"""

from __future__ import annotations

from dsf_bridge.plugins.api import LoadedPlugin, ProcessPlugin
from dsf_bridge.plugins.loader import ENTRY_POINT_GROUP, discover_plugins, plugin_from_folder
from dsf_bridge.plugins.placeholders import Placeholders, resource_version
from dsf_bridge.plugins.registry import BpmnError, HandlerContext, HandlerRegistry, SendContext

__all__ = [
    "ENTRY_POINT_GROUP",
    "BpmnError",
    "HandlerContext",
    "HandlerRegistry",
    "LoadedPlugin",
    "Placeholders",
    "ProcessPlugin",
    "SendContext",
    "discover_plugins",
    "plugin_from_folder",
    "resource_version",
]
