"""The organization a store belongs to: written at a bridge's first run, checked at every run.

Two sites' bridges pointed at one store (the same ``./dsf-bridge.db``, or one PostgreSQL
database) would take each other's Tasks and instances for their own; the one-row
``store_owner`` table ties the store to the DSF organization identifier of the site that first
ran on it, and a bridge of another organization refuses to run on it.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dsf_bridge.errors import ConfigError
from dsf_bridge.store.audit import append_event
from dsf_bridge.store.repository import insert_ignoring_duplicates
from dsf_bridge.store.tables import StoreOwner

__all__ = ["bind_store", "store_owner"]

_OWNER_ID = 1


async def store_owner(session: AsyncSession) -> str | None:
    """The organization identifier the store belongs to; ``None`` before the first run."""
    return await session.scalar(select(StoreOwner.organization).where(StoreOwner.id == _OWNER_ID))


async def bind_store(session: AsyncSession, organization: str, *, actor: str) -> bool:
    """Tie the store to ``organization`` if it belongs to none yet (``True``, audited as
    ``store.bound``); raise :class:`ConfigError` naming both identifiers if it belongs to
    another."""
    if not organization or organization != organization.strip():
        # ``db upgrade --organization ""`` (an unset variable) bound the store to no site,
        # and every run after refused it.
        raise ConfigError(
            f"organization: {organization!r} is no DSF organization identifier",
            field="organization",
        )
    owner = await store_owner(session)
    bound = False
    if owner is None:
        # Two replicas starting on one new store: whichever inserts first, both read it.
        await session.execute(
            insert_ignoring_duplicates(session, StoreOwner).values(
                id=_OWNER_ID, organization=organization, bound_at=dt.datetime.now(dt.UTC)
            )
        )
        owner = await store_owner(session)
        bound = owner == organization
        if bound:
            await append_event(
                session,
                actor=actor,
                subject=f"Organization/{organization}",
                action="store.bound",
                reason="the store belongs to this organization from now on",
            )
    if owner != organization:
        raise ConfigError(
            f"db.url: this store belongs to organization {owner!r}, but this bridge runs for "
            f"organization {organization!r} (its certificate's Organization on the FHIR "
            "server): point db.url at this site's own store",
            field="db.url",
        )
    return bound
