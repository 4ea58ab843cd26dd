"""The runtime's effects on the DSF network: Tasks posted to remote sites and Task status
updates and user tasks on the local FHIR server, all over the site's mutual-TLS identity."""

from __future__ import annotations

import datetime as dt
import ssl
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from dsf_bridge.dsf.client import FhirClient, RetryPolicy
from dsf_bridge.dsf.endpoints import TargetError, resolve_target
from dsf_bridge.dsf.questionnaires import (
    USER_TASK_ID_ITEM,
    missing_questionnaire_message,
    questionnaire_response,
)
from dsf_bridge.dsf.tasks import (
    TaskFormatError,
    build_task,
    input_values,
    parse_instantiates_canonical,
    updated_task,
    with_outputs,
)
from dsf_bridge.dsf.versions import DSF_2, DsfRelease
from dsf_bridge.dsf.vocabulary import ORGANIZATION_IDENTIFIER_SYSTEM, parse_instant
from dsf_bridge.errors import ProcessExecutionError, RemoteError
from dsf_bridge.proxy import ForwardProxy
from dsf_bridge.runtime.ports import OutgoingTask, UserTaskRequest
from dsf_bridge.telemetry import SEND_SECONDS, timed

__all__ = ["DsfTaskGateway"]


def _fingerprint(task: Mapping[str, Any]) -> tuple[object, ...]:
    """What makes a sent Task this send's: recipient, profile, canonical, message name,
    business and correlation key."""
    recipients = [
        (r.get("identifier") or {}).get("value")
        for r in (task.get("restriction") or {}).get("recipient") or []
    ]
    return (
        tuple(recipients),
        tuple((task.get("meta") or {}).get("profile") or ()),
        task.get("instantiatesCanonical"),
        tuple(input_values(task, "message-name")),
        tuple(input_values(task, "business-key")),
        tuple(input_values(task, "correlation-key")),
    )


log = structlog.get_logger("dsf_bridge.gateway")

# Tasks this bridge put in-progress, as the server answered, until it finishes them: the
# completing PUT needs no GET first. Bounded: an instance that waits long falls back to a GET.
_KNOWN_TASKS = 1_000


def _process_key(canonical: str) -> str:
    """The key of the process a Task instantiates (a metric label; a process model names few)."""
    try:
        return parse_instantiates_canonical(canonical).key
    except TaskFormatError:
        return "unknown"


