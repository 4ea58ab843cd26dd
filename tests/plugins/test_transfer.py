"""dsf_bridge.plugins.transfer: what a malicious peer could make a site fetch or keep."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dsf_bridge.config import OmiServiceSettings, OmiSettings
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.errors import RemoteError
from dsf_bridge.plugins.inference import SERVICE_OMI_SETTINGS, TRANSFER_FAILED, run_inference
from dsf_bridge.plugins.registry import BpmnError, HandlerContext
from dsf_bridge.plugins.transfer import (
    RESULT_SERIES,
    SERVICE_TRANSFER,
    TransferError,
    check_package_url,
    package_datasets,
    publish_package,
    restore_identity,
    sweep_packages,
    withdraw_package,
)
from dsf_bridge.sandbox.demo import InferenceNetwork
from tests.omi.data import load_ct_small, make_series
from tests.plugins.transfer_sites import publish_certificates, transfer_site

SERVER = "https://dsf.hospital-a.example/fhir"
REQUESTER = "Hospital_A"
PROVIDER = "AI_Provider"


@pytest.mark.parametrize(
    "url",
    [
        f"{SERVER}/Binary/..",  # httpx removes the dot segment: GET /fhir
        f"{SERVER}/Binary/.",
        f"{SERVER}/Binary/../../../admin",
        f"{SERVER}/Binary/x/../..",  # four segments, but no _history: GET /fhir
        f"{SERVER}/Binary/x/anything/1",
        f"{SERVER}/Binary/x/_history/..",
        f"{SERVER}/Binary/a%2F..%2F..%2FTask",
        f"{SERVER}/Binary/%2e%2e",
        f"{SERVER}/Binary/x;jsessionid=1",
        f"{SERVER}/Binary/" + "a" * 65,
    ],
)
def test_a_package_url_is_exactly_a_binary_on_the_senders_server(url: str) -> None:
    with pytest.raises(TransferError):
        check_package_url(url, SERVER)


def test_a_dot_segment_would_leave_the_binary_endpoint() -> None:
    """Why dot segments matter: the client normalizes them away before it sends."""
    assert httpx.URL(f"{SERVER}/Binary/x/../..").path == "/fhir"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            f"{SERVER}/Binary/4f0c1f5e-1111-4222-8333-944445555666",
            "4f0c1f5e-1111-4222-8333-944445555666",
        ),
        (f"{SERVER}/Binary/abc.1-2/_history/3", "abc.1-2"),
    ],
)
def test_a_binary_url_is_accepted(url: str, expected: str) -> None:
    assert check_package_url(url, SERVER) == expected


async def test_a_step_run_again_leaves_no_package_behind(tmp_path: Path) -> None:
    """PrepareStudy published its package, then the bridge stopped before the step committed:
    the step runs again with the same transfer id. The first Binary must not stay readable
    by the provider after the withdrawal (nothing would ever find it again)."""
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER)
        clients: list[FhirClient] = []
        try:
            sender = transfer_site(network, REQUESTER, clients)
            package = tmp_path / "package.zip"
            package_datasets(make_series(load_ct_small())[:2], package)
            first = await publish_package(
                sender, package, recipient=PROVIDER, transfer_id="bk/study", title="test"
            )
            second = await publish_package(
                sender, package, recipient=PROVIDER, transfer_id="bk/study", title="test"
            )
            assert second.document_reference == first.document_reference
            await withdraw_package(sender, second.binary_url, second.document_reference)
            assert network.resources(REQUESTER, "Binary") == []
            assert network.resources(REQUESTER, "DocumentReference") == []
        finally:
            for client in clients:
                await client.aclose()


async def _get(client: FhirClient, path: str) -> tuple[int, dict[str, Any]]:
    try:
        answer = await client.request("GET", path, headers={"Accept": "application/fhir+json"})
    except RemoteError as exc:
        return exc.status or 0, {}
    return answer.status_code, answer.json()


async def test_a_third_organization_finds_no_trace_of_a_package(tmp_path: Path) -> None:
    """Not by read, version read, search or history: neither the Binary nor the
    DocumentReference that is its security context."""
    third = "Other_Clinic"
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: [], third: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER)
        clients: list[FhirClient] = []
        try:
            sender = transfer_site(network, REQUESTER, clients)
            package = tmp_path / "package.zip"
            package_datasets(make_series(load_ct_small())[:1], package)
            published = await publish_package(
                sender, package, recipient=PROVIDER, transfer_id="bk/study", title="test"
            )
            binary = published.binary_url.rsplit("/", 1)[1]
            document = published.document_reference
            remote = await transfer_site(network, third, clients).client_of(REQUESTER)
            for path in (
                f"Binary/{binary}",
                f"Binary/{binary}/_history/1",
                f"Binary/{binary}/_history",
                document,
                f"{document}/_history",
                f"{document}/_history/1",
            ):
                status, body = await _get(remote, path)
                if status == 200:
                    assert body.get("resourceType") == "Bundle", (path, body)
                    assert not body.get("entry"), path
                else:
                    assert status in (403, 404), (path, status)
            for resource_type in ("Binary", "DocumentReference"):
                found = await remote.search(resource_type, {})
                assert found == [], resource_type
        finally:
            for client in clients:
                await client.aclose()


def test_restoring_identity_keeps_the_segs_type_2_attributes_present() -> None:
    """An original without an accession number or a birth date (research data often has
    none): the SEG must still carry them, empty (Type 2 in the Patient and General Study
    modules), and must not keep the pseudonymized values."""
    original = Dataset()
    original.PatientName = "Musterfrau^Erika"
    original.PatientID = "PID-1"
    result = Dataset()
    result.PatientName = "pseudonym"
    result.PatientID = "pseudonym"
    result.PatientBirthDate = "19000101"
    result.PatientSex = "O"
    result.AccessionNumber = "pseudonym"
    result.StudyID = "pseudonym"
    result.PatientIdentityRemoved = "YES"
    restored = restore_identity(result, original)
    assert restored.PatientName == "Musterfrau^Erika"
    assert restored.PatientID == "PID-1"
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        assert keyword in restored, keyword
        assert restored[keyword].value in ("", None), keyword
    assert "PatientIdentityRemoved" not in restored


async def test_the_sweep_withdraws_what_no_running_instance_needs(tmp_path: Path) -> None:
    """A stop between an upload and its withdrawal leaves a package; at the next start the
    sweep deletes it, unless its instance (named in the DocumentReference) still runs."""
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER)
        clients: list[FhirClient] = []
        try:
            sender = transfer_site(network, REQUESTER, clients)
            package = tmp_path / "package.zip"
            package_datasets(make_series(load_ct_small())[:1], package)
            left = await publish_package(
                sender, package, recipient=PROVIDER, transfer_id="gone/study", title="test"
            )
            kept = await publish_package(
                sender, package, recipient=PROVIDER, transfer_id="alive/study", title="test"
            )
            asked: list[str] = []

            async def running(business_key: str) -> bool:
                asked.append(business_key)
                return business_key == "alive"

            assert await sweep_packages(sender.local, running) == 1
            assert sorted(asked) == ["alive", "gone"]
            binaries = {b["id"] for b in network.resources(REQUESTER, "Binary")}
            documents = {d["id"] for d in network.resources(REQUESTER, "DocumentReference")}
            assert binaries == {kept.binary_url.rsplit("/", 1)[1]}
            assert documents == {kept.document_reference.split("/")[1]}
            assert left.binary_url.rsplit("/", 1)[1] not in binaries
            # Nothing else to do the second time.
            assert await sweep_packages(sender.local, running) == 0
        finally:
            for client in clients:
                await client.aclose()


async def test_a_study_package_of_two_series_is_refused_by_the_provider(tmp_path: Path) -> None:
    """A study package holds exactly one series: one of two (format /2, as a result package)
    fails the request ``transfer-failed`` before anything reaches the model."""
    ct = make_series(load_ct_small(), 2)
    other = copy.deepcopy(ct[1])
    other.SeriesInstanceUID = generate_uid()
    async with InferenceNetwork(
        tmp_path / "sites", {}, offline=(), published={REQUESTER: [], PROVIDER: []}
    ) as network:
        await publish_certificates(network, REQUESTER, PROVIDER)
        clients: list[FhirClient] = []
        try:
            sender = transfer_site(network, REQUESTER, clients)
            package = tmp_path / "study.zip"
            package_datasets([ct[0], other], package, max_series=RESULT_SERIES)
            published = await publish_package(
                sender, package, recipient=PROVIDER, transfer_id="bk/study", title="test"
            )
            entry = OmiServiceSettings(id="svc", inference_url="http://127.0.0.1:9")
            ctx = HandlerContext(
                handler="RunInference",
                element_id="RunInference",
                business_key="bk",
                variables={
                    "studyPackage": published.binary_url,
                    "requester": REQUESTER,
                    "serviceId": "svc",
                    "studyInstanceUid": str(ct[0].StudyInstanceUID),
                },
                services={
                    SERVICE_OMI_SETTINGS: OmiSettings(catalogue=[entry]),
                    SERVICE_TRANSFER: transfer_site(network, PROVIDER, clients),
                },
            )
            with pytest.raises(BpmnError) as refused:
                await run_inference(ctx)
        finally:
            for client in clients:
                await client.aclose()
    assert refused.value.code == TRANSFER_FAILED
    assert "holds 2 series, more than the 1" in refused.value.message
