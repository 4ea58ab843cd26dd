"""The bridge daemon: one site's process engine, from start-up checks to graceful shutdown.

Start-up, in order, each step refusing to go on with a message that says what to fix:

1. the client certificate (thumbprint, subject, issuer and expiry are logged; an expired
   certificate, a key that does not match or a non-client certificate stop start-up);
2. the store's schema is at the newest revision;
3. the DSF version of the FHIR server, from its CapabilityStatement (``software.version``);
   it decides how plugin resources are published and how Task outputs are written;
4. the local organization is found by its Endpoint address and owns the certificate;
5. the plugins load (placeholders replaced, models validated, every handler registered), their
   FHIR resources are published and their processes deployed; an optional plugin (a drop-in)
   that fails here is logged and left out;
6. Tasks a previous run left half taken in are recovered;
7. with ``[omi] publish``, the site's services are published in the OMI registry (a registry
   that fails is logged and tried again, it never stops start-up).

Then three loops run until stopped: the Task subscription, the QuestionnaireResponse
subscription (user tasks), and the runtime's workers; with ``[omi] publish`` a fourth sends
the services' heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import secrets
import socket
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization

from dsf_bridge.config import RuntimeConfig, Settings
from dsf_bridge.dsf.authorization import TaskAuthorizer
from dsf_bridge.dsf.certificates import publish_certificate
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.dsf.organization import LocalOrganization, find_local_organization
from dsf_bridge.dsf.publication import publish
from dsf_bridge.dsf.questionnaires import USER_TASK_ID_ITEM
from dsf_bridge.dsf.subscription import TaskSubscription
from dsf_bridge.dsf.tasks import TaskLimits
from dsf_bridge.dsf.versions import DsfRelease, server_release
from dsf_bridge.errors import BridgeError, ConfigError, MigrationError, ProcessExecutionError
from dsf_bridge.omi.registry import FhirRegistryClient
from dsf_bridge.plugins.api import LoadedPlugin, ProcessPlugin
from dsf_bridge.plugins.inference import (
    SERVICE_DICOMWEB_SSL_CONTEXT,
    SERVICE_OMI_REGISTRY,
    SERVICE_OMI_SETTINGS,
)
from dsf_bridge.plugins.inference import plugin as inference_plugin
from dsf_bridge.plugins.registry import (
    SERVICE_CALL_RETRY,
    SERVICE_FHIR_CLIENT,
    SERVICE_FORWARD_PROXY,
    SERVICE_LOCAL_ORGANIZATION,
)
from dsf_bridge.plugins.transfer import SERVICE_TRANSFER
from dsf_bridge.runtime.gateway import DsfTaskGateway
from dsf_bridge.runtime.intake import SqlCursorStore, TaskIntake
from dsf_bridge.runtime.processes import ProcessRuntime, RuntimeSettings
from dsf_bridge.runtime.publishing import ServicePublication, open_registry, service_offers
from dsf_bridge.runtime.transfers import sweep_left_packages, transfer_site
from dsf_bridge.store import Database, schema_status, sqlite_path
from dsf_bridge.store.owner import bind_store

__all__ = ["Bridge"]

log = structlog.get_logger("dsf_bridge.daemon")


def _answers(response: dict[str, Any]) -> dict[str, object]:
    """The answers of a completed QuestionnaireResponse as process variables (by linkId)."""
    values: dict[str, object] = {}
    for item in response.get("item") or []:
        answers = item.get("answer") or []
        if not answers:
            continue
        value = next((v for k, v in answers[0].items() if k.startswith("value")), None)
        values[str(item.get("linkId"))] = value
    return values


def _runtime_settings(config: RuntimeConfig) -> RuntimeSettings:
    """The workers' timing from the ``[runtime]`` section (seconds become timedeltas)."""

    def seconds(value: float) -> dt.timedelta:
        return dt.timedelta(seconds=value)

    return RuntimeSettings(
        lease=seconds(config.lease),
        job_retries=config.job_retries,
        job_retry_delay=seconds(config.job_retry_delay),
        outbox_retry_delays=tuple(seconds(delay) for delay in config.outbox_retry_delays),
        idle_poll=seconds(config.idle_poll),
        shutdown_grace=seconds(config.shutdown_grace),
        call_retry=config.call_retry(),
        inline_handler_budget=seconds(config.inline_handler_budget),
    )


