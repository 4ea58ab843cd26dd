"""The site's side of issue 13's transfers: the :class:`~dsf_bridge.plugins.transfer.TransferSite`
handlers get (``omi.transfer``), built from the site's identity, store and settings."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import structlog

from dsf_bridge.config import Settings
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.crypto import KemPrivateKey, UnsupportedKeyError, decryption_key
from dsf_bridge.dsf.identity import ClientIdentity
from dsf_bridge.omi.pseudonymize import Pseudonymizer, policy_from_settings
from dsf_bridge.plugins.transfer import TransferSite, sweep_packages
from dsf_bridge.store import Database
from dsf_bridge.store.repository import (
    any_running_with_business_key,
    original_uids,
    record_pseudonyms,
)

__all__ = ["SqlPseudonyms", "sweep_left_packages", "transfer_site"]

log = structlog.get_logger("dsf_bridge.runtime.transfers")


class SqlPseudonyms:
    """The mapping of original and replacement UIDs in the site's own store (``0006``)."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def record(self, original_study_uid: str, uids: Mapping[str, str]) -> None:
        async with self._database.transaction() as session:
            await record_pseudonyms(session, original_study_uid, uids)

    async def originals(self, replaced: list[str], *, study: str | None = None) -> dict[str, str]:
        async with self._database.transaction() as session:
            return await original_uids(session, replaced, study=study)


async def sweep_left_packages(client: FhirClient, database: Database) -> int:
    """At start-up: the packages a stop left on this site's DSF FHIR server whose instance no
    longer runs are withdrawn (:func:`~dsf_bridge.plugins.transfer.sweep_packages`)."""

    async def running(business_key: str) -> bool:
        async with database.transaction() as session:
            return await any_running_with_business_key(session, business_key)

    return await sweep_packages(client, running)


def transfer_site(  # noqa: PLR0917 - six parts of one site, each named at the call
    settings: Settings,
    identity: ClientIdentity,
    local: FhirClient,
    remote: Callable[[str], FhirClient],
    database: Database,
    organization: str,
) -> TransferSite:
    """The transfer service of a site. Without ``[pseudonymization] secret`` (or with
    ``enabled = false``) the site can still provide inference and receive packages; it only
    refuses to send a study (the request fails with request-invalid, saying why)."""
    pseudonymization = settings.pseudonymization
    pseudonymizer = None
    if pseudonymization.enabled and pseudonymization.secret is not None:
        pseudonymizer = Pseudonymizer(policy_from_settings(pseudonymization))
    else:
        log.info(
            "transfer.no_pseudonymization",
            reason="disabled" if not pseudonymization.enabled else "no secret",
        )
    try:
        private_key: KemPrivateKey | None = decryption_key(identity.key)
    except UnsupportedKeyError as exc:
        private_key = None
        log.warning("transfer.cannot_decrypt", reason=str(exc))
    omi = settings.omi
    return TransferSite(
        local=local,
        remote=remote,
        private_key=private_key,
        certificate=identity.certificate,
        local_organization=organization,
        pseudonymizer=pseudonymizer,
        pseudonyms=SqlPseudonyms(database),
        directory=omi.transfer_dir,
        max_bytes=omi.max_package_bytes,
        max_instances=omi.max_package_instances,
    )
