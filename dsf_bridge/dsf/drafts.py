"""Start Tasks from a plugin's draft Task, as the DSF FHIR server's web UI makes them.

A DSF process plugin ships, per way of starting it, a draft Task (``status draft``, a
``task-identifier``, example input values) and the Task profile it conforms to. The DSF UI shows
the draft as a form, one field per input slice of the profile, and creates a new Task from it:
status ``requested``, ``authoredOn`` now, the requester the local organization (the recipient is
too, as in the draft), the inputs filled in, without the draft's identifier. :class:`StartForm`
does the same from the command line (``dsf-bridge start``): an input is named by its code in the
plugin's CodeSystem and its text value is typed as the profile's slice declares (``value[x]``:
string, integer, boolean, Reference...).

The draft's input values are examples, not defaults: a required input must be given. The
``message-name`` comes from the draft, a ``business-key`` only when one is given (the bridge
makes one otherwise), a ``correlation-key`` never.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from dsf_bridge.dsf.profiles import TaskProfile
from dsf_bridge.dsf.tasks import BUSINESS_KEY, MESSAGE_NAME, organization_reference, task_input
from dsf_bridge.dsf.vocabulary import BPMN_MESSAGE_SYSTEM, TASK_IDENTIFIER_SYSTEM
from dsf_bridge.errors import BridgeError

__all__ = ["InputField", "StartForm", "StartFormError", "parse_input"]

_SLICE = re.compile(r"^Task\.input:([^.]+)$")
_TEXT_TYPES = frozenset(
    {
        "string",
        "markdown",
        "code",
        "id",
        "uri",
        "url",
        "canonical",
        "oid",
        "uuid",
        "date",
        "dateTime",
        "instant",
        "time",
        "base64Binary",
    }
)
_INTEGER_BOUNDS = {"integer": None, "positiveInt": 1, "unsignedInt": 0}
# The regular expressions of FHIR R4's primitive types (a strict server checks them), with what
# an error shows as the expected form.
_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_MONTH, _DAY = r"(0[1-9]|1[0-2])", r"(0[1-9]|[1-2][0-9]|3[0-1])"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_PRIMITIVE_FORMS: dict[str, tuple[re.Pattern[str], str]] = {
    kind: (re.compile(pattern), shown)
    for kind, pattern, shown in (
        ("date", rf"{_YEAR}(-{_MONTH}(-{_DAY})?)?", "YYYY, YYYY-MM or YYYY-MM-DD"),
        (
            "dateTime",
            rf"{_YEAR}(-{_MONTH}(-{_DAY}(T{_TIME}{_ZONE})?)?)?",
            "YYYY-MM-DD or YYYY-MM-DDThh:mm:ss with a zone (Z, +01:00)",
        ),
        ("instant", rf"{_YEAR}-{_MONTH}-{_DAY}T{_TIME}{_ZONE}", "YYYY-MM-DDThh:mm:ss+zz:zz"),
        ("time", _TIME, "hh:mm:ss"),
        ("uri", r"\S+", "no white space"),
        ("url", r"\S+", "no white space"),
        ("canonical", r"\S+", "no white space"),
        ("id", r"[A-Za-z0-9\-\.]{1,64}", "up to 64 letters, digits, '-' and '.'"),
        ("code", r"[^\s]+( [^\s]+)*", "no leading, trailing or double white space"),
        ("oid", r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+", "urn:oid:1.2.3"),
        (
            "uuid",
            r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "urn:uuid: and a lower-case UUID",
        ),
        ("base64Binary", r"[A-Za-z0-9+/\s]*={0,2}\s*", "base64"),
    )
}


class StartFormError(BridgeError):
    """The inputs do not fill the draft's form: an unknown code, a missing required input, a
    value that is not of the input's type. The message says which and what the form expects."""


@dataclass(frozen=True)
class InputField:
    """One input of the form: a slice of the Task profile (or an input of the draft)."""

    code: str
    system: str
    min: int
    max: int | None  # None: any number
    types: tuple[str, ...]  # FHIR type codes of value[x], in the profile's order
    example: object = None

    def describe(self) -> str:
        need = "required" if self.min else "optional"
        many = "" if self.max == 1 else ", repeatable"
        example = "" if self.example is None else f", e.g. {_shown(self.example)}"
        return f"{self.code} ({'|'.join(self.types) or 'string'}, {need}{many}{example})"


def _shown(value: object) -> str:
    if isinstance(value, Mapping):
        for key in ("reference", "code", "value"):
            if key in value:
                return str(value[key])
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_input(text: str) -> tuple[str, str]:
    """``code=value`` as (code, value); the value may contain ``=``."""
    code, sep, value = text.partition("=")
    if not sep or not code.strip():
        raise StartFormError(f"--input {text!r}: expected CODE=VALUE")
    return code.strip(), value


