"""A whole sandbox DSF network in one event loop: every organization's FHIR server running at
once, as ``sandbox init`` plus one ``sandbox serve`` per organization would, for tests of
Tasks travelling between sites and for the demo.

Ports are picked free on loopback before the certificates and ``bridge.toml`` files are written,
so every site's configuration and the allow list's Endpoint addresses name the real servers.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsf_bridge.dsf.versions import DSF_2, DsfRelease
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.sandbox.sites import SiteFiles, build_service, init_sandbox

__all__ = ["SandboxNetwork"]


def _free_ports(count: int) -> list[int]:
    # Hold all probes open together so the ports differ; a small race with other processes
    # remains, acceptable on a test machine's loopback.
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


class SandboxNetwork:
    """``async with SandboxNetwork(directory, ["A", "B"]) as network:`` serves A and B, each
    answering as the DSF FHIR server of ``dsf_release`` does."""

    def __init__(
        self,
        directory: Path,
        organizations: Sequence[str],
        *,
        ca: CertificateAuthority | None = None,
        dsf_release: DsfRelease = DSF_2,
    ) -> None:
        self.directory = directory
        self.dsf_release = dsf_release
        self.organizations = list(organizations)
        self.ca = ca or CertificateAuthority()
        self.sites: dict[str, SiteFiles] = {}
        self.servers: dict[str, SandboxServer] = {}
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> SandboxNetwork:
        ports = _free_ports(len(self.organizations))
        sites = init_sandbox(
            self.directory,
            self.organizations,
            ports=ports,
            ca=self.ca,
            dsf_release=self.dsf_release,
        )
        self.sites = {site.organization: site for site in sites}
        allow_list: dict[str, Any] = json.loads(sites[0].allow_list.read_text())
        try:
            for site in sites:
                service = build_service(
                    site.organization, allow_list, site.base_url, dsf_release=self.dsf_release
                )
                server = SandboxServer(
                    service,
                    certificate=site.server_certificate,
                    key=site.server_key,
                    ca_files=[site.ca],
                    port=site.port,
                )
                self.servers[site.organization] = await self._stack.enter_async_context(server)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    def base_url(self, organization: str) -> str:
        return self.servers[organization].base_url
