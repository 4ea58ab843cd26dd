"""Practitioner requesters in process authorization (DSF's ``ProcessAuthorizationHelperImpl``,
``All``/``Organization``/``Role`` with practitioner roles) and in the bridge's intake check."""

from __future__ import annotations

from typing import Any

from dsf_bridge.dsf.authorization import (
    DSF_ADMIN,
    PRACTITIONER_ROLE_SYSTEM,
    Party,
    TaskAuthorizer,
    authorization_denied,
    coding_authorizes,
)
from dsf_bridge.dsf.tasks import read_message
from dsf_bridge.dsf.versions import DSF_1, DSF_2

LOCAL = "Test_Organization"
PARENT = "Parent_Organization"
ORG = "http://dsf.dev/sid/organization-identifier"
SYSTEM = "http://dsf.dev/fhir/CodeSystem/process-authorization"
SD = "http://dsf.dev/fhir/StructureDefinition/extension-process-authorization"
PROFILE = "http://dsf.dev/fhir/StructureDefinition/test-task"
PROCESS = "http://dsf.dev/bpe/Process/test"
DIC_USER = (PRACTITIONER_ROLE_SYSTEM, "DIC_USER")
ORG_ROLE = {"system": "http://dsf.dev/fhir/CodeSystem/organization-role", "code": "DIC"}


def _role(code: str) -> dict[str, Any]:
    return {"system": PRACTITIONER_ROLE_SYSTEM, "code": code}


def all_practitioner(code: str = "DIC_USER") -> dict[str, Any]:
    return {
        "system": SYSTEM,
        "code": "LOCAL_ALL_PRACTITIONER",
        "extension": [{"url": f"{SD}-practitioner", "valueCoding": _role(code)}],
    }


def organization_practitioner(organization: str = LOCAL) -> dict[str, Any]:
    return {
        "system": SYSTEM,
        "code": "LOCAL_ORGANIZATION_PRACTITIONER",
        "extension": [
            {
                "url": f"{SD}-organization-practitioner",
                "extension": [
                    {
                        "url": "organization",
                        "valueIdentifier": {"system": ORG, "value": organization},
                    },
                    {"url": "practitioner-role", "valueCoding": _role("DIC_USER")},
                ],
            }
        ],
    }


def role_practitioner() -> dict[str, Any]:
    return {
        "system": SYSTEM,
        "code": "LOCAL_ROLE_PRACTITIONER",
        "extension": [
            {
                "url": f"{SD}-parent-organization-role-practitioner",
                "extension": [
                    {
                        "url": "parent-organization",
                        "valueIdentifier": {"system": ORG, "value": PARENT},
                    },
                    {"url": "organization-role", "valueCoding": ORG_ROLE},
                    {"url": "practitioner-role", "valueCoding": _role("DIC_USER")},
                ],
            }
        ],
    }


AFFILIATION = {
    "resourceType": "OrganizationAffiliation",
    "active": True,
    "organization": {"identifier": {"system": ORG, "value": PARENT}},
    "participatingOrganization": {"identifier": {"system": ORG, "value": LOCAL}},
    "code": [{"coding": [ORG_ROLE]}],
}


def practitioner(*roles: tuple[str, str], admin: bool = False) -> Party:
    return Party(
        LOCAL,
        local=True,
        practitioner="practitioner@invalid",
        practitioner_roles=frozenset(roles),
        dsf_admin=admin,
    )


def test_local_all_practitioner_wants_the_role() -> None:
    assert coding_authorizes(all_practitioner(), practitioner(DIC_USER))
    assert not coding_authorizes(all_practitioner("UAC_USER"), practitioner(DIC_USER))
    assert not coding_authorizes(all_practitioner(), Party(LOCAL, local=True))


def test_organization_and_role_practitioner() -> None:
    assert coding_authorizes(organization_practitioner(), practitioner(DIC_USER))
    assert not coding_authorizes(organization_practitioner("Other"), practitioner(DIC_USER))
    assert coding_authorizes(role_practitioner(), practitioner(DIC_USER), [AFFILIATION])
    assert not coding_authorizes(role_practitioner(), practitioner(DIC_USER), [])


def test_organization_codings_refuse_practitioners_but_dsf_admin() -> None:
    local_all = {"system": SYSTEM, "code": "LOCAL_ALL"}
    assert not coding_authorizes(local_all, practitioner(DIC_USER))
    assert coding_authorizes(local_all, practitioner(DSF_ADMIN, admin=True))
    # DSF_ADMIN passes practitioner codings whatever role they name.
    assert coding_authorizes(all_practitioner("UAC_USER"), practitioner(DSF_ADMIN, admin=True))