def _value_of(parameter: Mapping[str, Any]) -> tuple[str | None, object]:
    """The FHIR type and value of ``value[x]``: ``valueString`` is a ``string``,
    ``valueReference`` a ``Reference`` (primitive type codes start in lower case)."""
    for key, value in parameter.items():
        if key.startswith("value") and len(key) > 5:
            kind = key[5:]
            primitive = kind[0].lower() + kind[1:]
            known = primitive in _TEXT_TYPES or primitive in _INTEGER_BOUNDS
            return (primitive if known or primitive in ("decimal", "boolean") else kind), value
    return None, None


def _coding(parameter: Mapping[str, Any]) -> tuple[str, str] | None:
    for coding in (parameter.get("type") or {}).get("coding") or []:
        if coding.get("system") and coding.get("code"):
            return str(coding["system"]), str(coding["code"])
    return None


def _fixed(element: Mapping[str, Any] | None) -> object:
    for key, value in (element or {}).items():
        if key.startswith(("fixed", "pattern")):
            return value
    return None


def _typed(code: str, kind: str, text: str) -> dict[str, Any]:
    """The ``value[x]`` of an input of FHIR type ``kind`` from the command line's ``text``."""
    key = "value" + kind[0].upper() + kind[1:]
    if kind in _TEXT_TYPES:
        if not text:
            raise StartFormError(f"input {code}: empty value")
        form = _PRIMITIVE_FORMS.get(kind)
        if form is not None and not form[0].fullmatch(text):
            raise StartFormError(f"input {code}: {text!r} is not a {kind} ({form[1]})")
        return {key: text}
    if kind in _INTEGER_BOUNDS:
        try:
            number = int(text)
        except ValueError:
            raise StartFormError(f"input {code}: {text!r} is not an integer ({kind})") from None
        low = _INTEGER_BOUNDS[kind]
        if (low is not None and number < low) or abs(number) > 2**31 - 1:
            raise StartFormError(f"input {code}: {number} is out of range for {kind}")
        return {key: number}
    if kind == "decimal":
        try:
            decimal = Decimal(text)
        except InvalidOperation:
            raise StartFormError(f"input {code}: {text!r} is not a decimal") from None
        if not decimal.is_finite() or not math.isfinite(float(decimal)):
            # 1e400 is finite as a Decimal, but inf as JSON's number: "Infinity", not JSON.
            raise StartFormError(f"input {code}: {text!r} is not a decimal")
        return {key: float(decimal)}
    if kind == "boolean":
        if text.lower() not in ("true", "false"):
            raise StartFormError(f"input {code}: {text!r} is not a boolean (true or false)")
        return {key: text.lower() == "true"}
    if kind in ("Reference", "Coding", "Identifier"):
        system, sep, value = text.rpartition("|")
        if kind == "Reference":
            if sep and "/" not in value:  # system|value: a logical reference by identifier
                return {key: {"identifier": {"system": system, "value": value}}}
            return {key: {"reference": text}}
        if not sep or not system or not value:
            raise StartFormError(f"input {code}: {text!r} is not SYSTEM|{kind.upper()}")
        return {key: {"system": system, ("code" if kind == "Coding" else "value"): value}}
    raise StartFormError(f"input {code}: values of type {kind} cannot be given on the command line")