class DsfTaskGateway:
    """Implements :class:`~dsf_bridge.runtime.ports.TaskGateway` with FHIR clients."""

    def __init__(
        self,
        local: FhirClient,
        ssl_context: ssl.SSLContext | None,
        local_organization: str,
        *,
        retry: RetryPolicy | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        dsf_release: DsfRelease = DSF_2,
        proxy: ForwardProxy | None = None,
    ) -> None:
        """``dsf_release`` is the local FHIR server's (user task responses differ by it);
        ``proxy`` is the site's forward proxy for the remote FHIR servers (``[proxy]``)."""
        self.local = local
        self.ssl_context = ssl_context
        self.local_organization = local_organization
        self.retry = retry
        self.clock = clock
        self.dsf_release = dsf_release
        self.proxy = proxy
        self._remotes: dict[str, FhirClient] = {}
        self._known: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def remember_task(self, task: Mapping[str, Any]) -> None:
        """The local server holds ``task`` as it is (intake's in-progress PUT answered it):
        finishing it starts from this copy instead of a GET; a server that changed it since
        answers 412, and the finish reads it then."""
        task_id = task.get("id")
        if isinstance(task_id, str):
            self._known[task_id] = dict(task)
            self._known.move_to_end(task_id)
            while len(self._known) > _KNOWN_TASKS:
                self._known.popitem(last=False)

    def client_for(self, address: str) -> FhirClient:
        """The client for the DSF FHIR server at ``address`` (the local one, or one kept per
        remote server with the site's mutual TLS identity)."""
        if address == self.local.base_url:
            return self.local
        client = self._remotes.get(address)
        if client is None:
            client = FhirClient(
                address, ssl_context=self.ssl_context, retry=self.retry, proxy=self.proxy
            )
            self._remotes[address] = client
        return client

    async def aclose(self) -> None:
        for client in self._remotes.values():
            await client.aclose()
        self._remotes.clear()

    async def send_task(self, task: OutgoingTask) -> str:
        try:
            target = await resolve_target(self.local, task.target)
        except TargetError as exc:
            raise RemoteError(str(exc), retryable=False) from exc
        body = build_task(
            instantiates_canonical=task.instantiates_canonical,
            message_name=task.message_name,
            profile=task.profile,
            business_key=task.business_key,
            correlation_key=task.correlation_key,
            requester=self.local_organization,
            recipient=target.organization,
            inputs=task.inputs,
            authored_on=task.authored_on or self.clock(),
        )
        client = self.client_for(target.address)
        if task.maybe_delivered and task.authored_on is not None:
            delivered = await self._delivered_before(client, body)
            if delivered is not None:
                log.info(
                    "task.already_sent",
                    message_name=task.message_name,
                    recipient=target.organization,
                    location=delivered,
                )
                return delivered
        with timed(SEND_SECONDS, process=_process_key(task.instantiates_canonical)) as timing:
            try:
                result = await client.create(body, return_minimal=True)
            except RemoteError as exc:
                # 4xx: the server refused the Task (authorization, profile); else unreachable.
                refused = exc.status is not None and 400 <= exc.status < 500
                timing.outcome = "refused" if refused else "error"
                raise
            if result.status != 201 or not result.location:
                timing.outcome = "error"
                raise RemoteError(
                    f"{target.address} answered {result.status} without a Location to the Task",
                    status=result.status,
                )
        log.info(
            "task.sent",
            message_name=task.message_name,
            recipient=target.organization,
            location=result.location,
        )
        return result.location

    async def _delivered_before(self, client: FhirClient, body: dict[str, Any]) -> str | None:
        """The location of a Task an earlier attempt of this send created, if any.

        Searched by requester, profile and ``authoredOn`` (DSF search parameters; the requester
        may read its Tasks), then matched here on the exact ``authoredOn`` instant (fixed when
        the send was queued, to the millisecond), recipient, canonical, message name, business
        key and correlation key. The search asks for a window of a day either side rather than
        the instant: DSF 1.x compares ``authoredOn`` without its time zone, in the server's
        local time. A server that cannot answer leaves the decision to posting again: at least
        once rather than never.
        """
        authored = parse_instant(body.get("authoredOn"))
        if authored is None:
            return None
        window = dt.timedelta(days=1)
        params = [
            ("requester:identifier", f"{ORGANIZATION_IDENTIFIER_SYSTEM}|{self.local_organization}"),
            ("_profile", str((body.get("meta") or {}).get("profile", [""])[0])),
            ("authored-on", f"ge{(authored - window).isoformat(timespec='milliseconds')}"),
            ("authored-on", f"le{(authored + window).isoformat(timespec='milliseconds')}"),
            ("_count", "200"),
        ]
        try:
            found = await client.search("Task", params)
        except RemoteError as exc:
            log.warning("task.resend_check_failed", error=str(exc))
            return None
        wanted = _fingerprint(body)
        for candidate in found:
            if (
                parse_instant(candidate.get("authoredOn")) == authored
                and _fingerprint(candidate) == wanted
                and candidate.get("id")
            ):
                version = (candidate.get("meta") or {}).get("versionId") or "1"
                return f"{client.base_url}/Task/{candidate['id']}/_history/{version}"
        return None

    async def complete_task(
        self, task_id: str, *, outputs: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        await self._finish(task_id, "completed", None, outputs)

    async def fail_task(
        self, task_id: str, message: str, *, outputs: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        await self._finish(task_id, "failed", message, outputs)

    async def _finish(
        self,
        task_id: str,
        status: str,
        error: str | None,
        outputs: Sequence[Mapping[str, Any]],
    ) -> None:
        known = self._known.pop(task_id, None)
        for _ in range(5):  # another writer may win a race (412): read again
            task, known = known or await self.local.read("Task", task_id), None
            if task.get("status") != "in-progress":
                return  # already finished (a repeated effect after a crash) or never ours
            version = int((task.get("meta") or {}).get("versionId") or 0)
            # Outputs go with the completing PUT: DSF 1.x forbids updating a running Task.
            finished = updated_task(with_outputs(task, outputs), status=status, error=error)
            try:
                await self.local.update(finished, if_match=version, return_minimal=True)
                return
            except RemoteError as exc:
                if exc.status in (409, 412):
                    continue
                if exc.status is None or not 400 <= exc.status < 500 or exc.status in (401, 429):
                    raise  # an outage: the outbox retries
                if not outputs and status == "failed":
                    raise
                # The server will not take this Task as it is (outputs its profile refuses,
                # say): never leave it in-progress; fail it plainly, saying why.
                log.error("task.finish_refused", task_id=task_id, status=status, error=str(exc))
                outputs = ()
                status = "failed"
                error = f"{error + '; ' if error else ''}the FHIR server refused the result: {exc}"
        raise RemoteError(f"Task/{task_id} kept changing while it was finished", retryable=True)

    async def create_user_task(self, request: UserTaskRequest) -> str:
        """Create the user task's QuestionnaireResponse as DSF's ``DefaultUserTaskListener``
        does: from the Questionnaire its form key (``url|version``) finds on the local server,
        the first if several; none, or an item type without placeholder, fails the user task
        (not retryable, with DSF's texts; see :mod:`dsf_bridge.dsf.questionnaires`)."""
        bound = log.bind(
            instance_id=request.instance_id,
            business_key=request.business_key,
            user_task_id=request.user_task_id,
        )
        questionnaire = await self._questionnaire(request.form_key)
        response = questionnaire_response(
            questionnaire,
            form_key=request.form_key,
            business_key=request.business_key,
            user_task_id=request.user_task_id,
            organization=self.local_organization,
            dsf_release=self.dsf_release,
            item_texts=request.item_texts,
        )
        result = await self.local.create(response, return_minimal=True)
        if result.status != 201 or not result.id:
            raise RemoteError(
                f"{self.local.base_url} answered {result.status} without a Location to the "
                "QuestionnaireResponse",
                status=result.status,
            )
        bound.info("user_task.created", questionnaire=request.form_key, location=result.location)
        return result.id

    async def _questionnaire(self, form_key: str) -> dict[str, Any]:
        found = [
            resource
            for resource in await self.local.search("Questionnaire", [("url", form_key)])
            if resource.get("resourceType") == "Questionnaire"
        ]
        if not found:
            raise ProcessExecutionError(missing_questionnaire_message(form_key), retryable=False)
        if len(found) > 1:
            log.info("questionnaire.ambiguous", questionnaire=form_key, found=len(found))
        return found[0]

    async def cancel_user_task(self, user_task_id: str) -> None:
        for response in await self.local.search(
            "QuestionnaireResponse", [("status", "in-progress")]
        ):
            for item in response.get("item") or []:
                answers = item.get("answer") or [{}]
                if (
                    item.get("linkId") == USER_TASK_ID_ITEM
                    and answers[0].get("valueString") == user_task_id
                ):
                    response["status"] = "stopped"
                    version = int((response.get("meta") or {}).get("versionId") or 0)
                    await self.local.update(response, if_match=version, return_minimal=True)
