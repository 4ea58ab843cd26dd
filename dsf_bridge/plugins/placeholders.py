"""Placeholder substitution in plugin BPMN and FHIR files, as the DSF BPE does it.

``#{version}`` becomes the resource version (``a.b`` of plugin version ``a.b.c.d``), ``#{date}``
the release date, ``#{organization}`` the local organization identifier, and any other
``#{some.property}`` the environment variable ``SOME_PROPERTY`` (dots and dashes become
underscores, letters upper case); ``#{some.property:default}`` takes ``default`` when it is unset
(DSF turns ``#{...}`` into Spring property placeholders). A placeholder that cannot be resolved
is an error naming it, never left in a resource that would then be published with ``#{...}``.

FHIR resources may also carry Spring-style property placeholders with a default,
``${dev.dsf.some.property:default}`` (the DSF allow-list plugin does): they resolve from the
environment (``DEV_DSF_SOME_PROPERTY``), else to the default, else stay as written. They are
replaced in FHIR files only: in BPMN ``${...}`` is a JUEL expression evaluated at run time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from dsf_bridge.errors import ProcessModelError

__all__ = [
    "PlaceholderError",
    "Placeholders",
    "environment_name",
    "resource_version",
]

_PLUGIN_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+)$")
_PLACEHOLDER = re.compile(r"#\{([^}]*)\}")
_PROPERTY = re.compile(r"\$\{([A-Za-z0-9][A-Za-z0-9._-]*)(?::([^}]*))?\}")


class PlaceholderError(ProcessModelError):
    """A plugin version is malformed or a placeholder has no value."""


def resource_version(plugin_version: str) -> str:
    """``1.0.1.0`` -> ``1.0``: the version FHIR resources and process versionTags carry."""
    match = _PLUGIN_VERSION.match(plugin_version)
    if match is None:
        raise PlaceholderError(f"plugin version {plugin_version!r} is not 'a.b.c.d'")
    return f"{match[1]}.{match[2]}"


def environment_name(prop: str) -> str:
    """``some.property`` -> ``SOME_PROPERTY``."""
    return re.sub(r"[.\-]", "_", prop).upper()


@dataclass(frozen=True, slots=True)
class Placeholders:
    """The values placeholders resolve to for one plugin at one site."""

    version: str
    date: str
    organization: str
    environment: Mapping[str, str]

    def value(self, name: str) -> str | None:
        if name == "version":
            return self.version
        if name == "date":
            return self.date
        if name == "organization":
            return self.organization
        return self.environment.get(environment_name(name))

    def replace(self, text: str, *, source: str = "") -> str:
        """Replace every placeholder in ``text``; raise if one has no value."""
        if "#{" not in text:
            return text

        def _sub(match: re.Match[str]) -> str:
            # DSF hands what is left after #{version}, #{date} and #{organization} to Spring as
            # ${...}: "name:default" takes the default when the property is unset.
            name, colon, default = match[1].partition(":")
            value = self.value(name.strip())
            if value is None and colon:
                return default
            if value is None:
                where = f"{source}: " if source else ""
                raise PlaceholderError(
                    f"{where}placeholder #{{{match[1]}}} has no value (set environment variable "
                    f"{environment_name(name.strip())}, or give a default: #{{{name}:...}})"
                )
            return value

        return _PLACEHOLDER.sub(_sub, text)

    def replace_bytes(self, data: bytes, *, source: str = "") -> bytes:
        if b"#{" not in data:
            return data
        return self.replace(data.decode("utf-8"), source=source).encode("utf-8")

    def replace_properties(self, text: str, *, source: str = "") -> str:
        """Replace ``${property:default}`` placeholders (FHIR resources only, see above)."""
        if "${" not in text:
            return text

        def _sub(match: re.Match[str]) -> str:
            value = self.environment.get(environment_name(match[1]))
            if value is not None:
                return value
            if match[2] is not None:
                return match[2]
            # Without value or default the text stays, as Spring's lenient resolver leaves it:
            # build tools fill such templates (the tutorial's templates/bundle.xml is one).
            return match[0]

        return _PROPERTY.sub(_sub, text)

    def replace_fhir_bytes(self, data: bytes, *, source: str = "") -> bytes:
        """All placeholders of a FHIR resource file: ``#{...}`` and ``${property:default}``."""
        if b"#{" not in data and b"${" not in data:
            return data
        text = self.replace(data.decode("utf-8"), source=source)
        return self.replace_properties(text, source=source).encode("utf-8")
