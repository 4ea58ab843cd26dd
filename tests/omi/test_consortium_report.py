"""The merged result of a consortium request as FHIR: every entry valid R4, every figure the one
the merge computed, nothing a site suppressed readable or recomputable, and only codes the
published CodeSystems define."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhirpathpy import evaluate as fhirpath
from fhirpathpy.models import models as fhirpath_models

from dsf_bridge.omi.aggregates import (
    ClassCounts,
    ConsortiumResult,
    LaplaceCountObfuscator,
    NumericAggregate,
    PooledClassCounts,
    PooledNumeric,
    SiteAnswer,
    SiteStatus,
    class_counts,
    merge,
    numeric_aggregate,
)
from dsf_bridge.omi.consortium_report import (
    CONSORTIUM_STATUS_CODES,
    CONSORTIUM_STATUS_SYSTEM,
    RESULT_IDENTIFIER_SYSTEM,
    STATISTIC_CODES,
    STATISTIC_SYSTEM,
    check_aggregates,
    result_bundle,
    summary_outputs,
)
from dsf_bridge.omi.contract import InferenceContract
from dsf_bridge.plugins.placeholders import Placeholders
from dsf_bridge.sandbox.authorization import OrganizationIdentity
from dsf_bridge.sandbox.service import FhirService
from dsf_bridge.sandbox.sites import allow_list_bundle, build_service, organization_entry

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
EXAMPLE = "http://ai-provider.example.org/fhir/CodeSystem/consortium-test"
ORGANIZATION_SYSTEM = "http://dsf.dev/sid/organization-identifier"
MASKED = ("http://terminology.hl7.org/CodeSystem/data-absent-reason", "masked")
ISSUED = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
K = 5
CLASSES = ("fatty", "scattered", "heterogeneous", "dense")
# The core R4 invariants of Observation and Bundle that our output could break
# (hl7.org/fhir/R4/observation.html, bundle.html); fhir.resources does not evaluate them.
INVARIANTS = {
    "Observation": {
        "obs-6": "dataAbsentReason.empty() or value.empty()",
        "obs-7": "value.empty() or component.code.where(coding.intersect(%resource.code.coding)"
        ".exists()).empty()",
    },
    "Bundle": {
        "bdl-7": "(type = 'history') or entry.where(fullUrl.exists())"
        ".select(fullUrl&resource.meta.versionId).isDistinct()",
    },
}


def _code(code: str, display: str) -> dict[str, str]:
    return {"system": EXAMPLE, "code": code, "display": display}


CONTRACT = InferenceContract.model_validate(
    {
        "name": "consortium-test",
        "title": "Body composition (test)",
        "report_code": _code("report", "Body composition (test)"),
        "model": {"name": "consortium-test"},
        "accepts": {"modality": ["CT"]},
        "inputs": {"image": "hu"},
        "outputs": {
            "measurements": [
                {
                    "tensor": "volume",
                    "code": _code("muscle-volume", "Skeletal muscle volume"),
                    "unit": "mL",
                },
                {
                    "tensor": "attenuation",
                    "code": _code("muscle-mean-hu", "Skeletal muscle mean attenuation"),
                    "unit": "[hnsf'U]",
                    "unit_text": "HU",
                },
                {
                    "tensor": "bone",
                    "code": _code("bone-area", "Bone area"),
                    "unit": "cm2",
                },
            ],
            "classifications": [
                {
                    "tensor": "density",
                    "code": _code("density-class", "Density class"),
                    "classes": [{"code": _code(c, f"Density {c}")} for c in CLASSES],
                }
            ],
        },
    }
)


def _values(seed: int, n: int, mean: float, sd: float) -> list[float]:
    return [float(v) for v in np.random.default_rng(seed).normal(mean, sd, size=n)]


def _labels(**counts: int) -> list[str]:
    return [label for label, count in counts.items() for _ in range(count)]


# Site A hides two small classes together (heterogeneous 2 + dense 3 = k); site B obfuscates.
A_CLASSES = _labels(fatty=9, scattered=7, heterogeneous=2, dense=3)
VOLUMES = {
    "hospital-a.test": _values(1, 12, 812.0, 95.0),
    "hospital-b.test": _values(2, 20, 760.0, 80.0),
}


def _answers(*, obfuscate_b: bool = True) -> list[SiteAnswer]:
    obfuscator = LaplaceCountObfuscator(rng=random.Random(3)) if obfuscate_b else None  # noqa: S311
    site_a = SiteAnswer(
        "hospital-a.test",
        SiteStatus.DONE,
        aggregates=(
            numeric_aggregate("muscle-volume", VOLUMES["hospital-a.test"], k=K),
            numeric_aggregate("muscle-mean-hu", _values(3, 12, 38.0, 6.0), k=K),
            numeric_aggregate("bone-area", _values(4, 3, 30.0, 2.0), k=K),
            class_counts("density-class", A_CLASSES, CLASSES, k=K),
        ),
    )
    site_b = SiteAnswer(
        "hospital-b.test",
        SiteStatus.DONE,
        aggregates=(
            numeric_aggregate(
                "muscle-volume", VOLUMES["hospital-b.test"], k=K, obfuscator=obfuscator
            ),
            numeric_aggregate("muscle-mean-hu", _values(5, 3, 41.0, 5.0), k=K),
            numeric_aggregate("bone-area", _values(6, 4, 31.0, 2.0), k=K),
            class_counts(
                "density-class",
                _labels(fatty=16, scattered=18, heterogeneous=17, dense=19),
                CLASSES,
                k=K,
                obfuscator=obfuscator,
            ),
        ),
    )
    site_c = SiteAnswer(
        "hospital-c.test",
        SiteStatus.SUPPRESSED,
        aggregates=(
            numeric_aggregate("muscle-volume", [700.0, 720.0], k=K),
            numeric_aggregate("muscle-mean-hu", [40.0, 41.0], k=K),
            numeric_aggregate("bone-area", [29.0], k=K),
            class_counts("density-class", ["fatty", "dense"], CLASSES, k=K),
        ),
    )
    return [
        site_a,
        site_b,
        site_c,
        SiteAnswer("hospital-d.test", SiteStatus.TIMED_OUT, reason="no answer within PT2M"),
        SiteAnswer("hospital-e.test", SiteStatus.REFUSED, reason="not approved in time"),
        SiteAnswer("hospital-f.test", SiteStatus.FAILED, reason="the answer hides a single class"),
    ]


@pytest.fixture(scope="module")
def result() -> ConsortiumResult:
    return merge(_answers())


@pytest.fixture(scope="module")
def bundle(result: ConsortiumResult) -> dict[str, Any]:
    return result_bundle(result, CONTRACT, issued=ISSUED, request_id="start-task-1")


def _observations(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry["resource"] for entry in bundle["entry"]]


def _code_of(concept: dict[str, Any]) -> str:
    return str(concept["coding"][0]["code"])


def _performer(observation: dict[str, Any]) -> str | None:
    performers = observation.get("performer") or []
    if not performers:
        return None
    identifier = performers[0]["identifier"]
    assert identifier["system"] == ORGANIZATION_SYSTEM
    return str(identifier["value"])


def _find(bundle: dict[str, Any], code: str, organization: str | None) -> dict[str, Any]:
    found = [
        o
        for o in _observations(bundle)
        if _code_of(o["code"]) == code and _performer(o) == organization
    ]
    assert len(found) == 1, (code, organization, len(found))
    return found[0]


def _components(observation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    components = {_code_of(c["code"]): c for c in observation.get("component", [])}
    assert len(components) == len(observation.get("component", []))
    return components


def _figures(observation: dict[str, Any]) -> dict[str, float | int]:
    figures: dict[str, float | int] = {}
    for code, component in _components(observation).items():
        if "valueInteger" in component:
            figures[code] = component["valueInteger"]
        else:
            figures[code] = component["valueQuantity"]["value"]
    return figures


def _codings(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "system" in node and "code" in node:
            yield node
        for value in node.values():
            yield from _codings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _codings(value)


def _masked(element: dict[str, Any]) -> bool:
    coding = element.get("dataAbsentReason", {}).get("coding", [{}])[0]
    return (coding.get("system"), coding.get("code")) == MASKED


def _has_value(element: dict[str, Any]) -> bool:
    return any(key.startswith("value") for key in element)


def _code_system(name: str) -> dict[str, Any]:
    path = PROFILES / "consortium" / "CodeSystem" / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_every_entry_is_valid_r4(bundle: dict[str, Any]) -> None:
    get_fhir_model_class("Bundle").model_validate(bundle)
    assert bundle["entry"]
    for entry in bundle["entry"]:
        resource = entry["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        assert entry["fullUrl"].startswith("urn:uuid:")
    for resource in [bundle, *_observations(bundle)]:
        for key, expression in INVARIANTS[resource["resourceType"]].items():
            verdict = fhirpath(resource, expression, {"resource": resource}, fhirpath_models["r4"])
            assert verdict == [True], (key, resource)
    # Stored as JSON on the DSF FHIR server: no float that JSON cannot carry.
    json.dumps(bundle, allow_nan=False)


def test_the_bundle_is_a_local_collection_named_by_the_request(bundle: dict[str, Any]) -> None:
    assert bundle["type"] == "collection"
    assert bundle["meta"]["tag"] == [
        {"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "LOCAL"}
    ]
    assert bundle["identifier"] == {"system": RESULT_IDENTIFIER_SYSTEM, "value": "start-task-1"}
    assert bundle["timestamp"] == "2026-11-30T08:00:00+00:00"
    for observation in _observations(bundle):
        assert observation["status"] == "final"
        assert observation["issued"] == observation["effectiveDateTime"] == bundle["timestamp"]
        assert _code_of(observation["category"][0]) == "imaging"
        assert "subject" not in observation


def test_without_a_request_id_there_is_no_identifier(result: ConsortiumResult) -> None:
    assert "identifier" not in result_bundle(result, CONTRACT, issued=ISSUED)


def test_issued_without_a_timezone_is_refused(result: ConsortiumResult) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        result_bundle(result, CONTRACT, issued=dt.datetime(2026, 11, 30, 8, 0))


def test_every_site_is_listed_once_with_its_status_and_reason(
    bundle: dict[str, Any], result: ConsortiumResult
) -> None:
    for site in result.sites:
        observation = _find(bundle, "report", site.organization)
        assert observation["code"]["coding"][0] == CONTRACT.report_code.fhir()
        components = _components(observation)
        status = components["site-status"]["valueCodeableConcept"]["coding"][0]
        assert (status["system"], status["code"]) == (CONSORTIUM_STATUS_SYSTEM, site.status.value)
        if site.reason is None:
            assert "reason" not in components
        else:
            assert components["reason"]["valueString"] == site.reason
    # A site that did not answer has its status and nothing else.
    for organization in ("hospital-d.test", "hospital-e.test", "hospital-f.test"):
        assert [
            _code_of(o["code"]) for o in _observations(bundle) if _performer(o) == organization
        ] == ["report"]


def test_site_figures_are_those_of_the_result(
    bundle: dict[str, Any], result: ConsortiumResult
) -> None:
    shown = 0
    for site in result.sites:
        for aggregate in site.aggregates:
            if aggregate.suppressed or not isinstance(aggregate, NumericAggregate):
                continue
            observation = _find(bundle, aggregate.measurement, site.organization)
            assert _figures(observation) == {
                "n": aggregate.n,
                "mean": aggregate.mean,
                "sd": aggregate.sd,
                "median": aggregate.median,
                "q1": aggregate.q1,
                "q3": aggregate.q3,
            }
            for code, component in _components(observation).items():
                if code != "n":
                    quantity = component["valueQuantity"]
                    output = {m.code.code: m for m in CONTRACT.outputs.measurements}[
                        aggregate.measurement
                    ]
                    assert quantity["system"] == "http://unitsofmeasure.org"
                    assert quantity["code"] == output.unit
                    assert quantity["unit"] == (output.unit_text or output.unit)
            notes = [note["text"] for note in observation.get("note", [])]
            assert bool(notes) == aggregate.obfuscated
            assert all("obfuscated" in text for text in notes)
            shown += 1
    assert shown == 3  # A's volume and attenuation, B's (obfuscated) volume


def test_a_suppressed_cell_has_no_figure_and_is_masked(
    bundle: dict[str, Any], result: ConsortiumResult
) -> None:
    hidden = [
        (site.organization, aggregate.measurement)
        for site in result.sites
        for aggregate in site.aggregates
        if aggregate.suppressed
    ]
    assert len(hidden) == 7  # C's four cells, A's and B's bone area, B's attenuation
    for organization, measurement in hidden:
        observation = _find(bundle, measurement, organization)
        assert _masked(observation)
        assert "component" not in observation
        assert not _has_value(observation)
    # Anywhere in the Bundle: a masked element never carries a value.
    for observation in _observations(bundle):
        for element in [observation, *observation.get("component", [])]:
            if "dataAbsentReason" in element:
                assert _masked(element)
                assert not _has_value(element)


def test_hidden_classes_cannot_be_recomputed_from_the_bundle(
    bundle: dict[str, Any], result: ConsortiumResult
) -> None:
    observation = _find(bundle, "density-class", "hospital-a.test")
    components = _components(observation)
    assert set(components) == {"n", *CLASSES}
    masked = [label for label in CLASSES if _masked(components[label])]
    assert masked == ["heterogeneous", "dense"]
    assert all(not _has_value(components[label]) for label in masked)
    shown = {label: components[label]["valueInteger"] for label in CLASSES if label not in masked}
    assert shown == {"fatty": 9, "scattered": 7}
    # What the coordinator can work out is the hidden classes' sum, a figure of at least k
    # studies; each of them could be anything from 0 to it.
    remainder = components["n"]["valueInteger"] - sum(shown.values())
    assert remainder == A_CLASSES.count("heterogeneous") + A_CLASSES.count("dense")
    assert len(masked) >= 2 and remainder >= K
    table = next(a for a in result.sites[0].aggregates if isinstance(a, ClassCounts))
    assert {label for label, value in table.counts.items() if value is None} == set(masked)


def test_pooled_numeric_figures_are_those_of_the_result(
    bundle: dict[str, Any], result: ConsortiumResult
) -> None:
    pooled = result.pooled["muscle-volume"]
    assert isinstance(pooled, PooledNumeric)
    observation = _find(bundle, "muscle-volume", None)
    assert _figures(observation) == {
        "n": pooled.n,
        "mean": pooled.mean,
        "sd": pooled.sd,
        "median": pooled.median,
        "q1": pooled.q1,
        "q3": pooled.q3,
    }
    method = observation["method"]
    assert method["text"] == "pooled from site moments"
    assert (method["coding"][0]["system"], _code_of(method)) == (STATISTIC_SYSTEM, "pooled-moments")
    notes = [note["text"] for note in observation["note"]]
    assert any("approximate" in text and "n-weighted mean" in text for text in notes)
    # B's n is obfuscated: the pool says it is not exact.
    assert not pooled.exact
    assert any(text.startswith("Not exact") for text in notes)
    assert any("hospital-c.test" in text for text in notes)  # suppressed there
    # Derived from exactly the site Observations it pooled.
    urls = {entry["fullUrl"]: entry["resource"] for entry in bundle["entry"]}
    sources = [urls[reference["reference"]] for reference in observation["derivedFrom"]]
    assert [_performer(source) for source in sources] == ["hospital-a.test", "hospital-b.test"]
    assert all(_code_of(source["code"]) == "muscle-volume" for source in sources)

    exact = _find(bundle, "muscle-mean-hu", None)
    assert not any(note["text"].startswith("Not exact") for note in exact["note"])
    assert _components(exact)["mean"]["valueQuantity"]["unit"] == "HU"


def test_pooled_mean_and_sd_equal_those_over_all_studies() -> None:
    answers = _answers(obfuscate_b=False)
    bundle = result_bundle(merge(answers), CONTRACT, issued=ISSUED)
    figures = _figures(_find(bundle, "muscle-volume", None))
    everything = np.array([v for values in VOLUMES.values() for v in values])
    assert figures["n"] == everything.size
    scale = float(np.abs(everything).max())
    assert abs(figures["mean"] - float(everything.mean())) <= 1e-9 * scale
    assert abs(figures["sd"] - float(everything.std(ddof=1))) <= 1e-9 * scale
    assert not any(
        note["text"].startswith("Not exact")
        for note in _find(bundle, "muscle-volume", None)["note"]
    )


def test_pooled_class_counts_mark_lower_bounds(
    bundle: dict[str, Any], result: ConsortiumResult
) -> None:
    pooled = result.pooled["density-class"]
    assert isinstance(pooled, PooledClassCounts)
    observation = _find(bundle, "density-class", None)
    assert _code_of(observation["method"]) == "pooled-sum"
    components = _components(observation)
    assert components["n"]["valueInteger"] == pooled.n
    for label in CLASSES:
        assert components[label]["valueInteger"] == pooled.counts[label]
    notes = [note["text"] for note in observation["note"]]
    for label in ("heterogeneous", "dense"):
        assert any(f"({label}): a lower bound" in t and "hospital-a.test" in t for t in notes)
    assert not any("(fatty)" in text for text in notes)


def test_a_class_hidden_at_every_site_is_masked_in_the_pool() -> None:
    only_a = merge(_answers()[:1])
    observation = _find(result_bundle(only_a, CONTRACT, issued=ISSUED), "density-class", None)
    components = _components(observation)
    for label in ("heterogeneous", "dense"):
        assert _masked(components[label]) and not _has_value(components[label])
    assert components["fatty"]["valueInteger"] == 9


def test_a_measurement_no_site_showed_is_explained(
    bundle: dict[str, Any], result: ConsortiumResult
) -> None:
    assert set(result.unpooled) == {"bone-area"}
    observation = _find(bundle, "bone-area", None)
    assert _masked(observation) and "component" not in observation
    assert all(site in observation["note"][0]["text"] for site in result.unpooled["bone-area"])


def test_every_code_used_is_published_in_the_code_systems(bundle: dict[str, Any]) -> None:
    published: dict[str, dict[str, str]] = {}
    for name, system in (
        ("omi-statistic", STATISTIC_SYSTEM),
        ("omi-consortium-status", CONSORTIUM_STATUS_SYSTEM),
    ):
        code_system = _code_system(name)
        assert code_system["url"] == system
        published[system] = {c["code"]: c["display"] for c in code_system["concept"]}
    # The Python side names exactly the published codes, with their displays.
    assert published[STATISTIC_SYSTEM] == dict(STATISTIC_CODES)
    assert published[CONSORTIUM_STATUS_SYSTEM] == {
        status.value: display for status, display in CONSORTIUM_STATUS_CODES.items()
    }
    assert {status.value for status in SiteStatus} == set(published[CONSORTIUM_STATUS_SYSTEM])
    used = set()
    for coding in _codings(bundle):
        if coding["system"] in published:
            assert coding["code"] in published[coding["system"]], coding
            assert coding["display"] == published[coding["system"]][coding["code"]]
            used.add(coding["code"])
    # The example uses every status and every statistic.
    assert used == set(published[STATISTIC_SYSTEM]) | set(published[CONSORTIUM_STATUS_SYSTEM])


@pytest.mark.parametrize("name", ["omi-statistic", "omi-consortium-status"])
def test_code_systems_and_value_sets_are_published_as_ours(name: str) -> None:
    values = Placeholders("1.0", "2026-01-01", "Site_A", {})
    for kind in ("CodeSystem", "ValueSet"):
        path = PROFILES / "consortium" / kind / f"{name}.json"
        ours = json.loads(values.replace(path.read_text(encoding="utf-8")))
        get_fhir_model_class(kind).model_validate(ours)
        model = json.loads((PROFILES / "omi" / kind / "omi-measurement.json").read_text())
        assert set(ours) == set(model)
        for key in ("meta", "status", "experimental", "publisher", "version", "date"):
            raw = json.loads(path.read_text(encoding="utf-8"))
            assert raw[key] == model[key], key
    value_set = json.loads((PROFILES / "consortium" / "ValueSet" / f"{name}.json").read_text())
    code_system = _code_system(name)
    assert value_set["compose"]["include"] == [
        {"system": code_system["url"], "version": "#{version}"}
    ]
    assert value_set["url"] == code_system["url"].replace("/CodeSystem/", "/ValueSet/")


def test_figures_of_a_site_that_did_not_answer_are_not_stored() -> None:
    sent = numeric_aggregate("muscle-volume", VOLUMES["hospital-a.test"], k=K)
    failed = SiteAnswer("hospital-a.test", SiteStatus.FAILED, reason="x", aggregates=(sent,))
    bundle = result_bundle(merge([failed]), CONTRACT, issued=ISSUED)
    assert [_code_of(o["code"]) for o in _observations(bundle)] == ["report"]
    assert str(sent.mean) not in json.dumps(bundle)


def test_the_coordinators_dsf_server_stores_it_once_for_itself_only(
    bundle: dict[str, Any],
) -> None:
    entries = [
        *organization_entry("coordinator.test", "c" * 128, "https://coordinator.test/fhir"),
        *organization_entry("hospital-a.test", "a" * 128, "https://hospital-a.test/fhir"),
    ]
    service: FhirService = build_service(
        "coordinator.test", allow_list_bundle(entries), "https://coordinator.test/fhir"
    )
    local = service.local_identity()
    condition = {"if-none-exist": f"identifier={RESULT_IDENTIFIER_SYSTEM}|start-task-1"}
    created = service.create(local, "Bundle", bundle, condition)
    assert created.status == 201, created.resource
    assert created.resource is not None
    stored = service.store.resolve(f"Bundle/{created.resource['id']}")
    assert stored is not None and stored["entry"] == bundle["entry"]
    # The handler runs at least once: a second store finds the first.
    assert service.create(local, "Bundle", bundle, condition).status == 200
    assert len(service.store.all("Bundle")) == 1
    site = service.identify("a" * 128)
    assert isinstance(site, OrganizationIdentity)
    assert not service.may_read(site, stored)
    assert service.may_read(local, stored)


def test_summary_outputs_count_answered_and_missing_sites(result: ConsortiumResult) -> None:
    assert summary_outputs(result) == {"sites-done": 3, "sites-missing": 3}


@pytest.mark.parametrize(
    ("aggregate", "message"),
    [
        (NumericAggregate("spleen-volume", suppressed=True), "not an output"),
        (ClassCounts("muscle-volume", suppressed=True), "is a measurement"),
        (NumericAggregate("density-class", suppressed=True), "is a classification"),
        (
            ClassCounts("density-class", False, 10, {"fatty": 5, "glassy": 5}),
            "glassy",
        ),
    ],
)
def test_an_answer_the_contract_does_not_declare_is_refused(
    aggregate: NumericAggregate | ClassCounts, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_aggregates([aggregate], CONTRACT)
    answer = SiteAnswer("hospital-a.test", SiteStatus.DONE, aggregates=(aggregate,))
    with pytest.raises(ValueError, match=message):
        result_bundle(merge([answer]), CONTRACT, issued=ISSUED)
