"""``dsf-bridge sandbox``: mint a local DSF test network and serve its FHIR servers.

``sandbox init DIR --org A --org B`` writes a CA, per organization server and client certificates
and a ready ``bridge.toml``, and one allow list (``--parent P --member A=DIC`` adds a parent
organization and its members' OrganizationAffiliations); ``sandbox serve DIR --org A`` serves
A's DSF FHIR server at ``https://127.0.0.1:<port>/fhir`` until interrupted. For tests, demos and
benchmarks.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dsf_bridge.dsf.versions import DSF_RELEASES, DsfRelease, release
from dsf_bridge.errors import BridgeError
from dsf_bridge.sandbox import DEFAULT_BASE_PORT

if TYPE_CHECKING:
    from dsf_bridge.sandbox.sites import SiteFiles

# The commands import the sandbox (certificates, FHIR service, validator) in their bodies:
# `dsf-bridge sandbox --help` needs none of it.

__all__ = ["sandbox_app"]

sandbox_app = typer.Typer(
    help="A local DSF test network: certificates, allow list and DSF-compatible FHIR servers.",
    no_args_is_help=True,
)

DirectoryArgument = Annotated[Path, typer.Argument(help="Directory of the sandbox network.")]
_VERSIONS = "|".join(DSF_RELEASES)


def _release(name: str) -> DsfRelease:
    try:
        return release(name)
    except BridgeError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dsf-version") from exc


def _consortium(parent: str | None, members: list[str]) -> dict[str, dict[str, list[str]]]:
    """``--parent`` and ``--member ORG=ROLE[,ROLE]`` as :func:`init_sandbox` takes them."""
    if parent is None:
        if members:
            raise ValueError("--member needs --parent (the organization it is a member of)")
        return {}
    if not members:
        raise ValueError(f"--parent {parent} needs at least one --member ORG=ROLE[,ROLE]")
    affiliated: dict[str, list[str]] = {}
    for text in members:
        organization, _, roles = text.partition("=")
        codes = [code.strip() for code in roles.split(",") if code.strip()]
        if not organization.strip() or not codes:
            raise ValueError(f"--member {text!r}: expected ORG=ROLE[,ROLE], e.g. Site_1=DIC")
        if organization.strip() in affiliated:
            raise ValueError(f"--member {organization.strip()} is given twice")
        affiliated[organization.strip()] = codes
    return {parent: affiliated}


@sandbox_app.command("init")
def init(
    directory: DirectoryArgument,
    *,
    org: Annotated[
        list[str],
        typer.Option("--org", help="Organization identifier; repeat for each organization."),
    ],
    base_port: Annotated[
        int, typer.Option(help="Port of the first organization's server; the next count up.")
    ] = DEFAULT_BASE_PORT,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing sandbox in DIRECTORY.")
    ] = False,
    dsf_version: Annotated[
        str,
        typer.Option(
            "--dsf-version",
            help=f"DSF version the sites run ({_VERSIONS}): base profiles, status transitions "
            "and rules of that version; 'serve' takes it from here.",
        ),
    ] = "2.1",
    parent: Annotated[
        str | None,
        typer.Option(
            "--parent",
            help="A parent organization (consortium) in the allow list; its members are the "
            "--member options.",
        ),
    ] = None,
    member: Annotated[
        list[str] | None,
        typer.Option(
            "--member",
            help="ORG=ROLE[,ROLE]: an --org that is a member of --parent with DSF "
            "organization-role codes (DIC, HRP, TTP, COS, DMS, ...): an active "
            "OrganizationAffiliation pointing at ORG's Endpoint. Repeat for each member.",
        ),
    ] = None,
) -> None:
    """Mint a CA, per organization server and client certificates, bridge.toml and allow list."""
    from dsf_bridge.dsf.identity import load_identity
    from dsf_bridge.sandbox.sites import init_sandbox

    try:
        consortium = _consortium(parent, member or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--member") from exc
    if (directory / "ca.pem").exists() and not force:
        typer.echo(
            f"{directory} already holds a sandbox (ca.pem); use --force to replace its keys",
            err=True,
        )
        raise typer.Exit(2)
    try:
        sites = init_sandbox(
            directory,
            org,
            base_port=base_port,
            dsf_release=_release(dsf_version),
            consortium=consortium,
        )
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"DSF version: {dsf_version}")
    typer.echo(f"CA: {sites[0].ca}")
    typer.echo(f"allow list: {sites[0].allow_list}")
    for name, affiliated in consortium.items():
        listed = ", ".join(f"{o} ({','.join(r)})" for o, r in affiliated.items())
        typer.echo(f"parent organization {name}: {listed}")
    for site in sites:
        identity = load_identity(site.client_certificate, site.client_key)
        typer.echo(
            f"{site.organization}: {site.base_url} config {site.bridge_config} "
            f"client thumbprint {identity.thumbprint}"
        )


@sandbox_app.command("serve")
def serve(
    directory: DirectoryArgument,
    org: Annotated[str, typer.Option("--org", help="Organization whose server to run.")],
    port: Annotated[
        int | None, typer.Option(help="Port to listen on; default: the one from sandbox init.")
    ] = None,
    dsf_version: Annotated[
        str | None,
        typer.Option(
            "--dsf-version",
            help=f"DSF version to answer as ({_VERSIONS}); default: the one from sandbox init.",
        ),
    ] = None,
) -> None:
    """Serve one organization's DSF FHIR server at https://127.0.0.1:PORT/fhir."""
    import asyncio

    from dsf_bridge.sandbox.sites import sandbox_release

    allow_list_path = directory / "allow-list.json"
    if not allow_list_path.is_file():
        typer.echo(f"{allow_list_path} not found: run 'dsf-bridge sandbox init' first", err=True)
        raise typer.Exit(2)
    allow_list: dict[str, Any] = json.loads(allow_list_path.read_text())
    site = _site(directory, org, allow_list)
    if not site.server_certificate.is_file():
        typer.echo(f"{site.server_certificate} not found: is {org} part of this sandbox?", err=True)
        raise typer.Exit(2)
    try:
        dsf_release = sandbox_release(directory) if dsf_version is None else _release(dsf_version)
    except BridgeError as exc:
        typer.echo(f"{directory / 'sandbox.json'}: {exc}", err=True)
        raise typer.Exit(2) from exc
    asyncio.run(_serve(site, allow_list, port if port is not None else site.port, dsf_release))


