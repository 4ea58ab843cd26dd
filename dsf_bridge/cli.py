"""The ``dsf-bridge`` command line: the composition root of every command.

Each command builds its settings from the configuration file, the environment and its own flags
(in that order of increasing precedence), so ``--db-url`` beats ``DSF_BRIDGE_DB__URL`` beats
``[db] url`` in the file. ``--config`` may come before the command or after it, with the same
meaning. Exit codes: 0 success, 1 the check or operation failed, 2 bad usage or configuration.

Every command imports what it uses in its body, and the ``plugins`` and ``sandbox`` groups are
imported only when one of their commands runs: ``dsf-bridge --help`` loads typer and this
module, not the engine, the store, FastAPI or the sandbox (``bench/cli.py`` times it).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import typer
from typer.core import TyperGroup

from dsf_bridge import __version__
from dsf_bridge.errors import BridgeError, ConfigError, MigrationError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dsf_bridge.api import Probe
    from dsf_bridge.config import Settings
    from dsf_bridge.dsf.client import FhirClient
    from dsf_bridge.dsf.organization import LocalOrganization
    from dsf_bridge.dsf.subscription import TaskSubscription
    from dsf_bridge.plugins.api import ProcessPlugin
    from dsf_bridge.store import queries

__all__ = ["app", "main"]

EXIT_FAILED = 1
EXIT_USAGE = 2


class _LazyGroup(TyperGroup):
    """A command group whose module is imported only when it is used: the root ``--help``
    lists it from the help given here, without importing what its commands need."""

    target: ClassVar[str] = ""  # "module:attribute" of the typer.Typer with the commands

    @functools.cached_property
    def _group(self) -> TyperGroup:
        module, _, attribute = self.target.partition(":")
        return typer.main.get_group(getattr(importlib.import_module(module), attribute))

    def list_commands(self, ctx: Any) -> list[str]:
        return self._group.list_commands(ctx)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        return self._group.get_command(ctx, cmd_name)


class _PluginsGroup(_LazyGroup):
    target = "dsf_bridge.plugins.commands:plugins_app"


class _SandboxGroup(_LazyGroup):
    target = "dsf_bridge.sandbox.commands:sandbox_app"


app = typer.Typer(
    name="dsf-bridge",
    help="A Python business process engine for the Data Sharing Framework (DSF).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
db_app = typer.Typer(help="Create, migrate and back up the SQL store.", no_args_is_help=True)
audit_app = typer.Typer(help="Check and export the audit trail.", no_args_is_help=True)
api_app = typer.Typer(
    help="The admin HTTP API and web page (health, readiness, metrics, audit).",
    no_args_is_help=True,
)
instances_app = typer.Typer(
    help="Process instances: list and show them, their incidents; retry one, cancel one.",
    no_args_is_help=True,
)
omi_app = typer.Typer(
    help="The OMI registry: publish this site's inference services, search for services.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")
app.add_typer(api_app, name="api")
app.add_typer(instances_app, name="instances")
app.add_typer(omi_app, name="omi")
app.add_typer(
    typer.Typer(no_args_is_help=True),
    name="plugins",
    cls=_PluginsGroup,
    help="Process plugins: check BPMN models and FHIR resources.",
)
app.add_typer(
    typer.Typer(no_args_is_help=True),
    name="sandbox",
    cls=_SandboxGroup,
    help="A local DSF test network: certificates, allow list and DSF-compatible FHIR servers.",
)


def _log() -> Any:
    import structlog

    return structlog.get_logger("dsf_bridge.cli")


DbUrlOption = Annotated[
    str | None,
    typer.Option(
        "--db-url",
        help="Database URL (sqlite:///PATH or postgresql://USER@HOST:PORT/DB); "
        "overrides db.url and DSF_BRIDGE_DB__URL.",
        show_default=False,
    ),
]
_CONFIG_HELP = (
    "TOML configuration file (see docs/config.example.toml); default: DSF_BRIDGE_CONFIG. "
    "Before or after the command, with the same meaning."
)
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=_CONFIG_HELP, show_default=False),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsf-bridge {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    config: ConfigOption = None,
    _show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            help="Print the version and exit ('dsf-bridge version' says more).",
        ),
    ] = False,
) -> None:
    """Options before the command; the commands read ``--config`` (:func:`_config_file`)."""


def _config_file(ctx: typer.Context, config: Path | None) -> Path | None:
    """The configuration file: ``--config`` before the command or after it, never two."""
    before: Path | None = ctx.find_root().params.get("config")
    if before is not None and config is not None and before.resolve() != config.resolve():
        typer.echo(
            f"dsf-bridge: --config given twice, {before} before the command and {config} "
            "after it: give it once",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    return config if config is not None else before


def _settings(
    ctx: typer.Context,
    config: Path | None,
    db_url: str | None = None,
    *,
    api: dict[str, Any] | None = None,
) -> Settings:
    from dsf_bridge.config import load_settings
    from dsf_bridge.logs import configure_logging
    from dsf_bridge.omi.contract import check_catalogue

    overrides: dict[str, dict[str, Any]] = {}
    if db_url is not None:
        overrides["db"] = {"url": db_url}
    if api:
        overrides["api"] = api
    try:
        settings = load_settings(_config_file(ctx, config), overrides)
        # The services' contracts live in omi/, which config.py may not import (layers).
        check_catalogue([entry.contract for entry in settings.omi.catalogue])
    except ConfigError as exc:
        typer.echo(f"dsf-bridge: configuration error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc
    configure_logging(settings.log.level, settings.log.format)
    return settings


def _fail(exc: BridgeError) -> typer.Exit:
    typer.echo(f"dsf-bridge: {exc}", err=True)
    return typer.Exit(EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED)


def _require_existing_database(url: str) -> None:
    """Refuse to inspect an SQLite file that does not exist (connecting would create it)."""
    from dsf_bridge.store import sqlite_path

    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise ConfigError(f"db.url: SQLite database {path} does not exist", field="db.url")


def _require_schema(url: str) -> None:
    """An existing database with our schema, or a ConfigError saying what to run."""
    from dsf_bridge.config import redact_url
    from dsf_bridge.store import migrations as schema

    _require_existing_database(url)
    if schema.schema_status(url, read_only=True).current is None:
        raise ConfigError(
            f"{redact_url(url)}: no schema; run 'dsf-bridge db upgrade' first", field="db.url"
        )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):  # a catalogue entry: an inline table
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


@config_app.command("show")
def config_show(
    ctx: typer.Context,
    db_url: DbUrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of TOML.")] = False,
    config: ConfigOption = None,
) -> None:
    """Print the effective configuration, secrets hidden."""
    from dsf_bridge.config import display_settings

    shown = display_settings(_settings(ctx, config, db_url))
    if as_json:
        typer.echo(json.dumps(shown, indent=2))
        return
    lines: list[str] = []
    for section, values in shown.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} is not set")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    typer.echo("\n".join(lines).rstrip())


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context,
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    db_url: DbUrlOption = None,
    organization: Annotated[
        str | None,
        typer.Option(
            help="Also tie the store to this DSF organization identifier now (the first run "
            "does it otherwise); refused if it belongs to another.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Create the schema or bring it up to REVISION (default: the newest)."""
    import asyncio

    from dsf_bridge.store import Database
    from dsf_bridge.store import migrations as schema
    from dsf_bridge.store.owner import bind_store

    settings = _settings(ctx, config, db_url)

    async def bind(identifier: str) -> None:
        database = Database(settings.db.url, echo=settings.db.echo)
        try:
            async with database.transaction() as session:
                await bind_store(session, identifier, actor="dsf-bridge db upgrade")
        finally:
            await database.dispose()

    try:
        schema.upgrade(settings.db.url, revision)
        status = schema.schema_status(settings.db.url)
        if organization is not None:
            if not status.up_to_date:
                raise ConfigError(
                    "--organization needs the newest schema (the store records its "
                    f"organization from revision 0005 on), not {status.current}",
                    field="organization",
                )
            asyncio.run(bind(organization))
    except BridgeError as exc:
        raise _fail(exc) from exc
    _log().info("schema.upgraded", revision=status.current)
    typer.echo(f"schema at revision {status.current} (newest: {status.head})")
    if organization is not None:
        typer.echo(f"the store belongs to organization {organization}")


