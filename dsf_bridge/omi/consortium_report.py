"""The merged result of a consortium inference request as FHIR R4: a collection Bundle of
Observations with components (``docs/consortium.md``, "The merged result").

The coordinator's :class:`~dsf_bridge.omi.aggregates.ConsortiumResult` becomes, per data site,
one Observation with the site's status (and reason, where it did not answer) and one
Observation per measurement and classification the site sent; then one Observation per pooled
measurement, and one per measurement no site showed. Statistics are components coded in the
bridge's ``omi-statistic`` CodeSystem, a site's status is coded in ``omi-consortium-status``
(both published under ``profiles/consortium/CodeSystem/``); what was measured keeps the code the
service contract gives it. A suppressed cell is ``dataAbsentReason#masked`` and carries no
figure, so nothing hidden at a site can be read or recomputed from the Bundle. No Observation
has a subject: the cohort is a query, not a FHIR Group. Pure: no I/O, the caller stores the
Bundle (``LOCAL`` read access) on the coordinator's DSF FHIR server.

Errors: :class:`ValueError` when the result names a measurement or class the contract does not
declare, or a figure is not a finite number; the message names it.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from dsf_bridge.omi.aggregates import (
    Aggregate,
    ClassCounts,
    ConsortiumResult,
    NumericAggregate,
    PooledClassCounts,
    PooledNumeric,
    SiteStatus,
)
from dsf_bridge.omi.contract import (
    ClassificationOutput,
    Coding,
    InferenceContract,
    MeasurementOutput,
)
from dsf_bridge.omi.conversion import UCUM

__all__ = [
    "CONSORTIUM_STATUS_CODES",
    "CONSORTIUM_STATUS_SYSTEM",
    "RESULT_IDENTIFIER_SYSTEM",
    "STATISTIC_CODES",
    "STATISTIC_SYSTEM",
    "check_aggregates",
    "result_bundle",
    "summary_outputs",
]

STATISTIC_SYSTEM = "http://dsf-bridge.dev/fhir/CodeSystem/omi-statistic"
CONSORTIUM_STATUS_SYSTEM = "http://dsf-bridge.dev/fhir/CodeSystem/omi-consortium-status"
RESULT_IDENTIFIER_SYSTEM = "http://dsf-bridge.dev/sid/consortium-result"
#: The codes of ``omi-statistic`` with their displays; the CodeSystem resource in
#: ``profiles/consortium/`` publishes exactly these (a test holds them together).
STATISTIC_CODES: Mapping[str, str] = {
    "n": "Number of studies",
    "mean": "Mean",
    "sd": "Standard deviation",
    "median": "Median",
    "q1": "First quartile",
    "q3": "Third quartile",
    "site-status": "Data site status",
    "reason": "Reason",
    "pooled-moments": "Pooled from site moments",
    "pooled-sum": "Summed over the sites",
}
#: The codes of ``omi-consortium-status``: one per :class:`SiteStatus`.
CONSORTIUM_STATUS_CODES: Mapping[SiteStatus, str] = {
    SiteStatus.DONE: "Done",
    SiteStatus.SUPPRESSED: "Suppressed",
    SiteStatus.REFUSED: "Refused",
    SiteStatus.FAILED: "Failed",
    SiteStatus.TIMED_OUT: "Timed out",
}

# Systems of DSF and HL7 (dsf_bridge.dsf.vocabulary names the DSF ones; omi/ may not import it).
_READ_ACCESS_TAG_SYSTEM = "http://dsf.dev/fhir/CodeSystem/read-access-tag"
_ORGANIZATION_IDENTIFIER_SYSTEM = "http://dsf.dev/sid/organization-identifier"
_OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
_ANSWERED = frozenset({SiteStatus.DONE, SiteStatus.SUPPRESSED})
# The order of the statistic components of a numeric measurement.
_FIGURES = ("mean", "sd", "median", "q1", "q3")
_OBFUSCATED_N = (
    "n is obfuscated as the MII feasibility plugin does it (Laplace noise, rounded to tens); "
    "mean, sd and quartiles are computed from the true values."
)
_OBFUSCATED_COUNTS = (
    "Every count (n and each class) is obfuscated as the MII feasibility plugin does it "
    "(Laplace noise, rounded to tens)."
)
_APPROXIMATE_QUARTILES = (
    "q1, median and q3 are approximate: the n-weighted mean of the sites' quartiles, exact only "
    "when the sites' distributions agree. n, mean and sd are pooled exactly from the sites' n, "
    "mean and sd."
)
_NO_QUARTILES = (
    "No quartiles: no pooled site had the 2k studies a cell needs to show them (k studies "
    "give n, mean and sd only)."
)
_NOT_EXACT = (
    "Not exact: at least one site's counts are obfuscated, so the pooled figures rest on noisy "
    "counts."
)


def result_bundle(
    result: ConsortiumResult,
    contract: InferenceContract,
    *,
    issued: dt.datetime,
    request_id: str | None = None,
) -> dict[str, Any]:
    """The merged result as a FHIR R4 collection Bundle, read access ``LOCAL``.

    An aggregate's ``measurement`` is the ``code`` of the contract output's Coding
    (``muscle-volume``), a class label the ``code`` of the class's Coding
    (:func:`check_aggregates`); the Observations carry the contract's full Codings.
    ``request_id`` (the start Task's id, say) becomes the Bundle's identifier, so that storing
    it can be made conditional (``If-None-Exist``). ``issued`` must be timezone-aware: it is
    every Observation's ``issued`` and ``effectiveDateTime`` and the Bundle's ``timestamp``.

    Entries, in this order: per site (in the result's order) its status Observation, then its
    measurements and classifications in the contract's order; then one Observation per pooled
    measurement and per measurement no site showed, in the contract's order.
    """
    if issued.tzinfo is None or issued.utcoffset() is None:
        raise ValueError("issued must be a timezone-aware datetime (a FHIR instant)")
    when = issued.isoformat(timespec="seconds")
    outputs = _outputs_by_name(contract)
    order = {name: index for index, name in enumerate(outputs)}
    entries: list[dict[str, Any]] = []
    # Each site Observation's fullUrl, by (measurement, organization), for derivedFrom.
    site_urls: dict[tuple[str, str], str] = {}

    for site in result.sites:
        entries.append(_entry(_site_status(site.organization, site.status, site.reason, contract)))
        if site.status not in _ANSWERED:
            # As in the merge: what a site that refused, failed or timed out may have sent is
            # no figure of the result, and is not stored.
            continue
        check_aggregates(site.aggregates, contract)
        for aggregate in sorted(site.aggregates, key=lambda a: order[a.measurement]):
            output = outputs[aggregate.measurement]
            if isinstance(aggregate, NumericAggregate) and isinstance(output, MeasurementOutput):
                observation = _site_numeric(aggregate, output)
            elif isinstance(aggregate, ClassCounts) and isinstance(output, ClassificationOutput):
                observation = _site_classes(aggregate, output)
            else:  # pragma: no cover - check_aggregates refuses a kind the contract contradicts
                raise AssertionError(aggregate.measurement)
            observation["performer"] = [_organization(site.organization)]
            entry = _entry(observation)
            site_urls[(aggregate.measurement, site.organization)] = entry["fullUrl"]
            entries.append(entry)

    for name in sorted({*result.pooled, *result.unpooled}, key=lambda n: _position(order, n)):
        output = outputs[name]
        pooled = result.pooled.get(name)
        if pooled is None:
            observation = _unpooled(output, result.unpooled[name])
        elif isinstance(pooled, PooledNumeric) and isinstance(output, MeasurementOutput):
            observation = _pooled_numeric(pooled, output)
        elif isinstance(pooled, PooledClassCounts) and isinstance(output, ClassificationOutput):
            observation = _pooled_classes(pooled, output)
        else:
            raise ValueError(
                f"the pooled {name!r} is of another kind than contract {contract.name} declares"
            )
        if pooled is not None:
            observation["derivedFrom"] = [
                {"reference": site_urls[(name, organization)], "type": "Observation"}
                for organization in pooled.sites
                if (name, organization) in site_urls
            ]
        entries.append(_entry(observation))

    for entry in entries:
        entry["resource"]["effectiveDateTime"] = when
        entry["resource"]["issued"] = when
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "meta": {"tag": [{"system": _READ_ACCESS_TAG_SYSTEM, "code": "LOCAL"}]},
        "type": "collection",
        "timestamp": when,
        "entry": entries,
    }
    if request_id is not None:
        bundle["identifier"] = {"system": RESULT_IDENTIFIER_SYSTEM, "value": request_id}
    return bundle


def check_aggregates(aggregates: Sequence[Aggregate], contract: InferenceContract) -> None:
    """Raise :class:`ValueError` unless every aggregate is an output of ``contract``, of the
    kind it declares, and a shown class table lists exactly its classes.

    For the coordinator reading a site's answer (after
    :func:`~dsf_bridge.omi.aggregates.aggregates_from_json`): a site whose answer fails here
    is recorded ``failed`` with the message, and :func:`result_bundle` never sees it.
    """
    outputs = _outputs_by_name(contract)
    for aggregate in aggregates:
        output = outputs.get(aggregate.measurement)
        if output is None:
            raise ValueError(
                f"measurement {aggregate.measurement!r} is not an output of contract "
                f"{contract.name}"
            )
        if isinstance(aggregate, NumericAggregate) != isinstance(output, MeasurementOutput):
            declared = "measurement" if isinstance(output, MeasurementOutput) else "classification"
            raise ValueError(
                f"{aggregate.measurement!r} is a {declared} in contract {contract.name}, "
                "the answer has it as the other kind"
            )
        if isinstance(aggregate, ClassCounts) and isinstance(output, ClassificationOutput):
            declared_classes = {spec.code.code for spec in output.classes}
            unknown = sorted(set(aggregate.counts) - declared_classes)
            if unknown:
                raise ValueError(
                    f"class table {aggregate.measurement!r} names classes contract "
                    f"{contract.name} does not declare: {', '.join(unknown)}"
                )
            # A class left out is hidden without saying so, and with one hidden class it
            # would follow from the total.
            missing = [
                spec.code.code for spec in output.classes if spec.code.code not in aggregate.counts
            ]
            if missing and not aggregate.suppressed:
                raise ValueError(
                    f"class table {aggregate.measurement!r} leaves out class "
                    f"{', '.join(missing)} of contract {contract.name}: every class is listed, "
                    "a hidden one as suppressed"
                )


def summary_outputs(result: ConsortiumResult) -> dict[str, int]:
    """``sites-done``: the sites that answered (``done``, or ``suppressed`` with nothing to
    show); ``sites-missing``: those that refused, failed or timed out. Together they count
    every site."""
    answered = sum(site.status in _ANSWERED for site in result.sites)
    return {"sites-done": answered, "sites-missing": len(result.sites) - answered}


def _outputs_by_name(
    contract: InferenceContract,
) -> dict[str, MeasurementOutput | ClassificationOutput]:
    found: dict[str, MeasurementOutput | ClassificationOutput] = {}
    declared: list[MeasurementOutput | ClassificationOutput] = [
        *contract.outputs.measurements,
        *contract.outputs.classifications,
    ]
    for output in declared:
        name = output.code.code
        if name in found:
            # The contract forbids only a repeated (system, code); aggregates name an output
            # by its code alone.
            raise ValueError(
                f"contract {contract.name} declares code {name!r} in two systems: the "
                "consortium result cannot tell these outputs apart"
            )
        found[name] = output
    return found


def _position(order: Mapping[str, int], name: str) -> int:
    if name not in order:
        raise ValueError(f"the result pools {name!r}, which the contract does not declare")
    return order[name]


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    return {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource}


def _concept(coding: Coding) -> dict[str, Any]:
    return {"coding": [coding.fhir()], "text": coding.display}


def _statistic(code: str) -> dict[str, Any]:
    display = STATISTIC_CODES[code]
    return {"coding": [{"system": STATISTIC_SYSTEM, "code": code, "display": display}]}


def _masked() -> dict[str, Any]:
    return {
        "coding": [{"system": _DATA_ABSENT_REASON, "code": "masked", "display": "Masked"}],
        "text": "suppressed: fewer than k studies",
    }


def _organization(identifier: str) -> dict[str, Any]:
    return {
        "type": "Organization",
        "identifier": {"system": _ORGANIZATION_IDENTIFIER_SYSTEM, "value": identifier},
    }


def _observation(code: Coding) -> dict[str, Any]:
    # issued and effectiveDateTime are set for every entry at the end.
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {"coding": [{"system": _OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}
        ],
        "code": _concept(code),
    }


def _notes(*texts: str) -> list[dict[str, str]]:
    return [{"text": text} for text in texts]


def _count(value: int | None, what: str) -> dict[str, Any]:
    if value is None:
        raise ValueError(f"{what} is shown but has no n")
    return {"code": _statistic("n"), "valueInteger": value}


def _quantity(code: str, value: float | None, output: MeasurementOutput, what: str) -> Any:
    if value is None or not math.isfinite(value):
        raise ValueError(f"{code} of {what} is not a finite number")
    return {
        "code": _statistic(code),
        "valueQuantity": {
            "value": value,
            "unit": output.unit_text or output.unit,
            "system": UCUM,
            "code": output.unit,
        },
    }


def _figures(
    figures: NumericAggregate | PooledNumeric, output: MeasurementOutput, what: str
) -> list[dict[str, Any]]:
    shown = _FIGURES if figures.median is not None else ("mean", "sd")  # quartiles from 2k
    return [
        _count(figures.n, what),
        *(_quantity(name, getattr(figures, name), output, what) for name in shown),
    ]


def _site_status(
    organization: str, status: SiteStatus, reason: str | None, contract: InferenceContract
) -> dict[str, Any]:
    # Observation.status is final for every outcome, a failed or timed-out site included: what
    # is observed is the site's outcome, and that is complete and will not change (a late
    # answer is refused). R4's 'cancelled' ("not started or not completed") would say this
    # Observation has no result, and readers filtering on 'final' would miss the missing sites.
    observation = _observation(contract.report_code)
    observation["performer"] = [_organization(organization)]
    status_coding = {
        "system": CONSORTIUM_STATUS_SYSTEM,
        "code": status.value,
        "display": CONSORTIUM_STATUS_CODES[status],
    }
    components: list[dict[str, Any]] = [
        {"code": _statistic("site-status"), "valueCodeableConcept": {"coding": [status_coding]}}
    ]
    if reason is not None:
        components.append({"code": _statistic("reason"), "valueString": reason})
    observation["component"] = components
    return observation


def _site_numeric(aggregate: NumericAggregate, output: MeasurementOutput) -> dict[str, Any]:
    observation = _observation(output.code)
    if aggregate.suppressed:
        observation["dataAbsentReason"] = _masked()
        return observation
    observation["component"] = _figures(aggregate, output, repr(aggregate.measurement))
    if aggregate.obfuscated:
        observation["note"] = _notes(_OBFUSCATED_N)
    return observation


def _site_classes(table: ClassCounts, output: ClassificationOutput) -> dict[str, Any]:
    observation = _observation(output.code)
    if table.suppressed:
        observation["dataAbsentReason"] = _masked()
        return observation
    components = [_count(table.n, f"class table {table.measurement!r}")]
    for spec in output.classes:
        label = spec.code.code
        if label not in table.counts:
            continue
        value = table.counts[label]
        component: dict[str, Any] = {"code": _concept(spec.code)}
        if value is None:
            component["dataAbsentReason"] = _masked()
        else:
            component["valueInteger"] = value
        components.append(component)
    observation["component"] = components
    if table.obfuscated:
        observation["note"] = _notes(_OBFUSCATED_COUNTS)
    return observation


def _method(output: MeasurementOutput | ClassificationOutput) -> dict[str, Any]:
    if isinstance(output, MeasurementOutput):
        return {**_statistic("pooled-moments"), "text": "pooled from site moments"}
    return {**_statistic("pooled-sum"), "text": "summed over the sites"}


def _sites_note(sites: Sequence[str], suppressed_at: Sequence[str]) -> str:
    text = f"Pooled over {len(sites)} site{'s' if len(sites) != 1 else ''}: {', '.join(sites)}."
    if suppressed_at:
        text += f" Suppressed under k (contributing nothing) at: {', '.join(suppressed_at)}."
    return text


def _pooled_numeric(pooled: PooledNumeric, output: MeasurementOutput) -> dict[str, Any]:
    observation = _observation(output.code)
    observation["method"] = _method(output)
    observation["component"] = _figures(pooled, output, f"the pooled {pooled.measurement!r}")
    notes = [_APPROXIMATE_QUARTILES] if pooled.median is not None else [_NO_QUARTILES]
    if not pooled.exact:
        notes.append(_NOT_EXACT)
    notes.append(_sites_note(pooled.sites, pooled.suppressed_at))
    observation["note"] = _notes(*notes)
    return observation


def _pooled_classes(pooled: PooledClassCounts, output: ClassificationOutput) -> dict[str, Any]:
    observation = _observation(output.code)
    observation["method"] = _method(output)
    components = [_count(pooled.n, f"the pooled {pooled.measurement!r}")]
    notes: list[str] = []
    for spec in output.classes:
        label = spec.code.code
        if label not in pooled.counts:
            continue
        hidden_at = pooled.incomplete.get(label, ())
        component: dict[str, Any] = {"code": _concept(spec.code)}
        if set(hidden_at) >= set(pooled.sites):
            # Hidden at every site whose table was shown: its sum, 0, would be no figure.
            component["dataAbsentReason"] = _masked()
            notes.append(f"{spec.code.display} ({label}): suppressed at every site.")
        else:
            component["valueInteger"] = pooled.counts[label]
            if hidden_at:
                notes.append(
                    f"{spec.code.display} ({label}): a lower bound, suppressed at "
                    f"{', '.join(hidden_at)}."
                )
        components.append(component)
    observation["component"] = components
    if not pooled.exact:
        notes.append(_NOT_EXACT)
    notes.append(_sites_note(pooled.sites, pooled.suppressed_at))
    observation["note"] = _notes(*notes)
    return observation


def _unpooled(
    output: MeasurementOutput | ClassificationOutput, suppressed_at: Sequence[str]
) -> dict[str, Any]:
    # Every site that answered hid it (or showed a count obfuscated to 0): nothing to pool.
    observation = _observation(output.code)
    observation["method"] = _method(output)
    observation["dataAbsentReason"] = _masked()
    text = "Not pooled: no site that answered showed figures for it."
    if suppressed_at:
        text += f" Suppressed under k at: {', '.join(suppressed_at)}."
    observation["note"] = _notes(text)
    return observation
