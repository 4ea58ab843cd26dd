"""``dsf-bridge check-connection``: every step from the certificate to a bound websocket, each
reported as OK or with an error that says how to fix it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from dsf_bridge.config import DsfSettings
from dsf_bridge.dsf.client import FhirClient, RetryPolicy
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.dsf.organization import find_local_organization
from dsf_bridge.dsf.subscription import SubscriptionSettings, TaskSubscription, websocket_url
from dsf_bridge.dsf.versions import server_release
from dsf_bridge.errors import BridgeError, ConfigError
from dsf_bridge.proxy import ForwardProxy

__all__ = ["ConnectionStep", "check_connection"]

_NO_RETRY = RetryPolicy(attempts=1)


@dataclass(frozen=True)
class ConnectionStep:
    name: str
    ok: bool
    detail: str


class _NoCursor:
    async def load(self, resource_type: str) -> None:
        return None

    async def save(self, resource_type: str, last_updated: object) -> None:
        return None


async def _ignore(_resource: dict[str, object]) -> None:
    return None


def _required(settings: DsfSettings) -> tuple[str, Path]:
    missing = [
        name
        for name in ("fhir_base_url", "client_certificate")
        if getattr(settings, name) in (None, "")
    ]
    if missing or settings.fhir_base_url is None or settings.client_certificate is None:
        raise ConfigError(
            f"dsf.{missing[0]} is not set; see docs/operations.md", field=f"dsf.{missing[0]}"
        )
    return settings.fhir_base_url, settings.client_certificate


async def check_connection(
    settings: DsfSettings, *, proxy: ForwardProxy | None = None
) -> AsyncIterator[ConnectionStep]:
    """Run the checks in order; stop after the first failure (later steps depend on it).
    ``proxy`` is the site's forward proxy (``[proxy]``): REST and websocket go through it
    unless the server's host bypasses it."""
    try:
        base_url, certificate = _required(settings)
        password = (
            settings.client_key_password.get_secret_value()
            if settings.client_key_password is not None
            else None
        )
        identity = load_identity(certificate, settings.client_key, password=password)
    except BridgeError as exc:
        yield ConnectionStep("client certificate", False, str(exc))
        return
    info = identity.describe()
    yield ConnectionStep(
        "client certificate",
        True,
        f"thumbprint {info['thumbprint']}, subject {info['subject']}, issuer {info['issuer']}, "
        f"valid until {info['not_after']}",
    )
    try:
        context = build_ssl_context(identity, settings.ca_certificates, password=password)
    except BridgeError as exc:
        yield ConnectionStep("TLS configuration", False, str(exc))
        return
    route = proxy.route(base_url) if proxy is not None else None
    through = f", through the proxy {route.url}" if route is not None else ""
    yield ConnectionStep(
        "TLS configuration", True, f"{len(settings.ca_certificates)} CA file(s){through}"
    )

    async with FhirClient(
        base_url, ssl_context=context, retry=_NO_RETRY, timeout=15, proxy=proxy
    ) as client:
        try:
            dsf_release = await server_release(client)
        except BridgeError as exc:
            yield ConnectionStep("FHIR server", False, str(exc))
            return
        yield ConnectionStep(
            "FHIR server",
            True,
            f"{base_url} answers (DSF {dsf_release.major}.x, base Task profile "
            f"{dsf_release.task_base_canonical})",
        )

        try:
            organization = await find_local_organization(client, base_url)
            organization.require_thumbprint(identity.thumbprint)
        except BridgeError as exc:
            yield ConnectionStep("local organization", False, str(exc))
            return
        yield ConnectionStep(
            "local organization", True, f"{organization.identifier} (thumbprint registered)"
        )

        for criteria, required in (
            ("Task?status=requested", True),
            ("QuestionnaireResponse?status=completed", False),
        ):
            subscription = TaskSubscription(
                client,
                context,
                _ignore,
                _NoCursor(),
                criteria=criteria,
                settings=SubscriptionSettings(bind_timeout=dt.timedelta(seconds=10)),
            )
            try:
                subscription_id, payload = await subscription.find_subscription()
            except BridgeError as exc:
                yield ConnectionStep(f"Subscription {criteria}", not required, str(exc))
                if required:
                    return
                continue
            kind = "with JSON payload" if payload else "without payload (ping frames)"
            yield ConnectionStep(f"Subscription {criteria}", True, f"{subscription_id}, {kind}")
            if not required:
                continue
            try:
                async with _bound(subscription) as url:
                    pass
            except (BridgeError, OSError, TimeoutError) as exc:
                detail = str(exc) or type(exc).__name__
                yield ConnectionStep("websocket", False, f"bind failed: {detail}")
                return
            except Exception as exc:  # websockets' handshake errors have no common base we import
                yield ConnectionStep("websocket", False, f"{type(exc).__name__}: {exc}")
                return
            yield ConnectionStep("websocket", True, f"bound at {url}")


@contextlib.asynccontextmanager
async def _bound(subscription: TaskSubscription) -> AsyncIterator[str]:
    stop = asyncio.Event()
    runner = asyncio.ensure_future(subscription.run_connected(stop))
    bound = asyncio.ensure_future(subscription.bound.wait())
    try:
        done, _ = await asyncio.wait(
            {runner, bound}, timeout=15, return_when=asyncio.FIRST_COMPLETED
        )
        if runner in done:
            runner.result()  # raises the connection error
            raise TimeoutError("the connection closed before 'bound'")
        if bound not in done:
            raise TimeoutError("no 'bound' answer within 15 s")
        yield websocket_url(subscription.client.base_url)
    finally:
        stop.set()
        bound.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(runner, 5)