@db_app.command("downgrade")
def db_downgrade(
    ctx: typer.Context,
    revision: Annotated[str, typer.Argument(help="Target revision; 'base' drops every table.")],
    db_url: DbUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Take the schema down to REVISION."""
    from dsf_bridge.store import migrations as schema

    settings = _settings(ctx, config, db_url)
    try:
        schema.downgrade(settings.db.url, revision)
        status = schema.schema_status(settings.db.url)
    except BridgeError as exc:
        raise _fail(exc) from exc
    _log().info("schema.downgraded", revision=status.current)
    typer.echo(f"schema at revision {status.current or 'base (no tables)'}")


@db_app.command("current")
def db_current(ctx: typer.Context, db_url: DbUrlOption = None, config: ConfigOption = None) -> None:
    """Print the schema revision; exit 1 when it is not the newest this release knows."""
    from dsf_bridge.store import migrations as schema

    settings = _settings(ctx, config, db_url)
    try:
        _require_existing_database(settings.db.url)
        status = schema.schema_status(settings.db.url)
    except BridgeError as exc:
        raise _fail(exc) from exc
    current = status.current or "none (empty database: run 'dsf-bridge db upgrade')"
    state = "up to date" if status.up_to_date else f"behind the newest revision {status.head}"
    typer.echo(f"{current} ({state})" if status.current else current)
    if not status.up_to_date:
        raise typer.Exit(EXIT_FAILED)


@db_app.command("backup")
def db_backup(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The copy to write (must not exist).")],
    db_url: DbUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Copy the store to FILE while the bridge runs (SQLite: the backup API, the write-ahead
    log included; PostgreSQL: print the pg_dump command to run, and do nothing else)."""
    from dsf_bridge.store import backup, sqlite_path

    settings = _settings(ctx, config, db_url)
    try:
        if sqlite_path(settings.db.url) is None:
            typer.echo(backup.pg_dump_command(settings.db.url, file))
            return
        done = backup.backup_sqlite(settings.db.url, file)
    except BridgeError as exc:
        raise _fail(exc) from exc
    if done.integrity != "ok":
        typer.echo(
            f"dsf-bridge: the copy {file} fails its integrity check: {done.integrity}", err=True
        )
        raise typer.Exit(EXIT_FAILED)
    _log().info("store.backed_up", pages=done.pages)
    typer.echo(
        f"backup of {done.source} written to {file} ({done.pages} pages, integrity ok); "
        f"check its audit trail with: dsf-bridge audit verify --db-url sqlite:///{file.resolve()}"
    )


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context, db_url: DbUrlOption = None, config: ConfigOption = None
) -> None:
    """Verify the audit trail's hash chain and compare the instance and Task rows with the
    records of their last events; exit 1 naming the first bad event and every changed row."""
    import asyncio

    from dsf_bridge.store import Database, verify_chain

    settings = _settings(ctx, config, db_url)

    async def run() -> Any:
        # Read-only: verifying must neither write nor hold up a running bridge's writers.
        database = Database(settings.db.url, echo=settings.db.echo, read_only=True)
        try:
            async with database.transaction() as session:
                return await verify_chain(session)
        finally:
            await database.dispose()

    try:
        _require_schema(settings.db.url)
        report = asyncio.run(run())
    except BridgeError as exc:
        raise _fail(exc) from exc
    if report.problem is not None:
        typer.echo(
            f"audit chain BROKEN at event {report.first_bad_sequence}: {report.problem}", err=True
        )
    for problem in report.record_problems:
        typer.echo(f"audit record BROKEN: {problem}", err=True)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
    unsealed = (
        f"; {report.unsealed} newer events not yet sealed into it (a running bridge seals them "
        "within seconds, a stopped one before it exits)"
        if report.unsealed
        else ""
    )
    typer.echo(f"audit chain intact: {report.events} events, head {report.head_hash}{unsealed}")
    unrecorded = (
        f" ({report.unrecorded} rows have no record: written before dsf-bridge kept them, "
        "or a Task version in intake)"
        if report.unrecorded
        else ""
    )
    typer.echo(
        f"records intact: {report.records} rows as their last event recorded them{unrecorded}"
    )