@dataclass(frozen=True)
class StartForm:
    """The form of a draft Task: the fields its profile declares, to fill and send."""

    draft: Mapping[str, Any]
    fields: Mapping[str, InputField]  # by code

    @classmethod
    def from_draft(
        cls, draft: Mapping[str, Any], profiles: Iterable[Mapping[str, Any]]
    ) -> StartForm:
        """The form of ``draft``, its fields from the profile in its ``meta.profile`` found
        among ``profiles`` (StructureDefinitions as FHIR JSON) and from its own inputs."""
        wanted = [str(p) for p in (draft.get("meta") or {}).get("profile") or []]
        by_url: dict[str, Mapping[str, Any]] = {}
        for definition in profiles:
            url, version = str(definition.get("url")), definition.get("version")
            by_url[url] = definition
            if version:
                by_url[f"{url}|{version}"] = definition
        profile: Mapping[str, Any] | None = next((by_url[w] for w in wanted if w in by_url), None)
        if profile is None:
            raise StartFormError(
                f"the draft Task names the profile {', '.join(wanted) or '(none)'}, which the "
                "plugin does not ship"
            )
        elements = TaskProfile.from_definitions(profile).elements
        examples: dict[str, tuple[str, str | None, object]] = {}
        for parameter in draft.get("input") or []:
            coding = _coding(parameter)
            if coding is not None and coding[0] != BPMN_MESSAGE_SYSTEM:
                examples.setdefault(coding[1], (coding[0], *_value_of(parameter)))
        fields: dict[str, InputField] = {}
        for element_id, element in elements.items():
            match = _SLICE.match(element_id)
            if match is None:
                continue
            system = _fixed(elements.get(f"{element_id}.type.coding.system"))
            code = _fixed(elements.get(f"{element_id}.type.coding.code"))
            pattern = _fixed(elements.get(f"{element_id}.type"))
            if code is None and isinstance(pattern, Mapping):  # patternCodeableConcept
                codings = pattern.get("coding") or [{}]
                code, system = codings[0].get("code"), codings[0].get("system", system)
            if code is None and match[1] in examples:
                code, system = match[1], examples[match[1]][0]
            if not isinstance(code, str) or system == BPMN_MESSAGE_SYSTEM:
                continue  # message-name, business-key, correlation-key: not the user's
            example = examples.get(code)
            value_types = (elements.get(f"{element_id}.value[x]") or {}).get("type") or []
            types = tuple(str(t["code"]) for t in value_types if t.get("code"))
            if not types and example is not None and example[1] is not None:
                types = (example[1],)
            if not isinstance(system, str):
                if example is None:
                    continue  # a slice known by neither profile nor draft: nobody can fill it
                system = example[0]
            maximum = element.get("max", "*")
            fields[code] = InputField(
                code=code,
                system=system,
                min=int(element.get("min") or 0),
                max=None if maximum == "*" else int(maximum),
                types=types or ("string",),
                example=None if example is None else example[2],
            )
        for code, (system, kind, value) in examples.items():
            if code not in fields:  # an input the draft has, the profile does not slice
                fields[code] = InputField(code, system, 0, None, (kind or "string",), value)
        return cls(draft, fields)

    @property
    def message_name(self) -> str:
        for parameter in self.draft.get("input") or []:
            if _coding(parameter) == (BPMN_MESSAGE_SYSTEM, MESSAGE_NAME):
                return str(_value_of(parameter)[1])
        raise StartFormError("the draft Task has no message-name input")

    def describe(self) -> str:
        """The fields, one per line, for error messages and ``--help``-like listings."""
        return "\n".join(f"  {field.describe()}" for field in self.fields.values())

    def task(
        self,
        inputs: Sequence[tuple[str, str]],
        *,
        requester: str,
        business_key: str | None = None,
        authored_on: dt.datetime,
    ) -> dict[str, Any]:
        """A ``requested`` Task from the draft with ``inputs`` (code, text) filled in."""
        given: dict[str, list[str]] = {}
        for code, text in inputs:
            if code not in self.fields:
                raise StartFormError(
                    f"unknown input {code!r}; the inputs of this process are:\n{self.describe()}"
                )
            given.setdefault(code, []).append(text)
        missing = [f for f in self.fields.values() if len(given.get(f.code, [])) < f.min]
        if missing:
            names = ", ".join(f.code for f in missing)
            raise StartFormError(
                f"missing required input {names} (--input CODE=VALUE); the inputs of this "
                f"process are:\n{self.describe()}"
            )
        parameters = [task_input(BPMN_MESSAGE_SYSTEM, MESSAGE_NAME, self.message_name)]
        if business_key is not None:
            if not business_key.strip():
                raise StartFormError("--business-key must not be blank")
            parameters.append(task_input(BPMN_MESSAGE_SYSTEM, BUSINESS_KEY, business_key))
        for field in self.fields.values():
            texts = given.get(field.code, [])
            if field.max is not None and len(texts) > field.max:
                raise StartFormError(
                    f"input {field.code} given {len(texts)} times, at most {field.max}"
                )
            for text in texts:
                parameters.append(
                    {
                        "type": {"coding": [{"system": field.system, "code": field.code}]},
                        **self._value(field, text),
                    }
                )
        task = {
            key: copy.deepcopy(value)
            for key, value in self.draft.items()
            if key not in ("id", "meta", "identifier", "output", "text")
        }
        identifiers = [
            i
            for i in self.draft.get("identifier") or []
            if i.get("system") != TASK_IDENTIFIER_SYSTEM
        ]
        profiles = (self.draft.get("meta") or {}).get("profile")
        task.update(
            {
                "resourceType": "Task",
                **({"meta": {"profile": list(profiles)}} if profiles else {}),
                **({"identifier": identifiers} if identifiers else {}),
                "status": "requested",
                "intent": "order",
                "authoredOn": authored_on.astimezone(dt.UTC).isoformat(timespec="milliseconds"),
                "requester": organization_reference(requester),
                "input": parameters,
            }
        )
        if not (task.get("restriction") or {}).get("recipient"):
            task["restriction"] = {"recipient": [organization_reference(requester)]}
        return task

    @staticmethod
    def _value(field: InputField, text: str) -> dict[str, Any]:
        problems: list[str] = []
        for kind in field.types:
            try:
                value = _typed(field.code, kind, text)
            except StartFormError as exc:
                problems.append(str(exc))
                continue
            reference = value.get("valueReference")
            example = field.example
            if (
                isinstance(reference, dict)
                and "identifier" in reference
                and isinstance(example, Mapping)
                and isinstance(example.get("type"), str)
            ):
                # A logical reference keeps the draft's target type, as the DSF UI's does: the
                # DSF FHIR server resolves an identifier only together with a type.
                reference["type"] = example["type"]
            return value
        raise StartFormError("; ".join(problems))
