"""A providing site in the OMI registry: its services published, their heartbeats sent.

``dsf-bridge omi publish`` publishes once (:func:`publish_services`); ``dsf-bridge run`` with
``[omi] publish = true`` runs :class:`ServicePublication`, which publishes at start-up and then
every ``[omi] heartbeat_interval`` seconds sends each service's heartbeat, measured here: its
model's readiness on the inference server, the running inference executions in the store
(the queue) and the mean duration of the latest completed ones. A registry that fails is
logged and tried again at the next beat (publishing first); it never stops the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import structlog

from dsf_bridge.config import OmiSettings, Settings
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.errors import BridgeError, ConfigError
from dsf_bridge.omi.contract import REFERENCE_CONTRACT, contract_of
from dsf_bridge.omi.inference import HttpInferenceClient
from dsf_bridge.omi.publish import (
    PublishedResource,
    RegistryPublisher,
    ServiceOffer,
    measure_heartbeat,
)
from dsf_bridge.omi.registry import FhirRegistryClient
from dsf_bridge.plugins.inference import EXECUTION_PROCESS
from dsf_bridge.proxy import ForwardProxy
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.store import Database
from dsf_bridge.store.queries import process_load

__all__ = [
    "ServicePublication",
    "open_registry",
    "publish_services",
    "service_offers",
]

log = structlog.get_logger("dsf_bridge.publishing")

# Latest completed executions whose durations estimate the waiting time.
_RECENT = 20
# A heartbeat asks the model once: the next beat is the retry.
_ONE_TRY = RetryPolicy(attempts=1)


def service_offers(omi: OmiSettings) -> list[ServiceOffer]:
    """The services this site offers: catalogue entries with an ``inference_url``, each with
    the contract it serves (the reference contract unless it names one)."""
    offers = []
    for entry in omi.catalogue:
        if not entry.inference_url:
            continue
        contract = contract_of(entry.contract) or contract_of(REFERENCE_CONTRACT)
        assert contract is not None  # noqa: S101 - the reference contract ships with the bridge
        offers.append(
            ServiceOffer(
                service_id=entry.id,
                name=entry.name or entry.id,
                model_name=entry.model_name or contract.model.name,
                inference_url=entry.inference_url,
                contract=contract,
                model_version=entry.model_version,
            )
        )
    return offers


def _registry_tls(settings: Settings) -> ssl.SSLContext | bool:
    """Mutual TLS with the site's DSF client certificate for an https registry."""
    dsf = settings.dsf
    if dsf.client_certificate is None:
        # No identity to present, but the CAs named for the registry are still the ones trusted.
        cas = settings.omi.registry_ca_certificates or dsf.ca_certificates
        if not cas:
            return True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname checked, cert required
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        for ca in cas:
            try:
                context.load_verify_locations(cafile=str(ca))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"CA file {ca} is not a readable PEM file ({exc})",
                    field="omi.registry_ca_certificates",
                ) from exc
        return context
    password = dsf.client_key_password.get_secret_value() if dsf.client_key_password else None
    identity = load_identity(dsf.client_certificate, dsf.client_key, password=password)
    return build_ssl_context(
        identity,
        settings.omi.registry_ca_certificates or dsf.ca_certificates,
        password=password,
    )


def open_registry(settings: Settings) -> FhirRegistryClient:
    """A client of ``[omi] registry_url`` with the site's TLS identity and ``[proxy]``."""
    url = settings.omi.registry_url
    if url is None:
        raise ConfigError(
            "omi.registry_url is not set: name the site's OMI registry",
            field="omi.registry_url",
        )
    verify = _registry_tls(settings) if url.startswith("https://") else True
    return FhirRegistryClient(url, verify=verify, proxy=settings.proxy.forward_proxy())


async def publish_services(
    registry: FhirRegistryClient, organization: str, offers: list[ServiceOffer]
) -> dict[str, list[PublishedResource]]:
    """Publish every offer; what happened to each resource, by service id."""
    publisher = RegistryPublisher(registry, organization)
    return {offer.service_id: await publisher.publish(offer) for offer in offers}


class ServicePublication:
    """Publishes a providing site's services and sends their heartbeats while the bridge
    runs."""

    def __init__(
        self,
        registry: FhirRegistryClient,
        organization: str,
        offers: list[ServiceOffer],
        database: Database,
        *,
        interval: float,
        inference_timeout: float = 10.0,
        proxy: ForwardProxy | None = None,
    ) -> None:
        self.publisher = RegistryPublisher(registry, organization)
        self.offers = offers
        self.database = database
        self.interval = interval
        self.inference_timeout = inference_timeout
        self.proxy = proxy
        self.published = False
        self.beats = 0  # heartbeats sent, for tests and logs

    async def publish(self) -> None:
        for offer in self.offers:
            await self.publisher.publish(offer)
        self.published = True

    async def beat(self) -> None:
        """One heartbeat for every service (publishing first if that has not succeeded)."""
        if not self.published:
            await self.publish()
        async with self.database.autocommit() as session:  # two reads, nothing to commit
            load = await process_load(session, EXECUTION_PROCESS, recent=_RECENT)
        for offer in self.offers:
            async with HttpInferenceClient(
                offer.inference_url,
                timeout=min(self.inference_timeout, self.interval),
                retry=_ONE_TRY,
                proxy=self.proxy,
            ) as inference:
                heartbeat = await measure_heartbeat(
                    inference,
                    offer,
                    queue_length=load.running,
                    recent_durations=load.recent_durations,
                )
            await self.publisher.beat(offer, heartbeat)
            self.beats += 1
            log.info(
                "heartbeat.sent",
                service=offer.service_id,
                status=heartbeat.status,
                queue=heartbeat.queue_length,
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Beat every ``interval`` seconds until ``stop``; failures are logged, never raised."""
        while not stop.is_set():
            try:
                await self.beat()
            except BridgeError as exc:
                # Published resources may have gone: publish again (idempotent) next time.
                self.published = False
                log.warning("heartbeat.failed", reason=str(exc), retry_in=self.interval)
            except Exception as exc:  # the registry never stops the bridge
                self.published = False
                log.error("heartbeat.failed", reason=repr(exc), retry_in=self.interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
