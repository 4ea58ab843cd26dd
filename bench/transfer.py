"""How much memory a study transfer through DSF costs the bridge (issue 13).

A synthetic CT series of at least ``--megabytes`` (default 300) is stored in a real Orthanc;
two sandbox DSF FHIR servers run in their own processes (``dsf-bridge sandbox serve``). This
process then does what the two bridges do, with their code: the requesting site streams the
series from Orthanc (WADO-RS), pseudonymizes each instance into a package, encrypts it for
the provider's certificate and uploads it as a Binary readable by the provider only; the
providing site downloads it (mutual TLS, streamed), decrypts it into a file, and reads every
instance back with its digest checked, one at a time.

It prints the bytes that crossed, the seconds and CPU seconds of each side, and the growth of
this process's resident memory above its size before the transfer (sampled every 20 ms from
/proc), the figure the issue bounds at 100 MB for a 300 MB study.

    python bench/transfer.py [--megabytes 300] [--json]

Needs Orthanc with its DICOMweb plugin (``apt-get install orthanc orthanc-dicomweb``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from cryptography.hazmat.primitives import serialization
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dsf_bridge.dsf.certificates import publish_certificate
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.omi.dicomweb import DicomWebArchive
from dsf_bridge.omi.package import PackageReader
from dsf_bridge.omi.pseudonymize import PseudonymizationPolicy, Pseudonymizer
from dsf_bridge.plugins.transfer import (
    TransferSite,
    package_series,
    publish_package,
    receive_package,
)
from dsf_bridge.sandbox.components import OrthancProcess, free_port

REQUESTER = "Hospital_A"
PROVIDER = "AI_Provider"
SLICE = 512


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakMemory:
    """The highest resident size while the block runs (a sampling thread, every 20 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(0.02)

    def __enter__(self) -> PeakMemory:
        self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _slices(megabytes: int) -> Iterator[Dataset]:
    """A CT series of 512 x 512 16-bit slices, ``megabytes`` of pixel data or a little more,
    with a patient's identity in it (what pseudonymization removes)."""
    template = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    count = -(-megabytes * (1 << 20) // (SLICE * SLICE * 2))
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    for index in range(count):
        # A copy of a real Part 10 file (preamble, file meta), as an archive stores it.
        dataset = copy.deepcopy(template)
        dataset.PatientName = "Mustermann^Erika"
        dataset.PatientID = "PID-4711"
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.FrameOfReferenceUID = frame
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.InstanceNumber = index + 1
        dataset.Rows = dataset.Columns = SLICE
        dataset.ImagePositionPatient = [0.0, 0.0, -index * 1.0]
        dataset.SliceLocation = -index * 1.0
        pixels = rng.integers(-1000, 1500, size=(SLICE, SLICE), dtype=np.int16)
        dataset.PixelData = pixels.tobytes()
        yield dataset


async def _store(orthanc: OrthancProcess, megabytes: int) -> tuple[str, str, int]:
    archive = DicomWebArchive(orthanc.dicomweb_url, timeout=300)
    batch: list[Dataset] = []
    count = 0
    first: Dataset | None = None
    try:
        for dataset in _slices(megabytes):
            first = first or dataset
            batch.append(dataset)
            count += 1
            if len(batch) == 25:
                await archive.store(batch)
                batch = []
        if batch:
            await archive.store(batch)
    finally:
        archive.close()
    if first is None:
        raise RuntimeError("no slice was made")
    return str(first.StudyInstanceUID), str(first.SeriesInstanceUID), count


def _site(directory: Path, organization: str, ports: dict[str, int]) -> TransferSite:
    files = directory / organization
    identity = load_identity(files / "client.pem", files / "client-key.pem")
    context = build_ssl_context(identity, [directory / "ca.pem"])

    def client(url: str) -> FhirClient:
        return FhirClient(url, ssl_context=context, timeout=600)

    return TransferSite(
        local=client(f"https://127.0.0.1:{ports[organization]}/fhir"),
        remote=client,
        private_key=identity.key,
        certificate=identity.certificate,
        local_organization=organization,
        directory=directory / "transfers",
        max_bytes=8 << 30,
    )


@contextlib.contextmanager
def _servers(directory: Path, base_port: int) -> Iterator[dict[str, int]]:
    # The ports sandbox init wrote into the allow list's Endpoints (one after the other).
    ports = {REQUESTER: base_port, PROVIDER: base_port + 1}
    processes = []
    try:
        for organization, port in ports.items():
            processes.append(
                subprocess.Popen(  # noqa: S603 - our own CLI
                    [
                        sys.executable,
                        "-m",
                        "dsf_bridge",
                        "sandbox",
                        "serve",
                        str(directory),
                        "--org",
                        organization,
                        "--port",
                        str(port),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield ports
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


async def _ready(site: TransferSite) -> None:
    for _ in range(200):
        with contextlib.suppress(Exception):
            await site.local.request("GET", "metadata")
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the sandbox server at {site.local.base_url} did not start")


async def run(megabytes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as temporary:
        root = Path(temporary)
        directory = root / "sandbox"
        base_port = free_port()
        subprocess.run(  # noqa: S603, ASYNC221 - our own CLI, before anything else runs
            [
                sys.executable,
                "-m",
                "dsf_bridge",
                "sandbox",
                "init",
                str(directory),
                "--org",
                REQUESTER,
                "--org",
                PROVIDER,
                "--base-port",
                str(base_port),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with (
            OrthancProcess(root / "orthanc").start() as orthanc,
            _servers(directory, base_port) as ports,
        ):
            started = time.monotonic()
            study, series, count = await _store(orthanc, megabytes)
            stored_seconds = time.monotonic() - started
            requester = _site(directory, REQUESTER, ports)
            provider = _site(directory, PROVIDER, ports)
            for site in (requester, provider):
                await _ready(site)
                await publish_certificate(
                    site.local, site.certificate.public_bytes(serialization.Encoding.PEM)
                )
            pseudonymizer = Pseudonymizer(
                PseudonymizationPolicy(
                    secret=b"bench-secret-of-at-least-32-characters",
                    dates="shift",
                    refused_modalities=frozenset(),
                )
            )
            archive = DicomWebArchive(orthanc.dicomweb_url, timeout=600)
            baseline = _rss()
            figures: dict[str, Any] = {"instances": count, "stored_seconds": stored_seconds}
            with PeakMemory() as memory:
                cpu = time.process_time()
                clock = time.monotonic()
                with requester.workspace() as workspace:
                    packaged = await package_series(
                        archive,
                        study,
                        series,
                        workspace / "study.zip",
                        pseudonymizer=pseudonymizer,
                        max_instances=100_000,
                    )
                    published = await publish_package(
                        requester,
                        packaged.path,
                        recipient=PROVIDER,
                        transfer_id="bench",
                        title="bench",
                    )
                figures["package_bytes"] = packaged.manifest.total_bytes
                figures["encrypted_bytes"] = published.encrypted_bytes
                figures["requester_seconds"] = time.monotonic() - clock
                figures["requester_cpu_seconds"] = time.process_time() - cpu
                cpu = time.process_time()
                clock = time.monotonic()
                with provider.workspace() as workspace:
                    received = await receive_package(
                        provider,
                        published.binary_url,
                        sender=REQUESTER,
                        target=workspace / "study.zip",
                    )
                    with PackageReader(
                        received.path, max_instances=100_000, max_bytes=8 << 30
                    ) as reader:
                        verified = sum(1 for _ in reader.instances())
                figures["provider_seconds"] = time.monotonic() - clock
                figures["provider_cpu_seconds"] = time.process_time() - cpu
            archive.close()
            await requester.local.aclose()
            await provider.local.aclose()
            figures["verified_instances"] = verified
            figures["rss_before_mb"] = round(baseline / (1 << 20), 1)
            figures["rss_growth_mb"] = round((memory.peak - baseline) / (1 << 20), 1)
            figures["max_rss_mb"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
            )
            return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=300, help="pixel data of the study")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args()
    figures = asyncio.run(run(options.megabytes))
    if options.json:
        print(json.dumps(figures))
        return
    mb = 1 << 20
    print(
        f"study: {figures['instances']} instances, {figures['package_bytes'] / mb:.0f} MB packaged"
    )
    print(
        f"requesting site: stream, pseudonymize, package, encrypt, upload "
        f"{figures['encrypted_bytes'] / mb:.0f} MB in {figures['requester_seconds']:.1f} s "
        f"({figures['requester_cpu_seconds']:.1f} s CPU)"
    )
    print(
        f"providing site: download, decrypt, verify {figures['verified_instances']} instances "
        f"in {figures['provider_seconds']:.1f} s ({figures['provider_cpu_seconds']:.1f} s CPU)"
    )
    print(
        f"memory: {figures['rss_before_mb']} MB before the transfer, growth "
        f"{figures['rss_growth_mb']} MB at the peak (goal: under 100 MB)"
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