def test_unknown_roles_trust_the_server_for_practitioner_codings_only() -> None:
    unknown = Party(LOCAL, local=True, practitioner="p@example.org", practitioner_roles=None)
    assert coding_authorizes(all_practitioner("UAC_USER"), unknown)
    assert not coding_authorizes({"system": SYSTEM, "code": "LOCAL_ALL"}, unknown)


def test_coding_without_its_detail_extension_admits_nobody() -> None:
    bare = {"system": SYSTEM, "code": "LOCAL_ALL_PRACTITIONER"}
    assert not coding_authorizes(bare, practitioner(DIC_USER))


def activity_definition(*requesters: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "ActivityDefinition",
        "url": PROCESS,
        "version": "1.0",
        "status": "active",
        "extension": [
            {
                "url": SD,
                "extension": [
                    {"url": "message-name", "valueString": "start"},
                    {"url": "task-profile", "valueCanonical": f"{PROFILE}|1.0"},
                    *[{"url": "requester", "valueCoding": r} for r in requesters],
                    {"url": "recipient", "valueCoding": {"system": SYSTEM, "code": "LOCAL_ALL"}},
                ],
            }
        ],
    }


def test_denial_names_the_practitioner() -> None:
    reason = authorization_denied(
        activity_definition({"system": SYSTEM, "code": "LOCAL_ALL"}),
        message_name="start",
        profiles=[PROFILE],
        requester=practitioner(DIC_USER),
        recipient=Party(LOCAL, local=True),
    )
    assert reason is not None
    assert "practitioner practitioner@invalid" in reason and "LOCAL_ALL_PRACTITIONER" in reason


class FakeClient:
    """The searches TaskAuthorizer makes, answered from lists."""

    def __init__(self, definition: dict[str, Any]) -> None:
        self.resources = {
            "ActivityDefinition": [definition],
            "Organization": [
                {"resourceType": "Organization", "identifier": [{"system": ORG, "value": LOCAL}]}
            ],
            "OrganizationAffiliation": [AFFILIATION],
        }

    async def search(self, resource_type: str, params: Any) -> list[dict[str, Any]]:
        return self.resources[resource_type]


def task(requester: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "meta": {"profile": [PROFILE]},
        "status": "requested",
        "intent": "order",
        "instantiatesCanonical": f"{PROCESS}|1.0",
        "requester": requester,
        "restriction": {"recipient": [{"identifier": {"system": ORG, "value": LOCAL}}]},
        "input": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://dsf.dev/fhir/CodeSystem/bpmn-message",
                            "code": "message-name",
                        }
                    ]
                },
                "valueString": "start",
            }
        ],
    }


PRACTITIONER_REQUESTER = {
    "type": "Practitioner",
    "identifier": {"system": "http://dsf.dev/sid/practitioner-identifier", "value": "a@b.test"},
}
ORGANIZATION_REQUESTER = {"type": "Organization", "identifier": {"system": ORG, "value": LOCAL}}


async def _denied(definition: dict[str, Any], requester: dict[str, Any], **kw: Any) -> str | None:
    authorizer = TaskAuthorizer(FakeClient(definition), LOCAL, **kw)  # type: ignore[arg-type]
    received = task(requester)
    return await authorizer.denied(received, read_message(received))


async def test_bridge_accepts_practitioner_with_practitioner_authorization() -> None:
    for coding in (all_practitioner(), organization_practitioner(), role_practitioner()):
        assert await _denied(activity_definition(coding), PRACTITIONER_REQUESTER) is None


async def test_bridge_refuses_practitioner_without_practitioner_authorization() -> None:
    reason = await _denied(
        activity_definition({"system": SYSTEM, "code": "LOCAL_ALL"}), PRACTITIONER_REQUESTER
    )
    assert reason is not None and "practitioner a@b.test" in reason
    other = await _denied(
        activity_definition(organization_practitioner("Other")), PRACTITIONER_REQUESTER
    )
    assert other is not None


async def test_bridge_refuses_organization_for_practitioner_authorization_on_2x() -> None:
    definition = activity_definition(all_practitioner())
    assert await _denied(definition, ORGANIZATION_REQUESTER, release=DSF_2) is not None
    assert await _denied(definition, ORGANIZATION_REQUESTER) is not None
    # DSF 1.9 names the practitioner's organization as requester of the practitioner's Task.
    assert await _denied(definition, ORGANIZATION_REQUESTER, release=DSF_1) is None


async def test_bridge_refuses_requester_of_another_system() -> None:
    other = {"identifier": {"system": "http://example.org/sid/user", "value": "x"}}
    reason = await _denied(activity_definition(all_practitioner()), other)
    assert reason is not None and "practitioner-identifier" in reason
