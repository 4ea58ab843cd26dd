"""The QuestionnaireResponse a user task starts with, built as DSF's ``DefaultUserTaskListener``
builds it from the task's Questionnaire, so the DSF FHIR UI shows the form.

From the DSF sources (tags v1.9.0 and v2.1.0: ``DefaultUserTaskListener`` of the process APIs
v1 and v2, ``QuestionnaireResponseHelperImpl``): the response is ``in-progress``, names the
form key (``url|version``) as ``questionnaire`` and the local organization as ``author`` (by
identifier), and sets no ``authored`` (the UI sets it on completion) and no identifier. Its
items are ``business-key`` and ``user-task-id`` with their answers, then every top-level item of
the Questionnaire but those two, with ``linkId`` and ``text``: ``display`` items without an
answer, the others with one placeholder answer of their type, which the UI replaces. Nested
items are not visited. A type without placeholder fails the user task.

DSF 1.x knows no placeholder for ``choice`` and ``quantity``, and its BPE sets no
``meta.profile``; the 2.x BPE (API v2) names DSF's QuestionnaireResponse profile, which the 2.x
server also adds itself to a response without it (``DefaultProfileProvider``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dsf_bridge.dsf.versions import DSF_2, DsfRelease
from dsf_bridge.dsf.vocabulary import ORGANIZATION_IDENTIFIER_SYSTEM, QUESTIONNAIRE_RESPONSE_PROFILE
from dsf_bridge.errors import ProcessExecutionError

__all__ = [
    "BUSINESS_KEY_ITEM",
    "BUSINESS_KEY_TEXT",
    "QUESTIONNAIRE_ITEM_TEXTS",
    "USER_TASK_ID_ITEM",
    "USER_TASK_ID_TEXT",
    "missing_questionnaire_message",
    "placeholder_answer",
    "questionnaire_item_texts",
    "questionnaire_response",
]

#: The local variable a user task's ``create`` listener sets to give QuestionnaireResponse
#: items other texts (link id -> text), as DSF's ``beforeQuestionnaireResponseCreate`` may.
QUESTIONNAIRE_ITEM_TEXTS = "questionnaireItemTexts"
_MAX_ITEM_TEXT = 4000


def questionnaire_item_texts(variables: Mapping[str, object]) -> dict[str, str]:
    """The item texts a user task's listener set (strings only, each cut to 4,000
    characters), never for ``business-key`` or ``user-task-id``."""
    texts = variables.get(QUESTIONNAIRE_ITEM_TEXTS)
    if not isinstance(texts, Mapping):
        return {}
    return {
        str(link_id): text[:_MAX_ITEM_TEXT]
        for link_id, text in texts.items()
        if isinstance(text, str) and link_id not in (BUSINESS_KEY_ITEM, USER_TASK_ID_ITEM)
    }


BUSINESS_KEY_ITEM = "business-key"
USER_TASK_ID_ITEM = "user-task-id"
BUSINESS_KEY_TEXT = "The business-key of the process execution"
USER_TASK_ID_TEXT = "The user-task-id of the process execution"

_PLACEHOLDER_SYSTEM = "http://example.org/fhir/CodeSystem/name"

# QuestionnaireResponseHelperImpl.transformQuestionTypeToAnswerType, the same in v1.9.0 and
# v2.1.0 but for choice and quantity (2.x only). HAPI writes DecimalType(0.00) as 0.0 and
# Quantity.setValue(0L) as 0. The comparator of the quantity is left out on purpose upstream
# (a false positive of HAPI's validator, hapifhir/org.hl7.fhir.core#2224).
_PLACEHOLDERS: Mapping[str, Mapping[str, Any]] = {
    "string": {"valueString": "Placeholder.."},
    "text": {"valueString": "Placeholder.."},
    "integer": {"valueInteger": 0},
    "decimal": {"valueDecimal": 0.0},
    "boolean": {"valueBoolean": False},
    "date": {"valueDate": "1900-01-01"},
    "time": {"valueTime": "00:00:00"},
    "dateTime": {"valueDateTime": "1900-01-01T00:00:00.000Z"},
    "url": {"valueUri": "http://example.org/foo"},
    "reference": {"valueReference": {"reference": "http://example.org/fhir/Placeholder/id"}},
    "choice": {"valueCoding": {"system": _PLACEHOLDER_SYSTEM, "code": "code"}},
    "quantity": {
        "valueQuantity": {
            "value": 0,
            "unit": "unit",
            "system": _PLACEHOLDER_SYSTEM,
            "code": "code",
        }
    },
}
_DSF_2_ONLY = frozenset({"choice", "quantity"})

# HAPI's Questionnaire.QuestionnaireItemType.getDisplay() (R4): what DSF's error names.
_TYPE_DISPLAY: Mapping[str, str] = {
    "group": "Group",
    "display": "Display",
    "question": "Question",
    "boolean": "Boolean",
    "decimal": "Decimal",
    "integer": "Integer",
    "date": "Date",
    "dateTime": "Date Time",
    "time": "Time",
    "string": "String",
    "text": "Text",
    "url": "Url",
    "choice": "Choice",
    "open-choice": "Open Choice",
    "attachment": "Attachment",
    "reference": "Reference",
    "quantity": "Quantity",
}


def missing_questionnaire_message(form_key: str) -> str:
    """DSF's text when ``Questionnaire?url=<form key>`` finds nothing."""
    return f"Could not find Questionnaire resource with url|version={form_key}"