class ExportFormat(enum.StrEnum):
    JSONL = "jsonl"
    FHIR = "fhir"


def _since(value: str | None) -> Any:
    """``--since`` as an aware datetime (a date is its midnight; no zone is UTC)."""
    import datetime as dt

    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is no ISO 8601 date or time (2026-01-31, 2026-01-31T12:00:00+01:00)",
            param_hint="--since",
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


@audit_app.command("export")
def audit_export(
    ctx: typer.Context,
    *,
    export_format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="jsonl: one stored event per line, as the chain hashes it; fhir: one FHIR R4 "
            "AuditEvent per line (NDJSON), after IHE BALP.",
        ),
    ] = ExportFormat.JSONL,
    since: Annotated[
        str | None,
        typer.Option(
            help="Only events at or after this time (ISO 8601, e.g. 2026-01-31 or "
            "2026-01-31T12:00:00+01:00; without a zone: UTC).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write to FILE instead of standard output.", show_default=False),
    ] = None,
    db_url: DbUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Export the audit trail, oldest first, read-only (a running bridge is not held up)."""
    import sys

    from dsf_bridge.dsf.audit_events import audit_event_resource
    from dsf_bridge.store import export_events
    from dsf_bridge.store.owner import store_owner

    start = _since(since)

    async def work(session: Any) -> int:
        organization = await store_owner(session)
        target = sys.stdout if out is None else out.open("w", encoding="utf-8")
        count = 0
        try:
            async for event in export_events(session, since=start):
                line = (
                    audit_event_resource(event, organization)
                    if export_format is ExportFormat.FHIR
                    else event
                )
                target.write(json.dumps(line, separators=(",", ":")) + "\n")
                count += 1
        finally:
            if out is not None:
                target.close()
        return count

    count = _with_store(ctx, config, db_url, work, read_only=True)
    typer.echo(f"exported {count} audit events" + (f" to {out}" if out else ""), err=True)


def _with_store(
    ctx: typer.Context,
    config: Path | None,
    db_url: str | None,
    work: Callable[[Any], Awaitable[Any]],
    *,
    read_only: bool = False,
) -> Any:
    """Run ``work(session)`` in one transaction of the configured, migrated store."""
    import asyncio

    from dsf_bridge.store import Database

    settings = _settings(ctx, config, db_url)

    async def run() -> Any:
        database = Database(settings.db.url, echo=settings.db.echo, read_only=read_only)
        try:
            async with database.transaction() as session:
                return await work(session)
        finally:
            await database.dispose()

    try:
        _require_schema(settings.db.url)
        return asyncio.run(run())
    except BridgeError as exc:
        raise _fail(exc) from exc


@instances_app.command("list")
def instances_list(
    ctx: typer.Context,
    *,
    status: Annotated[
        str | None, typer.Option(help="running, completed or failed (default: all).")
    ] = None,
    process: Annotated[str | None, typer.Option(help="Process key, e.g. dsfdev_ping.")] = None,
    limit: Annotated[
        int, typer.Option(help="At most this many, newest first.", min=1, max=500)
    ] = 50,
    db_url: DbUrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """List process instances, newest first."""
    import dataclasses

    from dsf_bridge.store import queries

    if status is not None and status not in ("running", "completed", "failed"):
        typer.echo("dsf-bridge: --status must be running, completed or failed", err=True)
        raise typer.Exit(EXIT_USAGE)

    async def work(session: Any) -> list[queries.InstanceRow]:
        return await queries.list_instances(
            session, status=status, process_key=process, limit=limit
        )

    rows = _with_store(ctx, config, db_url, work, read_only=True)
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2, default=str))
        return
    if not rows:
        typer.echo("no instances")
    for r in rows:
        typer.echo(
            f"{r.id} {r.status:9} {r.process_key}|{r.process_version} "
            f"business-key {r.business_key} since {r.created_at.isoformat(timespec='seconds')}"
        )


@instances_app.command("show")
def instances_show(
    ctx: typer.Context,
    instance: Annotated[str, typer.Argument(help="Instance id.")],
    db_url: DbUrlOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print everything the admin API shows, as JSON.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Show where an instance stands: status, what it waits for, incidents, its Tasks."""
    import dataclasses

    from dsf_bridge.engine import state as instance_state
    from dsf_bridge.store import queries

    async def work(session: Any) -> queries.InstanceDetail | None:
        return await queries.instance_detail(session, instance)

    detail = _with_store(ctx, config, db_url, work, read_only=True)
    if detail is None:
        typer.echo(f"dsf-bridge: no instance {instance!r}", err=True)
        raise typer.Exit(EXIT_FAILED)
    from dsf_bridge.plugins.api import progress_of
    from dsf_bridge.plugins.loader import discover_plugins

    # What the process's plugin shows of it (e.g. a consortium request's sites).
    progress = progress_of(
        discover_plugins(),
        detail.instance.process_key,
        instance_state.process_variables(detail.state),
    )
    if as_json:
        shown = dataclasses.asdict(detail) | {"progress": progress}
        typer.echo(json.dumps(shown, indent=2, default=str))
        return
    row = detail.instance
    typer.echo(f"instance      {row.id}")
    typer.echo(f"process       {row.process_key}|{row.process_version} ({row.plugin})")
    typer.echo(f"status        {row.status}")
    typer.echo(f"business-key  {row.business_key}")
    typer.echo(f"since         {row.created_at.isoformat(timespec='seconds')}")
    for view in instance_state.tokens(detail.state):
        waits = "; ".join(f"{w.kind.name.lower()} {w.key} at {w.element}" for w in view.waits)
        line = f"token {view.id:>4}  {view.element}  {view.phase.name.lower()}"
        typer.echo(line + (f"  waits for {waits}" if waits else ""))
    for item in progress or []:
        typer.echo("progress      " + "  ".join(str(v) for v in item.values() if v is not None))
    for incident in detail.incidents:
        typer.echo(
            f"incident      token {incident.token} at {incident.element_id}: {incident.message}"
        )
    for task in detail.tasks:
        typer.echo(
            f"task          {task.role} Task/{task.task_id} v{task.task_version} {task.status}"
        )


