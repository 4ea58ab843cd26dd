"""The DSF releases the bridge speaks to, and what differs between them on the wire.

The MII network runs DSF 2.x since January 2026; some sites still run 1.9. The wire protocol is
the same; what differs (from the DSF sources, ``TaskAuthorizationRule`` and the validation
resources of tags v1.9.0 and 2.1.0):

- the base Task profile: ``task-base|1.0.0`` on 1.x, ``task`` (profiles at 2.0.0) on 2.x, which
  deleted ``task-base``;
- the status transitions of Tasks: 2.x allows ``in-progress`` -> ``in-progress`` (a Task's
  outputs written while it runs), 1.x does not.

A bridge learns the version from the server's CapabilityStatement (``software.version``), never
from its own configuration, so it cannot be told something wrong about its server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsf_bridge.errors import BridgeError

if TYPE_CHECKING:  # the HTTP client only to ask a server; `dsf-bridge version` needs none
    from dsf_bridge.dsf.client import FhirClient

__all__ = [
    "DSF_1",
    "DSF_2",
    "DSF_RELEASES",
    "DsfRelease",
    "UnknownDsfVersionError",
    "release",
    "release_of_capability_statement",
    "release_of_software_version",
    "server_release",
]


class UnknownDsfVersionError(BridgeError):
    """The FHIR server names no DSF version the bridge knows."""


@dataclass(frozen=True)
class DsfRelease:
    """One DSF release line as the bridge and the sandbox need to know it."""

    name: str  # "2.1", "1.9": what ``--dsf-version`` takes
    software_version: str  # what the server's CapabilityStatement says
    major: int
    task_base_profile: str
    task_base_version: str

    @property
    def task_base_canonical(self) -> str:
        return f"{self.task_base_profile}|{self.task_base_version}"

    @property
    def allows_in_progress_update(self) -> bool:
        """Whether a running Task may be updated (``in-progress`` -> ``in-progress``)."""
        return self.major >= 2


DSF_2 = DsfRelease(
    name="2.1",
    software_version="2.1.0",
    major=2,
    task_base_profile="http://dsf.dev/fhir/StructureDefinition/task",
    task_base_version="2.1.0",
)
DSF_1 = DsfRelease(
    name="1.9",
    software_version="1.9.0",
    major=1,
    task_base_profile="http://dsf.dev/fhir/StructureDefinition/task-base",
    task_base_version="1.0.0",
)
DSF_RELEASES: Mapping[str, DsfRelease] = {r.name: r for r in (DSF_2, DSF_1)}

# DSF writes "2.1.0 (main/9a986fc)": project version, then branch and commit.
_VERSION = re.compile(r"^\s*(?P<major>\d+)\.(?P<minor>\d+)\b")


def release(name: str) -> DsfRelease:
    """The release ``name`` (``2.1`` or ``1.9``), else a clear error listing the known ones."""
    try:
        return DSF_RELEASES[name]
    except KeyError:
        known = ", ".join(DSF_RELEASES)
        raise UnknownDsfVersionError(
            f"unknown DSF version {name!r}; known: {known}", retryable=False
        ) from None


def release_of_software_version(version: str) -> DsfRelease:
    """The release line a server's ``software.version`` (``2.1.0 (main/9a986fc)``,
    ``1.9.0``, ``2.0.2-SNAPSHOT``) belongs to: 1.x or 2.x."""
    match = _VERSION.match(version)
    if match is None:
        raise UnknownDsfVersionError(
            f"the FHIR server reports software.version {version!r}, not a DSF version",
            retryable=False,
        )
    major = int(match.group("major"))
    if major == 1:
        return DSF_1
    if major == 2:
        return DSF_2
    raise UnknownDsfVersionError(
        f"the FHIR server runs DSF {version}; this bridge speaks DSF 1.x and 2.x",
        retryable=False,
    )


def release_of_capability_statement(statement: Mapping[str, Any]) -> DsfRelease:
    """The release of the server whose ``GET metadata`` answered ``statement``."""
    software = statement.get("software")
    version = software.get("version") if isinstance(software, Mapping) else None
    if not isinstance(version, str) or not version.strip():
        raise UnknownDsfVersionError(
            "the FHIR server's CapabilityStatement names no software.version; a DSF FHIR "
            "server always does (is the configured fhir_base_url a DSF FHIR server?)",
            retryable=False,
        )
    return release_of_software_version(version)


async def server_release(client: FhirClient) -> DsfRelease:
    """Ask the FHIR server (``GET metadata``) which DSF release it runs."""
    response = await client.request("GET", "metadata")
    try:
        statement = response.json()
    except ValueError as exc:
        raise UnknownDsfVersionError(
            f"{client.base_url}/metadata answered no JSON CapabilityStatement", retryable=False
        ) from exc
    if not isinstance(statement, Mapping):
        raise UnknownDsfVersionError(
            f"{client.base_url}/metadata answered no CapabilityStatement", retryable=False
        )
    return release_of_capability_statement(statement)