def placeholder_answer(item: Mapping[str, Any], dsf_release: DsfRelease = DSF_2) -> dict[str, Any]:
    """The placeholder answer DSF gives a Questionnaire ``item`` (not ``display``), else
    DSF's error ``Type '<display>' in Questionnaire.item is not supported as answer type``."""
    item_type = item.get("type")
    if not isinstance(item_type, str) or not item_type:
        raise ProcessExecutionError(
            f"Questionnaire.item with linkId {item.get('linkId')!r} has no type", retryable=False
        )
    placeholder = _PLACEHOLDERS.get(item_type)
    if placeholder is None or (item_type in _DSF_2_ONLY and dsf_release.major < 2):
        display = _TYPE_DISPLAY.get(item_type, item_type)
        raise ProcessExecutionError(
            f"Type '{display}' in Questionnaire.item is not supported as answer type",
            retryable=False,
        )
    return _copy(placeholder)


def questionnaire_response(
    questionnaire: Mapping[str, Any],
    *,
    form_key: str,
    business_key: str,
    user_task_id: str,
    organization: str,
    dsf_release: DsfRelease = DSF_2,
    item_texts: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``in-progress`` QuestionnaireResponse of a user task whose form key ``form_key``
    found ``questionnaire``, authored by ``organization`` (its identifier).

    ``item_texts`` replaces the text of the items with those link ids (never of
    ``business-key`` or ``user-task-id``): what a plugin's ``beforeQuestionnaireResponseCreate``
    does in DSF's ``DefaultUserTaskListener`` (API v1 and v2) to show, e.g., the request a
    person is asked to approve."""
    items: list[dict[str, Any]] = [
        _item(BUSINESS_KEY_ITEM, BUSINESS_KEY_TEXT, {"valueString": business_key}),
        _item(USER_TASK_ID_ITEM, USER_TASK_ID_TEXT, {"valueString": user_task_id}),
    ]
    for question in questionnaire.get("item") or []:
        link_id = question.get("linkId")
        if link_id in (BUSINESS_KEY_ITEM, USER_TASK_ID_ITEM):
            continue
        answer = (
            None if question.get("type") == "display" else placeholder_answer(question, dsf_release)
        )
        text = (item_texts or {}).get(str(link_id), question.get("text"))
        items.append(_item(link_id, text, answer))
    response: dict[str, Any] = {"resourceType": "QuestionnaireResponse"}
    if dsf_release.major >= 2:
        response["meta"] = {"profile": [QUESTIONNAIRE_RESPONSE_PROFILE]}
    response.update(
        {
            "questionnaire": form_key,
            "status": "in-progress",
            "author": {
                "type": "Organization",
                "identifier": {"system": ORGANIZATION_IDENTIFIER_SYSTEM, "value": organization},
            },
            "item": items,
        }
    )
    return response


def _item(link_id: Any, text: Any, answer: Mapping[str, Any] | None) -> dict[str, Any]:
    """One response item as HAPI writes it: unset ``linkId`` or ``text`` are left out."""
    item: dict[str, Any] = {}
    if link_id is not None:
        item["linkId"] = link_id
    if text is not None:
        item["text"] = text
    if answer is not None:
        item["answer"] = [dict(answer)]
    return item


def _copy(value: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in value.items()}