def _site(directory: Path, organization: str, allow_list: dict[str, Any]) -> SiteFiles:
    from dsf_bridge.sandbox.sites import SiteFiles

    port = DEFAULT_BASE_PORT
    for entry in allow_list.get("entry") or []:
        resource = entry.get("resource") or {}
        identifiers = {i.get("value") for i in resource.get("identifier") or []}
        if resource.get("resourceType") == "Endpoint" and f"{organization}_Endpoint" in identifiers:
            address = str(resource.get("address", ""))
            with contextlib.suppress(ValueError, IndexError):
                port = int(address.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    return SiteFiles(
        organization,
        directory / organization,
        directory / "ca.pem",
        directory / "allow-list.json",
        port,
    )


async def _serve(
    site: SiteFiles, allow_list: dict[str, Any], port: int, dsf_release: DsfRelease
) -> None:
    import asyncio
    import signal

    from dsf_bridge.sandbox.server import SandboxServer
    from dsf_bridge.sandbox.sites import build_service

    service = build_service(
        site.organization,
        allow_list,
        f"https://127.0.0.1:{port}/fhir",
        dsf_release=dsf_release,
        validate=None,  # validates when DSF's profiles are found, and logs it when not
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    async with SandboxServer(
        service,
        certificate=site.server_certificate,
        key=site.server_key,
        ca_files=[site.ca],
        port=port,
    ) as server:
        typer.echo(
            f"serving {site.organization} at {server.base_url} as DSF "
            f"{dsf_release.software_version} (Ctrl-C stops)",
            err=True,
        )
        await stop.wait()
