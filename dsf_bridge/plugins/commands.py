"""The ``dsf-bridge plugins`` command group (registered by :mod:`dsf_bridge.cli`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dsf_bridge.config import load_settings
from dsf_bridge.errors import BridgeError, ConfigError
from dsf_bridge.logs import configure_logging
from dsf_bridge.plugins.check import DEFAULT_ORGANIZATION, DEFAULT_VERSION, check_paths
from dsf_bridge.plugins.dropin import site_plugins

__all__ = ["plugins_app"]

plugins_app = typer.Typer(
    help="Process plugins: list them, check BPMN models and FHIR resources.",
    no_args_is_help=True,
)


@plugins_app.command("list")
def list_plugins(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML configuration file ([plugins] folder); default: DSF_BRIDGE_CONFIG.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """List the plugins the bridge would run: installed ones and the drop-ins of [plugins]
    folder, with the processes of each; drop-ins that fail their checks are listed with the
    reason (exit 1)."""
    try:
        settings = load_settings(config or ctx.find_root().params.get("config"))
    except ConfigError as exc:
        typer.echo(f"dsf-bridge: configuration error: {exc}", err=True)
        raise typer.Exit(2) from exc
    configure_logging("critical", settings.log.format)  # the listing itself names rejections
    try:
        plugins, dropins = site_plugins(settings.plugins.folder)
        rows = [
            {
                "name": plugin.name,
                "version": plugin.version,
                "source": str(dropins.sources[plugin.name])
                if dropins is not None and plugin.name in dropins.sources
                else "installed",
                "processes": sorted(plugin.load(organization=DEFAULT_ORGANIZATION).definitions),
            }
            for plugin in plugins
        ]
    except BridgeError as exc:
        typer.echo(f"dsf-bridge: {exc}", err=True)
        raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from exc
    rejected = [
        {"source": str(r.source), "reason": r.reason} for r in (dropins.rejected if dropins else [])
    ]
    if json_output:
        typer.echo(json.dumps({"plugins": rows, "rejected": rejected}, indent=2))
    else:
        for row in rows:
            typer.echo(
                f"{row['name']} {row['version']} ({row['source']}): {', '.join(row['processes'])}"
            )
        for item in rejected:
            typer.echo(f"REJECTED {item['source']}: {item['reason']}")
    raise typer.Exit(1 if rejected else 0)


@plugins_app.command("check")
def check(
    paths: Annotated[
        list[Path],
        typer.Argument(help="BPMN files, FHIR resource files (XML/JSON) or folders.", exists=True),
    ],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON report instead of lines.")
    ] = False,
    version: Annotated[
        str,
        typer.Option("--version", help="Resource version (a.b) for #{version} and versionTag."),
    ] = DEFAULT_VERSION,
    date: Annotated[
        str | None,
        typer.Option(
            "--date", help="Release date for #{date} (default: today).", show_default=False
        ),
    ] = None,
    organization: Annotated[
        str, typer.Option("--organization", help="Organization identifier for #{organization}.")
    ] = DEFAULT_ORGANIZATION,
) -> None:
    """Validate each file; print one line per file; exit 0 only if every file is valid."""
    report = check_paths(paths, version=version, date=date, organization=organization)
    if json_output:
        typer.echo(json.dumps(report.as_json(), indent=2))
    else:
        for file_report in report.files:
            typer.echo(file_report.line())
        invalid = sum(1 for file_report in report.files if not file_report.valid)
        typer.echo(f"{len(report.files)} checked, {invalid} invalid, {len(report.skipped)} skipped")
    raise typer.Exit(0 if report.ok else 1)
