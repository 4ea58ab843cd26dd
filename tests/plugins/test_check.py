"""``plugins check`` on the reference corpus, on broken inputs, and through the CLI.

Corpus: every BPMN and FHIR resource of the plugins under the reference folder (their
``src/main/resources``), the DSF BPE test plugins, and the DSF core's validation resources
(StructureDefinitions, CodeSystems, ValueSets, NamingSystems, Subscriptions) of 2.x and 1.9.0.

Excluded, and asserted to be reported invalid for the reason given:

- ``dsf-process-tutorial/main/``: the tutorial's unsolved exercise skeleton. Its BPMN files are
  incomplete on purpose (a service task without ``camunda:class``, a message start event without
  ``messageRef``, process id ``change_me`` without versionTag) and ``example-task.xml`` is a
  Task without ``status`` and ``intent``, one of the two genuinely invalid examples DESIGN names.
- ``solutions-exercise-7/exercises/figures/*.bpmn``: figures for the tutorial text, drawn with
  plain ``bpmn:task`` elements and send events without handlers; not process models.
- ``dsf-bpe-test-plugin-v2/.../Bundle/DocumentReference-with-Attachment-MeasureReport.xml``: a
  MeasureReport without the required ``period``, the other genuinely invalid example.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsf_bridge.plugins.check import check_paths
from tests.engine.bpmn import process_xml
from tests.reference import reference_dir

PLUGIN_RESOURCES = [
    "dsf-process-ping-pong/src/main/resources",
    "dsf-process-hello-world/src/main/resources",
    "dsf-process-tutorial/solutions-exercise-7/tutorial-process/src/main/resources",
    "dsf-process-allow-list/src/main/resources",
    "mii-process-data-transfer/src/main/resources",
    "dsf/dsf-bpe/dsf-bpe-test-plugin-v1/src/main/resources",
    "dsf/dsf-bpe/dsf-bpe-process-api-v1-impl/src/test/resources/test-plugin",
]
CORE_RESOURCES = [
    "dsf/dsf-fhir/dsf-fhir-validation/src/main/resources/fhir",
    "dsf/v1.9.0/dsf-fhir/dsf-fhir-validation/src/main/resources/fhir",
]
TEST_PLUGIN_V2 = "dsf/dsf-bpe/dsf-bpe-test-plugin-v2/src/main/resources"
INVALID_MEASURE_REPORT = "fhir/Bundle/DocumentReference-with-Attachment-MeasureReport.xml"


def _corpus_paths() -> list[Path]:
    root = reference_dir()
    paths = [root / relative for relative in PLUGIN_RESOURCES + CORE_RESOURCES]
    v2 = root / TEST_PLUGIN_V2
    paths += [
        path
        for path in sorted(v2.rglob("*"))
        if path.is_file()
        and path.suffix in (".bpmn", ".xml")
        and not path.as_posix().endswith(INVALID_MEASURE_REPORT)
    ]
    for path in paths:
        assert path.exists(), path
    return paths


def test_reference_corpus_is_valid() -> None:
    report = check_paths(_corpus_paths(), version="1.0", date="2026-01-01")
    invalid = [file_report.line() for file_report in report.files if not file_report.valid]
    assert invalid == []
    kinds = {file_report.resource_type.split()[0] for file_report in report.files}  # type: ignore[union-attr]
    assert {"BPMN", "ActivityDefinition", "StructureDefinition", "CodeSystem"} <= kinds
    assert {"ValueSet", "NamingSystem", "Questionnaire", "Task"} <= kinds
    bpmn = [r for r in report.files if r.kind == "bpmn"]
    activity = [r for r in report.files if r.resource_type == "ActivityDefinition"]
    assert len(bpmn) == 17
    assert len(activity) >= 17
    assert len(report.files) >= 210
    assert report.ok


def test_excluded_files_are_reported_invalid_for_the_documented_reasons() -> None:
    root = reference_dir()
    skeleton = check_paths([root / "dsf-process-tutorial/main"], date="2026-01-01")
    reasons = {Path(r.path).name: " ".join(r.problems) for r in skeleton.files if not r.valid}
    assert "needs camunda:class" in reasons["dic-process.bpmn"]
    assert "needs messageRef" in reasons["cos-process.bpmn"]
    assert "'change_me' has no camunda:versionTag" in reasons["hrp-process.bpmn"]
    assert "status" in reasons["example-task.xml"]
    figures = check_paths(
        sorted(
            (root / "dsf-process-tutorial/solutions-exercise-7/exercises/figures").glob("*.bpmn")
        )
    )
    assert len(figures.files) == 2
    assert not any(r.valid for r in figures.files)
    measure = check_paths([root / TEST_PLUGIN_V2 / INVALID_MEASURE_REPORT], date="2026-01-01")
    assert measure.files[0].problems == ["period: Field required"]
    assert not measure.ok


def test_version_tag_is_compared_after_substitution() -> None:
    ping = reference_dir() / "dsf-process-ping-pong/src/main/resources/bpe/ping.bpmn"
    assert check_paths([ping], version="2.3").ok
    report = check_paths([ping], version="2.3.0")
    assert "not 'major.minor'" in report.files[0].problems[0]


def _activity(authorization: str, url: str = "http://example.org/bpe/Process/demo") -> str:
    return (
        '<ActivityDefinition xmlns="http://hl7.org/fhir">'
        + authorization
        + f'<url value="{url}"/><version value="#{{version}}"/><status value="unknown"/>'
        + '<kind value="Task"/></ActivityDefinition>'
    )


def _authorization(message: str, requester: str, recipient: str, detail: str = "") -> str:
    return (
        '<extension url="http://dsf.dev/fhir/StructureDefinition/extension-process-authorization">'
        + f'<extension url="message-name"><valueString value="{message}"/></extension>'
        + '<extension url="task-profile"><valueCanonical '
        + 'value="http://example.org/fhir/StructureDefinition/task-demo|#{version}"/></extension>'
        + f'<extension url="requester"><valueCoding>{detail}<system '
        + 'value="http://dsf.dev/fhir/CodeSystem/process-authorization"/>'
        + f'<code value="{requester}"/></valueCoding></extension>'
        + '<extension url="recipient"><valueCoding><system '
        + 'value="http://dsf.dev/fhir/CodeSystem/process-authorization"/>'
        + f'<code value="{recipient}"/></valueCoding></extension></extension>'
    )


ORGANIZATION_DETAIL = (
    '<extension url="http://dsf.dev/fhir/StructureDefinition/'
    'extension-process-authorization-organization"><valueIdentifier><system '
    'value="http://dsf.dev/sid/organization-identifier"/><value value="org.example"/>'
    "</valueIdentifier></extension>"
)


ROLE_WITHOUT_ROLE = (
    '<extension url="http://dsf.dev/fhir/StructureDefinition/'
    'extension-process-authorization-parent-organization-role">'
    '<extension url="parent-organization"><valueIdentifier><system '
    'value="http://dsf.dev/sid/organization-identifier"/><value value="parent.example"/>'
    "</valueIdentifier></extension></extension>"
)
BAD_ORGANIZATION = ORGANIZATION_DETAIL.replace(
    "http://dsf.dev/sid/organization-identifier", "urn:other"
)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (_activity(""), "no extension-process-authorization"),
        (_activity(_authorization(" ", "LOCAL_ALL", "LOCAL_ALL")), "non-blank message-name"),
        (_activity(_authorization("go", "EVERYONE", "LOCAL_ALL")), "'EVERYONE' is not a process"),
        (_activity(_authorization("go", "LOCAL_ALL", "REMOTE_ALL")), "not allowed for recipients"),
        (
            _activity(_authorization("go", "REMOTE_ORGANIZATION", "LOCAL_ALL")),
            "needs exactly one extension",
        ),
        (
            _activity(_authorization("go", "LOCAL_ROLE", "LOCAL_ALL", ROLE_WITHOUT_ROLE)),
            "needs an organization-role sub-extension",
        ),
        (
            _activity(_authorization("go", "LOCAL_ORGANIZATION", "LOCAL_ALL", BAD_ORGANIZATION)),
            "needs valueIdentifier with system http://dsf.dev/sid/organization-identifier",
        ),
        (
            _activity(_authorization("go", "LOCAL_ALL", "LOCAL_ALL") * 2),
            "'go': message-name authorized twice",
        ),
        (
            _activity(_authorization("go", "LOCAL_ALL", "LOCAL_ALL"), url="http://x.org/other"),
            "is not http(s)://<domain>/bpe/Process/<name>",
        ),
    ],
    ids=["none", "blank", "code", "recipient", "detail", "role", "identifier", "twice", "url"],
)
def test_broken_process_authorization_is_reported(tmp_path: Path, body: str, problem: str) -> None:
    path = tmp_path / "ActivityDefinition.xml"
    path.write_text(body)
    report = check_paths([path], date="2026-01-01")
    assert not report.ok
    assert problem in " ".join(report.files[0].problems)


def test_well_formed_authorization_with_organization_detail_passes(tmp_path: Path) -> None:
    path = tmp_path / "ok.xml"
    path.write_text(
        _activity(_authorization("go", "REMOTE_ORGANIZATION", "LOCAL_ALL", ORGANIZATION_DETAIL))
    )
    report = check_paths([path], date="2026-01-01")
    assert report.files[0].problems == []
    assert report.ok


def test_json_resources_and_unresolved_placeholders(tmp_path: Path) -> None:
    good = tmp_path / "cs.json"
    good.write_text(
        json.dumps(
            {
                "resourceType": "CodeSystem",
                "url": "http://example.org/fhir/CodeSystem/demo",
                "version": "#{version}",
                "status": "active",
                "content": "complete",
                "publisher": "#{organization}",
            }
        )
    )
    bad = tmp_path / "needs-env.json"
    bad.write_text(
        json.dumps(
            {
                "resourceType": "CodeSystem",
                "status": "active",
                "content": "complete",
                "title": "#{demo.title}",
            }
        )
    )
    report = check_paths([good, bad], environment={})
    assert report.files[0].valid
    assert "DEMO_TITLE" in report.files[1].problems[0]
    assert check_paths([bad], environment={"DEMO_TITLE": "Demo"}).ok


def test_hostile_xml_is_reported_not_parsed(tmp_path: Path) -> None:
    path = tmp_path / "evil.xml"
    path.write_text(
        '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        '<CodeSystem xmlns="http://hl7.org/fhir"><title value="&e;"/></CodeSystem>'
    )
    report = check_paths([path])
    assert "DOCTYPE" in report.files[0].problems[0]


def test_deeply_nested_files_are_reported_invalid_not_a_traceback(tmp_path: Path) -> None:
    """JSON nested 50,000 levels used to end the command in RecursionError (``json`` recurses
    once per level); 150 levels got pydantic's "recursion limit exceeded" instead of a reason."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    head = '{"resourceType": "CodeSystem", "status": "active", "concept": ['
    for levels in (50_000, 150):
        nested = '{"code": "a", "concept": [' * levels + '{"code": "b"}' + "]}" * levels
        (folder / f"deep-{levels}.json").write_text(head + nested + "]}")
    # Brackets inside strings are no nesting: this one is fine (and valid).
    (folder / "brackets.json").write_text(
        '{"resourceType": "CodeSystem", "status": "active", "content": "complete", '
        '"title": "' + "[{" * 300 + '\\"[{"}'
    )
    (folder / "deep.xml").write_text(
        '<CodeSystem xmlns="http://hl7.org/fhir"><status value="active"/>'
        + '<concept><code value="a"/>' * 300
        + "</concept>" * 300
        + "</CodeSystem>"
    )
    result = subprocess.run(
        [sys.executable, "-m", "dsf_bridge", "plugins", "check", "--json", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    report = {Path(file["path"]).name: file for file in json.loads(result.stdout)["files"]}
    assert report["brackets.json"]["valid"], report["brackets.json"]
    for name in ("deep-50000.json", "deep-150.json"):
        assert report[name]["problems"] == ["nested deeper than 200 levels (objects and arrays)"]
    assert report["deep.xml"]["problems"][0].startswith("nested deeper than 256 levels")


def test_cli_subprocess_lines_json_and_exit_codes(tmp_path: Path) -> None:
    ping_pong = reference_dir() / "dsf-process-ping-pong"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsf_bridge",
            "plugins",
            "check",
            str(ping_pong),
            "--date",
            "2026-01-01",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("valid ") for line in lines) == 20
    assert lines[-1] == "20 checked, 0 invalid, 0 skipped"

    broken = tmp_path / "broken.bpmn"
    broken.write_text("<bpmn:definitions")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsf_bridge",
            "plugins",
            "check",
            "--json",
            "--version",
            "1.0",
            "--organization",
            "org.example",
            str(broken),
            str(ping_pong / "src/main/resources/bpe"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["checked"] == 4
    assert report["invalid"] == 1
    assert "malformed XML" in report["files"][0]["problems"][0]


def test_camunda_parse_warnings_are_listed_without_failing_the_model(tmp_path: Path) -> None:
    flows = (
        '<bpmn:sequenceFlow id="f1" sourceRef="s" targetRef="g"/>'
        '<bpmn:sequenceFlow id="f2" sourceRef="g" targetRef="e1">'
        "<bpmn:conditionExpression>${x == 1}</bpmn:conditionExpression></bpmn:sequenceFlow>"
        '<bpmn:sequenceFlow id="f3" sourceRef="g" targetRef="e2"/>'
    )
    path = tmp_path / "gateway.bpmn"
    path.write_bytes(
        process_xml(
            '<bpmn:startEvent id="s"><bpmn:messageEventDefinition messageRef="start"/>'
            '</bpmn:startEvent>\n<bpmn:exclusiveGateway id="g"/>\n'
            '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>' + flows
        )
    )
    report = check_paths([path], date="2026-01-01")
    assert report.ok
    [warning] = report.files[0].warnings
    assert warning.startswith(f"{path}:4: <bpmn:exclusiveGateway id=\"g\">: outgoing flow 'f3'")
    assert report.files[0].line().splitlines()[1] == f"  warning: {warning}"
    assert report.as_json()["files"][0]["warnings"] == [warning]
