"""Shared fixtures for tests that need real certificates and a running sandbox FHIR server.

Two organizations, ``Site_A`` (the server's local organization) and ``Site_B`` (remote), with
certificates from one test CA written to a temporary directory; the server listens on a free
loopback port with TLS and required client certificates.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing

from dsf_bridge.dsf.client import FhirClient, RetryPolicy
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.dsf.versions import DSF_2, DsfRelease
from dsf_bridge.dsf.vocabulary import READ_ACCESS_TAG_SYSTEM
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.sandbox.sites import SiteFiles, build_service, init_sandbox


def task_profile(canonical: str, dsf_release: DsfRelease = DSF_2) -> dict[str, Any]:
    """A Task profile ``url|version`` that adds nothing to DSF's base Task profile of
    ``dsf_release``: what a test process needs on a server that validates Tasks, as DSF does."""
    url, _, version = canonical.partition("|")
    return {
        "resourceType": "StructureDefinition",
        "meta": {"tag": [{"system": READ_ACCESS_TAG_SYSTEM, "code": "ALL"}]},
        "url": url,
        "version": version,
        "name": url.rsplit("/", 1)[-1].replace("-", ""),
        "status": "active",
        "kind": "resource",
        "abstract": False,
        "type": "Task",
        "baseDefinition": dsf_release.task_base_profile,
        "derivation": "constraint",
        "differential": {"element": [{"id": "Task", "path": "Task"}]},
    }


@contextlib.contextmanager
def forbidden_reasons() -> Iterator[list[str]]:
    """The reasons the sandbox logs for the 403s it answers meanwhile: DSF's body says only
    ``Operation <op> forbidden``, the why goes to the server's log."""
    reasons: list[str] = []
    with structlog.testing.capture_logs() as logs:
        yield reasons
        reasons.extend(str(e.get("reason")) for e in logs if e.get("event") == "request.forbidden")


LOCAL = "Site_A"
REMOTE = "Site_B"
FAST_RETRY = RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.05, retry_after_cap=0.1)


@dataclass
class Sandbox:
    """A running sandbox server and the files of both sites."""

    ca: CertificateAuthority
    sites: dict[str, SiteFiles]
    server: SandboxServer
    directory: Path

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def context(self, organization: str) -> ssl.SSLContext:
        site = self.sites[organization]
        identity = load_identity(site.client_certificate, site.client_key)
        return build_ssl_context(identity, [site.ca])

    def client(self, organization: str = LOCAL) -> FhirClient:
        return FhirClient(self.base_url, ssl_context=self.context(organization), retry=FAST_RETRY)

    def subscription_id(self, criteria: str = "Task?status=requested") -> str:
        for subscription in self.server.service.store.all("Subscription"):
            if subscription.get("criteria") == criteria:
                return str(subscription["id"])
        raise AssertionError(f"no Subscription {criteria}")


@pytest.fixture
def sandbox_ca() -> CertificateAuthority:
    return CertificateAuthority("dsf-bridge test CA")


@pytest.fixture
def sandbox_sites(tmp_path: Path, sandbox_ca: CertificateAuthority) -> dict[str, SiteFiles]:
    sites = init_sandbox(tmp_path / "sandbox", [LOCAL, REMOTE], ca=sandbox_ca)
    return {site.organization: site for site in sites}


@pytest.fixture
async def sandbox(
    tmp_path: Path, sandbox_ca: CertificateAuthority, sandbox_sites: dict[str, SiteFiles]
) -> AsyncIterator[Sandbox]:
    site = sandbox_sites[LOCAL]
    allow_list: dict[str, Any] = json.loads(site.allow_list.read_text())
    service = build_service(LOCAL, allow_list, site.base_url)
    async with SandboxServer(
        service, certificate=site.server_certificate, key=site.server_key, ca_files=[site.ca]
    ) as server:
        yield Sandbox(sandbox_ca, sandbox_sites, server, tmp_path)
