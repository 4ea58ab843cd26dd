"""User tasks against the sandbox DSF FHIR server of DSF 2.1 and 1.9, over real mutual TLS: the
QuestionnaireResponse the gateway creates is the one DSF's ``DefaultUserTaskListener`` builds
(items in DSF's order with its placeholders), the server accepts it, and the failures carry
DSF's texts.

The Questionnaire is the DSF hello-world plugin's ``hello-user`` (from the reference corpus),
published as the Java BPE publishes an API v1 plugin to each version.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.dsf.publication import for_dsf_2, read_resource
from dsf_bridge.dsf.questionnaires import placeholder_answer
from dsf_bridge.dsf.versions import DSF_1, DSF_2, DsfRelease
from dsf_bridge.errors import ProcessExecutionError, RemoteError
from dsf_bridge.plugins.placeholders import Placeholders
from dsf_bridge.runtime.daemon import _answers
from dsf_bridge.runtime.gateway import DsfTaskGateway
from dsf_bridge.runtime.ports import UserTaskRequest
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.sandbox.sites import SiteFiles, build_service
from dsf_bridge.sandbox.validation import ProfileValidator, base_profiles
from tests.reference import reference_dir, reference_file
from tests.sandbox.harness import FAST_RETRY, LOCAL, forbidden_reasons, sandbox_ca, sandbox_sites

__all__ = ["sandbox_ca", "sandbox_sites"]

HELLO_USER = "dsf-process-hello-world/src/main/resources/fhir/Questionnaire/dsf-hello-user.xml"
HELLO_USER_URL = "http://dsf.dev/fhir/Questionnaire/hello-user"
FORM_KEY = f"{HELLO_USER_URL}|1.0"
QR_PROFILE = "http://dsf.dev/fhir/StructureDefinition/questionnaire-response"
RELEASES = [pytest.param(DSF_2, id="2.1"), pytest.param(DSF_1, id="1.9")]


def hello_user(dsf_release: DsfRelease) -> dict[str, Any]:
    """The hello-world plugin's Questionnaire, version 1.0, as the BPE of ``dsf_release``
    publishes it."""
    placeholders = Placeholders(
        version="1.0", date="2026-01-01", organization=LOCAL, environment={}
    )
    path = reference_file(HELLO_USER)
    resource = read_resource(path, placeholders.replace_fhir_bytes(path.read_bytes()))
    return for_dsf_2(resource) if dsf_release.major >= 2 else resource


def questionnaire(url: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Questionnaire",
        "meta": {
            "tag": [{"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "ALL"}]
        },
        "url": url,
        "version": "1.0",
        "date": "2026-01-01",
        "status": "active",
        "item": [
            {
                "linkId": "business-key",
                "type": "string",
                "text": "The business-key of the process execution",
            },
            {
                "linkId": "user-task-id",
                "type": "string",
                "text": "The user-task-id of the process execution",
            },
            *items,
        ],
    }


@dataclass
class Site:
    dsf_release: DsfRelease
    server: SandboxServer
    local: FhirClient
    gateway: DsfTaskGateway

    def stored(self) -> list[dict[str, Any]]:
        return self.server.service.store.all("QuestionnaireResponse")

    async def start(self, form_key: str = FORM_KEY, number: int = 1) -> str:
        return await self.gateway.create_user_task(
            UserTaskRequest(
                instance_id="instance-1",
                business_key="bk-1",
                user_task_id=f"instance-1/token-{number}",
                form_key=form_key,
            )
        )


@pytest.fixture(params=RELEASES)
async def site(
    request: pytest.FixtureRequest,
    sandbox_ca: CertificateAuthority,
    sandbox_sites: dict[str, SiteFiles],
) -> AsyncIterator[Site]:
    """A sandbox FHIR server of one DSF version with ``hello-user`` published, and a gateway."""
    dsf_release: DsfRelease = request.param
    files = sandbox_sites[LOCAL]
    service = build_service(
        LOCAL, json.loads(files.allow_list.read_text()), files.base_url, dsf_release=dsf_release
    )
    assert service.validator is not None, "the sandbox validates as DSF does"
    async with SandboxServer(
        service, certificate=files.server_certificate, key=files.server_key, ca_files=[files.ca]
    ) as server:
        context = build_ssl_context(
            load_identity(files.client_certificate, files.client_key), [files.ca]
        )
        local = FhirClient(server.base_url, ssl_context=context, retry=FAST_RETRY)
        await local.create(hello_user(dsf_release))
        gateway = DsfTaskGateway(local, context, LOCAL, dsf_release=dsf_release)
        try:
            yield Site(dsf_release, server, local, gateway)
        finally:
            await gateway.aclose()
            await local.aclose()


# The hello-user items after business-key and user-task-id, with DSF's placeholders.
HELLO_USER_ITEMS: list[tuple[str, dict[str, Any] | None]] = [
    ("display-example", None),
    ("string-example", {"valueString": "Placeholder.."}),
    ("text-example", {"valueString": "Placeholder.."}),
    ("integer-example", {"valueInteger": 0}),
    ("decimal-example", {"valueDecimal": 0.0}),
    ("date-example", {"valueDate": "1900-01-01"}),
    ("time-example", {"valueTime": "00:00:00"}),
    ("date-time-example", {"valueDateTime": "1900-01-01T00:00:00.000Z"}),
    ("url-example", {"valueUri": "http://example.org/foo"}),
    (
        "reference-example",
        {"valueReference": {"reference": "http://example.org/fhir/Placeholder/id"}},
    ),
    ("boolean-example", {"valueBoolean": False}),
]


async def test_the_response_is_dsfs_with_placeholders_and_is_accepted(site: Site) -> None:
    with forbidden_reasons() as reasons:
        created_id = await site.start()
    assert reasons == []
    response = await site.local.read("QuestionnaireResponse", created_id)

    assert response["status"] == "in-progress"
    assert response["questionnaire"] == FORM_KEY
    assert response["author"] == {
        "type": "Organization",
        "identifier": {"system": "http://dsf.dev/sid/organization-identifier", "value": LOCAL},
    }
    # DSF sets neither: the UI writes authored when the form is completed.
    assert "authored" not in response and "identifier" not in response
    profiles = response["meta"].get("profile")
    assert profiles == ([QR_PROFILE] if site.dsf_release.major >= 2 else None)

    items = response["item"]
    assert items[:2] == [
        {
            "linkId": "business-key",
            "text": "The business-key of the process execution",
            "answer": [{"valueString": "bk-1"}],
        },
        {
            "linkId": "user-task-id",
            "text": "The user-task-id of the process execution",
            "answer": [{"valueString": "instance-1/token-1"}],
        },
    ]
    source = {q["linkId"]: q["text"] for q in hello_user(site.dsf_release)["item"]}
    assert [(i["linkId"], (i.get("answer") or [None])[0]) for i in items[2:]] == HELLO_USER_ITEMS
    assert all(i["text"] == source[i["linkId"]] for i in items)
    assert all(set(i) <= {"linkId", "text", "answer"} for i in items)


async def test_the_response_conforms_to_dsfs_profile_of_the_version(site: Site) -> None:
    """On 1.9 the response claims no profile (as the Java 1.9 BPE's), so the server checks the
    core type only; it conforms to the 1.9 profile all the same, which the UI relies on."""
    created_id = await site.start()
    response = await site.local.read("QuestionnaireResponse", created_id)
    validator = ProfileValidator(base_profiles(site.dsf_release.name, reference_dir()))
    claimed = copy.deepcopy(response)
    claimed["meta"]["profile"] = [QR_PROFILE]
    assert validator.validate(claimed) == []


async def test_a_missing_questionnaire_fails_with_dsfs_text(site: Site) -> None:
    form_key = f"{HELLO_USER_URL}|9.9"
    with pytest.raises(ProcessExecutionError) as raised:
        await site.start(form_key)
    assert str(raised.value) == (
        "Could not find Questionnaire resource with url|version="
        "http://dsf.dev/fhir/Questionnaire/hello-user|9.9"
    )
    assert raised.value.retryable is False
    assert site.stored() == []


@pytest.mark.parametrize(
    ("item_type", "display"),
    [("group", "Group"), ("open-choice", "Open Choice"), ("attachment", "Attachment")],
)
async def test_an_item_type_without_placeholder_fails_with_dsfs_text(
    site: Site, item_type: str, display: str
) -> None:
    url = f"http://test.org/fhir/Questionnaire/{item_type}"
    item: dict[str, Any] = {"linkId": "x", "type": item_type, "text": "X"}
    if item_type == "group":
        item["item"] = [{"linkId": "x.1", "type": "string", "text": "X.1"}]
    await site.local.create(questionnaire(url, [item]))
    with pytest.raises(ProcessExecutionError) as raised:
        await site.start(f"{url}|1.0")
    assert str(raised.value) == (
        f"Type '{display}' in Questionnaire.item is not supported as answer type"
    )
    assert raised.value.retryable is False
    assert site.stored() == []


async def test_choice_and_quantity_have_placeholders_from_dsf_2_on(site: Site) -> None:
    url = "http://test.org/fhir/Questionnaire/choice-quantity"
    items = [
        {"linkId": "choice", "type": "choice", "text": "Pick one"},
        {"linkId": "quantity", "type": "quantity", "text": "How much"},
    ]
    await site.local.create(questionnaire(url, items))
    if site.dsf_release.major < 2:
        with pytest.raises(ProcessExecutionError, match=r"^Type 'Choice' in Questionnaire\.item"):
            await site.start(f"{url}|1.0")
        assert site.stored() == []
        return
    created_id = await site.start(f"{url}|1.0")
    response = await site.local.read("QuestionnaireResponse", created_id)
    assert [i["answer"] for i in response["item"][2:]] == [
        [{"valueCoding": {"system": "http://example.org/fhir/CodeSystem/name", "code": "code"}}],
        [
            {
                "valueQuantity": {
                    "value": 0,
                    "unit": "unit",
                    "system": "http://example.org/fhir/CodeSystem/name",
                    "code": "code",
                }
            }
        ],
    ]


async def test_only_top_level_items_are_copied(site: Site) -> None:
    """DSF does not visit nested items: a display item's children are dropped."""
    url = "http://test.org/fhir/Questionnaire/nested"
    item = {
        "linkId": "intro",
        "type": "display",
        "text": "Read this",
        "item": [{"linkId": "intro.detail", "type": "string", "text": "Detail"}],
    }
    await site.local.create(questionnaire(url, [item]))
    response = await site.local.read("QuestionnaireResponse", await site.start(f"{url}|1.0"))
    assert response["item"][2:] == [{"linkId": "intro", "text": "Read this"}]


async def test_an_item_without_text_is_refused_by_dsf_2_only(site: Site) -> None:
    """DSF copies an item's text as it is; DSF 2.x's profile (applied by the server to every
    response) needs one, DSF 1.9's server checks a response without profile against the core
    type only."""
    url = "http://test.org/fhir/Questionnaire/no-text"
    await site.local.create(questionnaire(url, [{"linkId": "bare", "type": "boolean"}]))
    if site.dsf_release.major >= 2:
        with pytest.raises(RemoteError) as raised:
            await site.start(f"{url}|1.0")
        assert raised.value.status == 403
        assert site.stored() == []
    else:
        response = await site.local.read("QuestionnaireResponse", await site.start(f"{url}|1.0"))
        assert response["item"][2:] == [{"linkId": "bare", "answer": [{"valueBoolean": False}]}]


async def test_the_first_of_several_questionnaires_is_used(site: Site) -> None:
    url = "http://test.org/fhir/Questionnaire/twice"
    # Two with the same url|version: only a server bypassing its own checks holds them.
    for link_id in ("first", "second"):
        site.server.service.store.create(
            questionnaire(url, [{"linkId": link_id, "type": "string", "text": link_id}])
        )
    found = await site.local.search("Questionnaire", [("url", f"{url}|1.0")])
    first = found[0]["item"][2]["linkId"]
    response = await site.local.read("QuestionnaireResponse", await site.start(f"{url}|1.0"))
    assert [i["linkId"] for i in response["item"][2:]] == [first]


async def test_the_completed_form_gives_the_answers_as_variables(site: Site) -> None:
    """The DSF FHIR UI completes the response (answers, ``authored``; blank optional items
    dropped); the server accepts it and the bridge reads the answers by linkId."""
    response = await site.local.read("QuestionnaireResponse", await site.start())
    answers = {
        "string-example": {"valueString": "a string"},
        "text-example": {"valueString": "a text"},
        "integer-example": {"valueInteger": 42},
        "decimal-example": {"valueDecimal": 1.5},
        "date-example": {"valueDate": "2026-02-03"},
        "boolean-example": {"valueBoolean": True},
        "reference-example": {"valueReference": {"reference": "https://dic.test/fhir/Group/1"}},
    }
    completed = copy.deepcopy(response)
    completed["status"] = "completed"
    completed["authored"] = "2026-02-03T10:00:00.000Z"
    completed["item"] = [
        {**i, "answer": [answers[i["linkId"]]]} if i["linkId"] in answers else i
        for i in response["item"]
        if i["linkId"] in answers
        or i["linkId"] in ("business-key", "user-task-id")
        or "answer" not in i
    ]
    with forbidden_reasons() as reasons:
        updated = await site.local.update(completed, if_match=1)
    assert updated.status == 200, reasons

    variables = _answers(completed)
    assert variables == {
        "business-key": "bk-1",
        "user-task-id": "instance-1/token-1",
        "string-example": "a string",
        "text-example": "a text",
        "integer-example": 42,
        "decimal-example": 1.5,
        "date-example": "2026-02-03",
        "boolean-example": True,
        "reference-example": {"reference": "https://dic.test/fhir/Group/1"},
    }


async def test_a_cancelled_user_task_stops_its_response(site: Site) -> None:
    kept = await site.start(number=1)
    cancelled = await site.start(number=2)
    await site.gateway.cancel_user_task("instance-1/token-2")
    assert (await site.local.read("QuestionnaireResponse", cancelled))["status"] == "stopped"
    assert (await site.local.read("QuestionnaireResponse", kept))["status"] == "in-progress"


# -- the placeholders alone -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item_type", "answer"),
    [
        ("string", {"valueString": "Placeholder.."}),
        ("text", {"valueString": "Placeholder.."}),
        ("integer", {"valueInteger": 0}),
        ("decimal", {"valueDecimal": 0.0}),
        ("boolean", {"valueBoolean": False}),
        ("date", {"valueDate": "1900-01-01"}),
        ("time", {"valueTime": "00:00:00"}),
        ("dateTime", {"valueDateTime": "1900-01-01T00:00:00.000Z"}),
        ("url", {"valueUri": "http://example.org/foo"}),
        ("reference", {"valueReference": {"reference": "http://example.org/fhir/Placeholder/id"}}),
    ],
)
@pytest.mark.parametrize("dsf_release", RELEASES)
def test_placeholder_of_each_type(
    item_type: str, answer: dict[str, Any], dsf_release: DsfRelease
) -> None:
    assert placeholder_answer({"linkId": "a", "type": item_type}, dsf_release) == answer


@pytest.mark.parametrize(
    ("item_type", "display"),
    [
        ("question", "Question"),
        ("display", "Display"),
        ("group", "Group"),
        ("open-choice", "Open Choice"),
        ("attachment", "Attachment"),
    ],
)
def test_types_without_placeholder_name_hapis_display(item_type: str, display: str) -> None:
    with pytest.raises(ProcessExecutionError, match=rf"^Type '{display}' in Questionnaire\.item"):
        placeholder_answer({"linkId": "a", "type": item_type})


def test_an_item_without_type_is_a_clear_error() -> None:
    with pytest.raises(ProcessExecutionError, match="linkId 'a' has no type"):
        placeholder_answer({"linkId": "a"})


def test_placeholders_are_fresh_copies() -> None:
    first = placeholder_answer({"type": "reference"})
    first["valueReference"]["reference"] = "changed"
    assert placeholder_answer({"type": "reference"})["valueReference"]["reference"] == (
        "http://example.org/fhir/Placeholder/id"
    )
