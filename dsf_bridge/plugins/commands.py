"""The ``dsf-bridge plugins`` command group (registered by :mod:`dsf_bridge.cli`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dsf_bridge.plugins.check import DEFAULT_ORGANIZATION, DEFAULT_VERSION, check_paths

__all__ = ["plugins_app"]

plugins_app = typer.Typer(
    help="Process plugins: check BPMN models and FHIR resources.", no_args_is_help=True
)


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
