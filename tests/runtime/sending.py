"""Shared set-up for the sending tests: site A runs the request/reply process and sends its
request Task to site B over the sandbox network; also runnable as a script that is killed
right after the commit that queues the send (``python -m tests.runtime.sending DB CONFIG``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from dsf_bridge.dsf.client import FhirClient, RetryPolicy
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.engine import load_process
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry, SendContext
from dsf_bridge.proxy import ForwardProxy
from dsf_bridge.runtime.gateway import DsfTaskGateway
from dsf_bridge.runtime.ports import OutgoingTask
from dsf_bridge.runtime.processes import ProcessRuntime, RuntimeSettings
from dsf_bridge.sandbox.network import SandboxNetwork
from dsf_bridge.store import Database
from dsf_bridge.store.tables import OutboxEntry

MODEL = Path(__file__).with_name("request_reply.bpmn")
KEY = "testorg_requestReply"
FAST = RetryPolicy(attempts=4, initial_delay=0.01, max_delay=0.05, retry_after_cap=0.1)


def activity_definition(url: str, message: str, profile: str) -> dict[str, Any]:
    """An ActivityDefinition that lets any remote organization send ``message`` with
    ``profile`` to this site's process ``url`` (version 1.0)."""
    coding = "http://dsf.dev/fhir/CodeSystem/process-authorization"
    return {
        "resourceType": "ActivityDefinition",
        "meta": {
            "tag": [{"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "ALL"}]
        },
        "url": url,
        "version": "1.0",
        "status": "active",
        "kind": "Task",
        "extension": [
            {
                "url": "http://dsf.dev/fhir/StructureDefinition/extension-process-authorization",
                "extension": [
                    {"url": "message-name", "valueString": message},
                    {"url": "task-profile", "valueCanonical": profile},
                    {"url": "requester", "valueCoding": {"system": coding, "code": "REMOTE_ALL"}},
                    {"url": "recipient", "valueCoding": {"system": coding, "code": "LOCAL_ALL"}},
                ],
            }
        ],
    }


PROVIDER_DEFINITION = activity_definition(
    "http://test.org/bpe/Process/provide",
    "request",
    "http://test.org/fhir/StructureDefinition/task-request|1.0",
)


def site_config(net: SandboxNetwork, organization: str, target: str) -> dict[str, str]:
    """What a bridge of ``organization`` in ``net`` needs, sending to ``target``."""
    site = net.sites[organization]
    return {
        "organization": organization,
        "base_url": net.base_url(organization),
        "certificate": str(site.client_certificate),
        "key": str(site.client_key),
        "ca": str(site.ca),
        "target": target,
    }


def handlers() -> HandlerRegistry:
    registry = HandlerRegistry()
    # Replies only from the organization asked: a reply taken in through intake proves that
    # intake hands the requester on.
    registry.replies_only_from_recipients("reply")

    @registry.service("org.test.Prepare")
    def prepare(ctx: HandlerContext) -> None:
        ctx.set("studyUid", "1.2.3")

    @registry.message_send("org.test.SendRequest")
    def send_request(ctx: SendContext) -> None:
        ctx.add_input("http://test.org/fhir/CodeSystem/omi", "study", ctx.get("studyUid"))

    @registry.service("org.test.StoreResult")
    def store_result(ctx: HandlerContext) -> None:
        return None

    @registry.service("org.test.HandleTimeout")
    def handle_timeout(ctx: HandlerContext) -> None:
        return None

    return registry


def site_client(config: dict[str, str]) -> tuple[FhirClient, Any]:
    identity = load_identity(Path(config["certificate"]), Path(config["key"]))
    context = build_ssl_context(identity, [Path(config["ca"])])
    return FhirClient(config["base_url"], ssl_context=context, retry=FAST), context


async def runtime_for(
    database: Database,
    config: dict[str, str],
    owner: str,
    settings: RuntimeSettings | None = None,
    clock: Callable[[], dt.datetime] | None = None,
    *,
    proxy: ForwardProxy | None = None,
) -> tuple[ProcessRuntime, DsfTaskGateway]:
    client, context = site_client(config)
    gateway = DsfTaskGateway(client, context, config["organization"], retry=FAST, proxy=proxy)
    runtime = ProcessRuntime(database, gateway, owner=owner, settings=settings)
    if clock is not None:
        runtime.clock = clock
    definition = load_process(MODEL.read_bytes(), MODEL.name, resource_version="1.0")
    await runtime.deploy(definition, handlers(), plugin="test", model_hash="0" * 64)
    return runtime, gateway


async def close(gateway: DsfTaskGateway) -> None:
    await gateway.aclose()
    await gateway.local.aclose()


async def _killed_after_commit(db_url: str, config: dict[str, str]) -> None:
    database = Database(db_url)
    runtime, _gateway = await runtime_for(database, config, owner="doomed")
    await runtime.start(
        KEY,
        message_name="start",
        business_key="bk-kill",
        variables={"target": {"organizationIdentifier": config["target"]}},
    )
    # Worker rounds without the outbox: continuation, prepare, send handler (Task queued).
    for _ in range(5):
        async with database.transaction() as session:
            queued = (await session.execute(select(func.count(OutboxEntry.id)))).scalar_one()
        if queued:
            # Killed between the commit that queued the Task and the send.
            os.kill(os.getpid(), signal.SIGKILL)
        await runtime._run_due_jobs()  # one worker round, never the outbox
    raise SystemExit("the send was never queued")


# The doomed process's leases expire this soon, so that the restarted one may take over.
SHORT_LEASE = RuntimeSettings(lease=dt.timedelta(seconds=1))


async def _killed_after_send(db_url: str, config: dict[str, str]) -> None:
    database = Database(db_url)
    runtime, gateway = await runtime_for(database, config, owner="doomed", settings=SHORT_LEASE)
    post = gateway.send_task

    async def post_then_die(task: OutgoingTask) -> str:
        location = await post(task)
        # The target holds the Task; the commit that records the send never happens.
        os.kill(os.getpid(), signal.SIGKILL)
        return location  # pragma: no cover

    gateway.send_task = post_then_die  # type: ignore[method-assign]
    await runtime.start(
        KEY,
        message_name="start",
        business_key="bk-posted",
        variables={"target": {"organizationIdentifier": config["target"]}},
    )
    await runtime.run_until_idle()
    raise SystemExit("the send was never performed")


if __name__ == "__main__":
    doom = _killed_after_send if sys.argv[3:] == ["after-send"] else _killed_after_commit
    asyncio.run(doom(sys.argv[1], json.loads(sys.argv[2])))