class Bridge:
    """One running bridge for one site; use as an async context manager."""

    def __init__(
        self,
        settings: Settings,
        plugins: Sequence[ProcessPlugin],
        *,
        services: Mapping[str, object] | None = None,
        runtime_settings: RuntimeSettings | None = None,
        optional: Collection[str] = (),
    ) -> None:
        """``services`` are added to what handlers get (``HandlerContext.services``) besides
        the local FHIR client and organization; ``runtime_settings`` tune the workers (default:
        the ``[runtime]`` section); ``optional`` names plugins (drop-ins) that are left out,
        logged at error, when they fail to load or the server refuses their resources, instead
        of stopping start-up."""
        self.settings = settings
        self.plugins = list(plugins)
        self.extra_services = dict(services or {})
        self.optional = frozenset(optional)
        self.runtime_settings = runtime_settings or _runtime_settings(settings.runtime)
        # Unique to this run: two containers may both be pid 1 with a fixed hostname, and a
        # restarted container is the same again; the leases of one must never be another's.
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.database: Database | None = None
        self.client: FhirClient | None = None
        self.gateway: DsfTaskGateway | None = None
        self.runtime: ProcessRuntime | None = None
        self.intake: TaskIntake | None = None
        self.organization: LocalOrganization | None = None
        self.dsf_release: DsfRelease | None = None
        self.loaded: list[LoadedPlugin] = []
        self.subscriptions: list[TaskSubscription] = []
        self.publication: ServicePublication | None = None
        self.registry: FhirRegistryClient | None = None

    async def __aenter__(self) -> Bridge:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        dsf = self.settings.dsf
        if dsf.fhir_base_url is None or dsf.client_certificate is None:
            field = "dsf.fhir_base_url" if dsf.fhir_base_url is None else "dsf.client_certificate"
            raise ConfigError(f"{field} is not set; see docs/operations.md", field=field)
        password = dsf.client_key_password.get_secret_value() if dsf.client_key_password else None
        identity = load_identity(dsf.client_certificate, dsf.client_key, password=password)
        log.info("certificate.loaded", **identity.describe())
        context = build_ssl_context(identity, dsf.ca_certificates, password=password)

        # Connecting would create an empty SQLite file where the store was expected.
        path = sqlite_path(self.settings.db.url)
        if path is not None and not path.exists():
            raise MigrationError(
                f"the SQLite database {path} does not exist: run 'dsf-bridge db upgrade' first "
                "(or point db.url at this site's store)"
            )
        status = schema_status(self.settings.db.url)
        if not status.up_to_date:
            raise MigrationError(
                f"the database schema is at {status.current or 'no revision'}, this release needs "
                f"{status.head}: run 'dsf-bridge db upgrade' first"
            )
        # A fixed pool: a catch-up's pages and bursts of frames come and go, and connections
        # opened for a peak and closed after it cost a new PostgreSQL backend each time (990
        # for 10,000 Tasks of a catch-up with 10 of overflow; docs/benchmarks.md).
        self.database = Database(
            self.settings.db.url,
            pool_size=self.settings.db.pool_size,
            max_overflow=0,
            echo=self.settings.db.echo,
        )
        call_retry = self.runtime_settings.call_retry
        proxy = self.settings.proxy.forward_proxy()
        if proxy is not None:
            log.info("proxy.configured", url=proxy.url, no_proxy=list(proxy.no_proxy))
        self.client = FhirClient(
            dsf.fhir_base_url, ssl_context=context, retry=call_retry, proxy=proxy
        )
        # From the server, never from configuration: a site upgraded to 2.x needs no new config.
        self.dsf_release = await server_release(self.client)
        log.info(
            "server.version",
            dsf_major=self.dsf_release.major,
            task_base=self.dsf_release.task_base_canonical,
        )
        self.organization = await find_local_organization(self.client, dsf.fhir_base_url)
        self.organization.require_thumbprint(identity.thumbprint)
        local = self.organization.identifier
        log.info("organization.found", organization=local)
        async with self.database.transaction() as session:
            if await bind_store(session, local, actor=self.owner):
                log.info("store.bound", organization=local)

        self.gateway = DsfTaskGateway(
            self.client,
            context,
            local,
            dsf_release=self.dsf_release,
            retry=call_retry,
            proxy=proxy,
        )
        if self.settings.omi.registry_url is not None:
            # One client for look-ups and publishing, with the site's TLS identity and proxy.
            self.registry = open_registry(self.settings)
        services: dict[str, object] = {
            SERVICE_FHIR_CLIENT: self.client,
            SERVICE_LOCAL_ORGANIZATION: self.organization,
            SERVICE_CALL_RETRY: call_retry,
            **({SERVICE_FORWARD_PROXY: proxy} if proxy is not None else {}),
            SERVICE_OMI_SETTINGS: self.settings.omi,
            **({SERVICE_OMI_REGISTRY: self.registry} if self.registry is not None else {}),
            SERVICE_TRANSFER: transfer_site(
                self.settings, identity, self.client, self.gateway.client_for, self.database, local
            ),
            # https DICOMweb archives see the site's DSF identity (mutual TLS).
            SERVICE_DICOMWEB_SSL_CONTEXT: build_ssl_context(
                identity,
                self.settings.omi.dicomweb_ca_certificates or dsf.ca_certificates,
                password=password,
            ),
            **self.extra_services,
        }
        self.runtime = ProcessRuntime(
            self.database,
            self.gateway,
            owner=self.owner,
            settings=self.runtime_settings,
            services=services,
        )
        self.loaded = []
        for plugin in self.plugins:
            try:
                loaded = plugin.load(organization=local)
                files = [
                    (str(path), data)
                    for entries in loaded.resources.values()
                    for path, data in entries
                ]
                unique = list(dict(files).items())  # shared resources are listed per process
                await publish(self.client, unique, dsf_release=self.dsf_release)
            except BridgeError as exc:
                if plugin.name not in self.optional or exc.retryable:
                    raise
                # A drop-in the server refuses is left out; it never stops the others.
                log.error("plugin.rejected", plugin=plugin.name, reason=str(exc))
                continue
            self.loaded.append(loaded)
            for definition in loaded.definitions.values():
                await self.runtime.deploy(
                    definition,
                    loaded.plugin.handlers,
                    plugin=f"{loaded.plugin.name} {loaded.plugin.version}",
                    model_hash=hashlib.sha256(definition.source.encode()).hexdigest(),
                )
            log.info(
                "plugin.deployed",
                plugin=loaded.plugin.name,
                version=loaded.plugin.version,
                processes=sorted(loaded.definitions),
            )
        if any(loaded.plugin.name == inference_plugin.name for loaded in self.loaded):
            # Sites encrypt study and result packages for this certificate (docs/privacy.md).
            await publish_certificate(
                self.client, identity.certificate.public_bytes(serialization.Encoding.PEM)
            )
            log.info("certificate.published", thumbprint=identity.thumbprint)
            # What a stop left between an upload and its withdrawal goes now; a server that
            # fails here must not keep the bridge from starting (the next start tries again).
            try:
                await sweep_left_packages(self.client, self.database)
            except BridgeError as exc:
                log.warning("transfer.sweep_failed", reason=str(exc))
        self.intake = TaskIntake(
            self.client,
            self.runtime,
            self.database,
            local_organization=local,
            authorizer=TaskAuthorizer(self.client, local, release=self.dsf_release),
            limits=TaskLimits(**self.settings.intake.model_dump()),
            remember=self.gateway.remember_task,
        )
        recovered = await self.intake.recover()
        if recovered:
            log.info("intake.recovered", count=recovered)
        cursor = SqlCursorStore(self.database)
        self.subscriptions = [
            TaskSubscription(self.client, context, self.intake.handle, cursor),
            TaskSubscription(
                self.client,
                context,
                self._questionnaire_response,
                cursor,
                criteria="QuestionnaireResponse?status=completed",
            ),
        ]
        if self.settings.omi.publish and self.registry is not None:
            self.publication = ServicePublication(
                self.registry,
                local,
                service_offers(self.settings.omi),
                self.database,
                interval=self.settings.omi.heartbeat_interval,
                inference_timeout=self.settings.omi.inference_timeout,
                proxy=proxy,
            )
            try:
                await self.publication.publish()
            except BridgeError as exc:
                log.warning("registry.publish_failed", reason=str(exc), retry="next heartbeat")

    async def _questionnaire_response(self, response: dict[str, Any]) -> None:
        """A user task answered: continue its instance and mark the response ``amended``."""
        if response.get("status") != "completed" or self.runtime is None or self.client is None:
            return
        answers = _answers(response)
        user_task_id = answers.pop(USER_TASK_ID_ITEM, None)
        if not isinstance(user_task_id, str):
            return  # not one of ours
        try:
            await self.runtime.complete_user_task(user_task_id, answers)
        except ProcessExecutionError as exc:
            # As DSF's QuestionnaireResponseHandler: "Unable to complete UserTask", logged, the
            # response left as it is (no such instance any more, or the step was undone).
            log.warning("user_task.not_completed", user_task_id=user_task_id, error=str(exc))
            return
        response["status"] = "amended"
        version = int((response.get("meta") or {}).get("versionId") or 0)
        await self.client.update(response, if_match=version, return_minimal=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; a failing loop stops the others and is raised."""
        if self.runtime is None:
            raise RuntimeError("Bridge.run before start")
        loops = [asyncio.ensure_future(s.run(stop)) for s in self.subscriptions]
        loops.append(asyncio.ensure_future(self.runtime.run_forever(stop)))
        if self.intake is not None:
            loops.append(asyncio.ensure_future(self.intake.run_held_sweeps(stop)))
        if self.publication is not None:
            loops.append(asyncio.ensure_future(self.publication.run(stop)))
        log.info("bridge.started", organization=getattr(self.organization, "identifier", None))
        try:
            done, _ = await asyncio.wait(
                [*loops, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task in loops and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            stop.set()
            # The workers drain within the grace period and give their leases back; the
            # subscriptions only close their sockets.
            grace = self.runtime_settings.shutdown_grace.total_seconds()
            for task in loops:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, grace + 10)
            if self.intake is not None:
                await self.intake.aclose()
            # The last look: a Task taken in while the worker loop stopped may have leased
            # its job or effect to this bridge after the loop gave its leases back.
            await self.runtime.release_leases()
            log.info("bridge.stopped")

    async def aclose(self) -> None:
        if self.registry is not None:
            await self.registry.aclose()
        if self.gateway is not None:
            await self.gateway.aclose()
        if self.client is not None:
            await self.client.aclose()
        if self.database is not None:
            await self.database.dispose()
