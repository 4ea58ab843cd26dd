"""Loading reference models for engine tests: placeholders replaced, parsed and validated."""

from __future__ import annotations

from dsf_bridge.engine import ProcessDefinition, load_process
from dsf_bridge.plugins.placeholders import Placeholders
from tests.reference import reference_file

__all__ = ["PING_PONG", "load_reference"]

PING_PONG = "dsf-process-ping-pong/src/main/resources/bpe/"

_PLACEHOLDERS = Placeholders(
    version="1.0", date="2026-01-01", organization="dic.example.org", environment={}
)


def load_reference(relative: str, *, version: str = "1.0") -> ProcessDefinition:
    path = reference_file(relative)
    values = Placeholders(version, _PLACEHOLDERS.date, _PLACEHOLDERS.organization, {})
    data = values.replace_bytes(path.read_bytes(), source=str(path))
    return load_process(data, str(path), resource_version=version)