@instances_app.command("incidents")
def instances_incidents(
    ctx: typer.Context,
    db_url: DbUrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """List the incidents of running instances: jobs out of retries, loops without a wait."""
    from dsf_bridge.runtime import operations

    found = _with_store(ctx, config, db_url, operations.list_incidents)
    if as_json:
        rows = [
            {
                "instance": i.instance_id,
                "process": i.process,
                "token": i.token,
                "element": i.element,
                "message": i.message,
                "at": i.at.isoformat() if i.at else None,
            }
            for i in found
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    if not found:
        typer.echo("no incidents")
    for i in found:
        typer.echo(f"{i.instance_id} {i.process} token {i.token} at {i.element}: {i.message}")


@instances_app.command("retry")
def instances_retry(
    ctx: typer.Context,
    instance: Annotated[str, typer.Argument(help="Instance id.")],
    token: Annotated[str, typer.Argument(help="Token of the incident (see 'incidents').")],
    *,
    retries: Annotated[int, typer.Option(help="New tries for the job.", min=1, max=100)] = 1,
    db_url: DbUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Give the job parked in an incident new tries; the bridge runs it again from there."""
    import datetime as dt

    from dsf_bridge.runtime import operations

    async def work(session: Any) -> int:
        return await operations.request_retry(
            session, instance, token, retries=retries, actor="cli", now=dt.datetime.now(dt.UTC)
        )

    job = _with_store(ctx, config, db_url, work)
    typer.echo(f"queued: {retries} new tries for token {token} of {instance} (job {job})")


@instances_app.command("cancel")
def instances_cancel(
    ctx: typer.Context,
    instance: Annotated[str, typer.Argument(help="Instance id.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why; the instance's Tasks are failed with it.")
    ],
    db_url: DbUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Cancel a running instance; the Tasks it took in are failed with the reason."""
    import datetime as dt

    from dsf_bridge.runtime import operations

    async def work(session: Any) -> int:
        return await operations.request_cancel(
            session, instance, reason=reason, actor="cli", now=dt.datetime.now(dt.UTC)
        )

    job = _with_store(ctx, config, db_url, work)
    typer.echo(f"queued: cancel {instance} (job {job})")


@app.command("run")
def run_command(
    ctx: typer.Context,
    db_url: DbUrlOption = None,
    upgrade_db: Annotated[
        bool, typer.Option("--upgrade-db", help="Migrate the schema to the newest first.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Run the bridge for this site until SIGTERM or Ctrl-C (the installed plugins and those
    of [plugins] folder)."""
    import asyncio

    from dsf_bridge.plugins.dropin import site_plugins
    from dsf_bridge.store import migrations as schema

    settings = _settings(ctx, config, db_url)
    try:
        plugins, dropins = site_plugins(settings.plugins.folder)
        if upgrade_db:
            schema.upgrade(settings.db.url)
        optional = set(dropins.sources) if dropins is not None else set()
        asyncio.run(_run_bridge(settings, plugins, optional))
    except BridgeError as exc:
        raise _fail(exc) from exc


async def _run_bridge(settings: Settings, plugins: list[ProcessPlugin], optional: set[str]) -> None:
    import asyncio
    import signal

    from dsf_bridge.api import heartbeat_probe, subscription_probe
    from dsf_bridge.api.fhir import TaskReader
    from dsf_bridge.runtime.daemon import Bridge

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bridge = Bridge(settings, plugins, optional=optional)
    if not settings.api.enabled:
        async with bridge:
            await bridge.run(stop)
        return

    def subscription(resource_type: str) -> Callable[[], TaskSubscription | None]:
        return lambda: next(
            (s for s in bridge.subscriptions if s.resource_type == resource_type), None
        )

    stale = settings.api.stale_after
    probes = [
        subscription_probe(
            f"subscription {kind}", subscription(kind), stale, settings.api.disconnected_after
        )
        for kind in ("Task", "QuestionnaireResponse")
    ]
    probes.append(heartbeat_probe("workers", lambda: bridge.runtime, stale, kind="worker"))

    async def run_bridge(admin: FastAPI) -> None:
        # The API answers from before start-up (/health; /ready says 503 until the
        # subscriptions and workers show life), and a busy port stops start-up early.
        async with bridge:
            if bridge.organization is not None:
                admin.state.context.site = bridge.organization.identifier
            client = bridge.client
            if client is not None:
                # The lists show the Tasks' status on the FHIR server, read over this client.
                admin.state.context.task_reader = TaskReader(
                    lambda task_id: client.read("Task", task_id)
                )
            await bridge.run(stop)

    await _serve_api(settings, probes, run_bridge, plugins=plugins)


async def _serve_api(
    settings: Settings,
    probes: list[Probe],
    main: Callable[[FastAPI], Awaitable[None]],
    *,
    operator: bool = True,
    plugins: Sequence[ProcessPlugin] = (),
) -> None:
    """Serve the admin API, over its own read-only connection to the store, while ``main``
    runs; with ``operator`` (beside a running bridge) and ``api.operator_token``, operator
    requests get a writable connection of their own. The instance page draws its diagrams
    from the ``plugins``' models."""
    from dsf_bridge.api import ApiServer, create_app
    from dsf_bridge.api.diagram import DiagramLibrary
    from dsf_bridge.store import Database

    api = settings.api
    database = Database(settings.db.url, pool_size=2, read_only=True)
    # Operator requests (api.operator_token) queue jobs: they alone get a writable connection.
    writer = (
        Database(settings.db.url, pool_size=1)
        if operator and api.operator_token is not None
        else None
    )
    try:
        admin = create_app(
            database,
            api,
            probes=probes,
            operator_database=writer,
            diagrams=DiagramLibrary(plugins),
        )
        async with ApiServer(admin, host=api.host, port=api.port) as server:
            _log().info("api.listening", url=server.url, closed=api.token is None)
            if api.token is None:
                _log().warning(
                    "api.closed",
                    reason="api.token is not set: only /health and /ready answer",
                )
            await main(admin)
    finally:
        await database.dispose()
        if writer is not None:
            await writer.dispose()


@api_app.command("serve")
def api_serve_command(
    ctx: typer.Context,
    db_url: DbUrlOption = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Overrides api.host.", show_default=False)
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", help="Overrides api.port.", min=1, max=65535, show_default=False),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Serve the admin API and web page over a store without running the bridge: audit a
    site's database, or a copy of it. Readiness checks the database only. Stops on SIGTERM."""
    import asyncio

    from dsf_bridge.store import migrations as schema

    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = _settings(ctx, config, db_url, api=overrides)
    try:
        _require_existing_database(settings.db.url)
        status = schema.schema_status(settings.db.url, read_only=True)
        if not status.up_to_date:
            raise MigrationError(
                f"the database schema is at {status.current or 'no revision'}, this release "
                f"reads {status.head}: run 'dsf-bridge db upgrade' first"
            )
        asyncio.run(_api_only(settings))
    except BridgeError as exc:
        raise _fail(exc) from exc


async def _api_only(settings: Settings) -> None:
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def until_stopped(_admin: FastAPI) -> None:
        await stop.wait()

    # An audit of a store (perhaps a copy): no bridge runs the operator's requests here. The
    # diagrams come from the plugins installed here.
    from dsf_bridge.plugins.loader import discover_plugins

    await _serve_api(settings, [], until_stopped, operator=False, plugins=discover_plugins())


@app.command("check-connection")
def check_connection_command(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Check the DSF connection step by step: certificate, TLS, FHIR server, local organization,
    Subscription, websocket. Exit 0 only if every step passes."""
    import asyncio

    from dsf_bridge.dsf.connection import check_connection

    settings = _settings(ctx, config)

    async def run() -> bool:
        ok = True
        async for result in check_connection(settings.dsf, proxy=settings.proxy.forward_proxy()):
            mark = "OK  " if result.ok else "FAIL"
            typer.echo(f"{mark} {result.name}: {result.detail}")
            ok = ok and result.ok
        return ok

    if not asyncio.run(run()):
        raise typer.Exit(EXIT_FAILED)


@app.command("start")
def start_command(
    ctx: typer.Context,
    process: Annotated[
        str,
        typer.Argument(
            help="Process key (dsfdev_ping) or URL (http://dsf.dev/bpe/Process/ping, "
            "optionally |VERSION).",
            show_default=False,
        ),
    ],
    *,
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            help="CODE=VALUE: an input by its code in the plugin's CodeSystem, typed as the Task "
            "profile says (string, integer, boolean, Reference: Type/id or SYSTEM|VALUE...). "
            "Repeat for more.",
            show_default=False,
        ),
    ] = None,
    business_key: Annotated[
        str | None,
        typer.Option(
            "--business-key",
            help="Business key of the new instance (default: the bridge's).",
            show_default=False,
        ),
    ] = None,
    message: Annotated[
        str | None,
        typer.Option(
            "--message",
            help="Message name of the draft Task to use, when the process ships several "
            "(default: the one that starts it).",
            show_default=False,
        ),
    ] = None,
    wait: Annotated[
        float | None,
        typer.Option(
            "--wait",
            help="Then wait up to this many seconds for the Task to end and print its status "
            "and outputs; exit 1 unless it completed.",
            min=0,
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the created Task's id and URL (and end) as JSON."),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Start a process: create its start Task on the local DSF FHIR server from the plugin's
    draft Task, as the DSF web UI does (requester the local organization, status requested).
    The bridge running for this site takes it in."""
    import asyncio

    from dsf_bridge.dsf.drafts import parse_input

    settings = _settings(ctx, config)
    try:
        given = [parse_input(text) for text in inputs or []]
        created = asyncio.run(
            _start_process(
                settings, process, given, business_key=business_key, message=message, wait=wait
            )
        )
    except BridgeError as exc:
        raise _fail(exc) from exc
    status = created.get("status", "requested")
    if as_json:
        typer.echo(json.dumps(created, indent=2))
    else:
        typer.echo(
            f"created Task/{created['id']} (requested) for {created['process']}, message "
            f"{created['message']}: {created['url']}"
        )
        if wait is not None:
            typer.echo(f"Task/{created['id']} {status}")
            for line in created.get("outputs", []):
                typer.echo(f"  output {line}")
    if wait is not None and status != "completed":
        raise typer.Exit(EXIT_FAILED)


def _require_dsf(settings: Settings) -> tuple[str, Path]:
    """The local DSF FHIR server's base URL and the client certificate, both required."""
    dsf = settings.dsf
    if dsf.fhir_base_url is None or dsf.client_certificate is None:
        field = "dsf.fhir_base_url" if dsf.fhir_base_url is None else "dsf.client_certificate"
        raise ConfigError(f"{field} is not set; see docs/operations.md", field=field)
    return dsf.fhir_base_url, dsf.client_certificate


@contextlib.asynccontextmanager
async def _local_site(settings: Settings) -> AsyncIterator[tuple[FhirClient, LocalOrganization]]:
    """A client of the local DSF FHIR server and the local organization, found by its Endpoint
    and checked against the client certificate, as ``run`` finds it."""
    from dsf_bridge.dsf.client import FhirClient
    from dsf_bridge.dsf.identity import build_ssl_context, load_identity
    from dsf_bridge.dsf.organization import find_local_organization

    base_url, certificate = _require_dsf(settings)
    dsf = settings.dsf
    password = dsf.client_key_password.get_secret_value() if dsf.client_key_password else None
    identity = load_identity(certificate, dsf.client_key, password=password)
    context = build_ssl_context(identity, dsf.ca_certificates, password=password)
    async with FhirClient(
        base_url,
        ssl_context=context,
        retry=settings.runtime.call_retry(),
        proxy=settings.proxy.forward_proxy(),
    ) as client:
        organization = await find_local_organization(client, base_url)
        organization.require_thumbprint(identity.thumbprint)
        yield client, organization


async def _start_process(
    settings: Settings,
    process: str,
    inputs: list[tuple[str, str]],
    *,
    business_key: str | None,
    message: str | None,
    wait: float | None = None,
) -> dict[str, Any]:
    import asyncio
    import datetime as dt
    import time

    from dsf_bridge.errors import RemoteError
    from dsf_bridge.plugins.dropin import site_plugins
    from dsf_bridge.plugins.starting import find_start_form

    _require_dsf(settings)
    plugins, _dropins = site_plugins(settings.plugins.folder)
    async with _local_site(settings) as (client, organization):
        plugin, definition, form = find_start_form(
            plugins, process, organization=organization.identifier, message=message
        )
        task = form.task(
            inputs,
            requester=organization.identifier,
            business_key=business_key,
            authored_on=dt.datetime.now(dt.UTC),
        )
        created = await client.create(task, return_minimal=True)
        if created.id is None:
            raise RemoteError("the FHIR server created the Task without saying its id")
        _log().info("task.created", task_id=created.id, process=definition.key)
        result: dict[str, Any] = {
            "id": created.id,
            "url": f"{client.base_url}/Task/{created.id}",
            "process": f"{definition.key}|{plugin.resource_version}",
            "message": form.message_name,
        }
        if wait is None:
            return result
        # Said at once: a read failing while we wait must not hide what was created.
        typer.echo(f"created Task/{created.id}: {result['url']}; waiting for its end", err=True)
        deadline = time.monotonic() + wait
        while True:  # the server offers no event for a Task's end: read it until it ends
            try:
                current = await client.read("Task", created.id)
            except RemoteError as exc:
                raise RemoteError(
                    f"Task/{created.id} was created ({result['url']}), but reading it failed: "
                    f"{exc.message}; do not start it again, look at it on the FHIR server",
                    status=exc.status,
                ) from exc
            if current.get("status") in _TASK_ENDS or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
    result["status"] = str(current.get("status"))
    result["outputs"] = [_shown_output(output) for output in current.get("output") or []]
    return result


# FHIR R4 Task states that end it (DSF ends Tasks completed or failed; the others may be set
# by hand).
_TASK_ENDS = frozenset({"completed", "failed", "cancelled", "rejected", "entered-in-error"})


def _shown_output(output: dict[str, Any]) -> str:
    """``code: value`` of a Task output, the value as compact JSON unless it is text."""
    codings = (output.get("type") or {}).get("coding") or [{}]
    value = next((v for k, v in output.items() if k.startswith("value")), None)
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return f"{codings[0].get('code')}: {text}"


@omi_app.command("publish")
def omi_publish_command(
    ctx: typer.Context,
    *,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the Device, Endpoint and HealthcareService of each service instead of "
            "publishing them; the registry is not contacted.",
        ),
    ] = False,
    organization: Annotated[
        str | None,
        typer.Option(
            "--organization",
            help="DSF organization identifier to publish as (default: the local organization, "
            "found on the DSF FHIR server as 'run' finds it).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Publish the inference services this site offers ([omi] catalogue entries with an
    inference_url) in the OMI registry ([omi] registry_url): each service's Device, Endpoint
    and HealthcareService, created or updated by identifier. Running it twice changes nothing.
    Exit 1 if the registry fails."""
    import asyncio
    import dataclasses

    from dsf_bridge.omi.publish import service_resources
    from dsf_bridge.runtime.publishing import open_registry, publish_services, service_offers

    settings = _settings(ctx, config)

    async def site() -> str:
        if organization is not None:
            return organization
        async with _local_site(settings) as (_client, local):
            return local.identifier

    async def publish(identifier: str) -> dict[str, Any]:
        async with open_registry(settings) as registry:
            done = await publish_services(registry, identifier, offers)
        return {key: [dataclasses.asdict(r) for r in value] for key, value in done.items()}

    try:
        offers = service_offers(settings.omi)
        if not offers:
            raise ConfigError(
                "omi.catalogue has no entry with inference_url: this site offers no service "
                "to publish (docs/omi.md, 'Publishing a service')",
                field="omi.catalogue",
            )
        if not dry_run and settings.omi.registry_url is None:
            raise ConfigError(
                "omi.registry_url is not set: name the OMI registry to publish in",
                field="omi.registry_url",
            )
        identifier = asyncio.run(site())
        if dry_run:
            shown: dict[str, Any] = {
                offer.service_id: service_resources(offer, identifier) for offer in offers
            }
        else:
            shown = asyncio.run(publish(identifier))
    except BridgeError as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "organization": identifier,
                    "registry": settings.omi.registry_url,
                    "dry_run": dry_run,
                    "services": shown,
                },
                indent=2,
            )
        )
        return
    for service_id, resources in shown.items():
        if dry_run:
            typer.echo(f"service {service_id} (as {identifier}), not published:")
            for kind, resource in resources.items():
                typer.echo(f"  {kind} {resource['identifier'][0]['value']}")
                typer.echo("    " + json.dumps(resource, separators=(",", ":")))
            continue
        done = ", ".join(f"{r['resource_type']}/{r['id']} {r['outcome']}" for r in resources)
        typer.echo(f"service {service_id}: {done}")


@omi_app.command("search")
def omi_search_command(
    ctx: typer.Context,
    *,
    modality: Annotated[
        str | None,
        typer.Option("--modality", help="DICOM Modality the service accepts, e.g. CT."),
    ] = None,
    body_part: Annotated[
        str | None,
        typer.Option(
            "--body-part",
            help="DICOM BodyPartExamined the service accepts, e.g. CHEST (services that take "
            "any body part match).",
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option("--task", help="measurement, classification or segmentation."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Search the OMI registry ([omi] registry_url) for active services by what they accept
    and do. Exit 1 if none matches or the registry fails."""
    import asyncio

    from dsf_bridge.omi.registry import ServiceQuery
    from dsf_bridge.runtime.publishing import open_registry

    settings = _settings(ctx, config)
    try:
        query = ServiceQuery(modality=modality, body_part=body_part, task=task)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--task") from exc

    async def search() -> list[Any]:
        async with open_registry(settings) as registry:
            return await registry.find_services(query=query)

    try:
        found = asyncio.run(search())
    except BridgeError as exc:
        raise _fail(exc) from exc
    rows = [
        {
            "id": s.service_id,
            "name": s.name,
            "organization": s.organization,
            "model": s.model_name,
            "model_version": s.model_version,
            "modalities": list(s.modalities),
            "body_parts": list(s.body_parts),
            "tasks": list(s.tasks),
            "status": s.heartbeat.status if s.heartbeat is not None else None,
            "contract": s.contract.name if s.contract is not None else None,
            "contract_problem": s.contract_problem,
        }
        for s in found
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            typer.echo(
                f"{row['id']}  {row['name']}  at {row['organization']}  model {row['model']}  "
                f"{'/'.join(row['modalities'])} {'/'.join(row['body_parts'])}  "
                f"{', '.join(row['tasks'])}  {row['status'] or 'no heartbeat'}  "
                + (
                    f"contract {row['contract']}"
                    if row["contract"]
                    else f"contract refused: {row['contract_problem']}"
                    if row["contract_problem"]
                    else "no contract"
                )
            )
        if not rows:
            typer.echo("no service matches", err=True)
    if not rows:
        raise typer.Exit(EXIT_FAILED)


@app.command("demo")
def demo_command(  # noqa: PLR0917 - typer options are parameters
    as_json: Annotated[
        bool, typer.Option("--json", help='Print one JSON object {"results": [...]}.')
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the results.", min=1)
    ] = 120.0,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the temporary directory (stores, certificates).")
    ] = False,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve", help="Then serve both sites' audit web pages until Ctrl-C (docs/api.md)."
        ),
    ] = False,
    dsf_version: Annotated[
        str,
        typer.Option(
            "--dsf-version",
            help="DSF version the sandbox FHIR servers answer as (2.1 or 1.9); the bridges "
            "learn it from the servers.",
        ),
    ] = "2.1",
    consortium: Annotated[
        bool,
        typer.Option(
            "--consortium",
            help="Consortium inference instead (docs/consortium.md): a coordinator and three "
            "data sites, each with its own Orthanc; one holds fewer than k studies, one times "
            'out. With --json: one object {"sites": [...], "pooled": {...}}.',
        ),
    ] = False,
) -> None:
    """OMI inference on one machine: two sandbox sites (Hospital_A asks, AI_Provider infers),
    Orthanc with CT data, MLServer with the reference model. Exit 1 if a request failed.
    With --consortium: one consortium request over three data sites."""
    from dsf_bridge.dsf.versions import UnknownDsfVersionError, release
    from dsf_bridge.logs import configure_logging

    # Warnings only: progress lines go to stderr, results to stdout.
    configure_logging("warning", "console")
    try:
        dsf_release = release(dsf_version)
    except UnknownDsfVersionError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dsf-version") from exc
    if consortium:
        if serve:
            raise typer.BadParameter("not with --consortium", param_hint="--serve")
        from dsf_bridge.sandbox.consortium import run_consortium_demo

        status = run_consortium_demo(
            as_json=as_json, timeout=timeout, keep=keep, dsf_release=dsf_release
        )
    else:
        from dsf_bridge.sandbox.demo import run_demo

        status = run_demo(
            as_json=as_json, timeout=timeout, keep=keep, serve=serve, dsf_release=dsf_release
        )
    if status:
        raise typer.Exit(status)


@app.command("version")
def version_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print the bridge's version, Python's, and the DSF versions it speaks."""
    import platform

    from dsf_bridge.dsf.versions import DSF_RELEASES

    dsf = [
        {
            "line": f"{release.major}.x",
            "tested_as": release.software_version,
            "task_base_profile": release.task_base_canonical,
        }
        for release in DSF_RELEASES.values()
    ]
    if as_json:
        shown = {
            "dsf_bridge": __version__,
            "python": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "dsf": dsf,
        }
        typer.echo(json.dumps(shown, indent=2))
        return
    typer.echo(f"dsf-bridge  {__version__}")
    typer.echo(f"python      {platform.python_version()} ({platform.python_implementation()})")
    for line in dsf:
        typer.echo(
            f"dsf         {line['line']} (tested as {line['tested_as']}; base Task profile "
            f"{line['task_base_profile']})"
        )


def main() -> None:
    """Console-script entry point."""
    app()
