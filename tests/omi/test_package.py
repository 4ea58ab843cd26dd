"""The study package: a CT series round trip, and every way a package can lie."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dsf_bridge.omi.package import (
    FORMAT,
    FORMAT_SERIES,
    MANIFEST_NAME,
    PackageError,
    PackageManifest,
    PackageReader,
    PackageWriter,
)
from tests.omi.data import SERIES_SLICES, make_series

LIMITS = {"max_instances": 100, "max_bytes": 100 << 20}


def _write(path: Path, series: list[Dataset]) -> PackageManifest:
    with path.open("wb") as target, PackageWriter(target) as writer:
        for dataset in series:
            writer.add(dataset)
    return writer.close()


@pytest.fixture
def package(tmp_path: Path, ct_series: list[Dataset]) -> Path:
    path = tmp_path / "series.zip"
    _write(path, ct_series)
    return path


def _rewrite(
    source: Path,
    target: Path,
    *,
    manifest: Callable[[dict[str, object]], None] | None = None,
    files: Callable[[dict[str, bytes]], None] | None = None,
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """A copy of ``source`` with its manifest and files edited: a forged package."""
    with zipfile.ZipFile(source) as original:
        contents = {name: original.read(name) for name in original.namelist()}
    document = json.loads(contents.pop(MANIFEST_NAME))
    if manifest is not None:
        manifest(document)
    if files is not None:
        files(contents)
    with zipfile.ZipFile(target, "w", compression=compression) as forged:
        for name, data in contents.items():
            forged.writestr(name, data)
        forged.writestr(MANIFEST_NAME, json.dumps(document))
    return target


def test_a_ct_series_round_trips_with_its_manifest(package: Path, ct_series: list[Dataset]) -> None:
    with PackageReader(package, **LIMITS) as reader:
        manifest = reader.manifest
        read = list(reader.instances())
    assert manifest.study_instance_uid == ct_series[0].StudyInstanceUID
    assert manifest.series_instance_uid == ct_series[0].SeriesInstanceUID
    assert manifest.modality == "CT"
    assert manifest.instance_count == SERIES_SLICES
    assert [e.sop_instance_uid for e in manifest.entries] == [d.SOPInstanceUID for d in ct_series]
    assert [d.SOPInstanceUID for d in read] == [d.SOPInstanceUID for d in ct_series]
    assert [d.PixelData for d in read] == [d.PixelData for d in ct_series]
    with zipfile.ZipFile(package) as archive:
        infos = archive.infolist()
        assert infos[-1].filename == MANIFEST_NAME  # written last
        assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
        for entry in manifest.entries:
            data = archive.read(entry.name)
            assert len(data) == entry.size
            assert hashlib.sha256(data).hexdigest() == entry.sha256
            assert data[128:132] == b"DICM"  # Part 10 preamble and prefix
        document = json.loads(archive.read(MANIFEST_NAME))
    assert document["format"] == FORMAT
    assert document["total_bytes"] == manifest.total_bytes == sum(e.size for e in manifest.entries)


def test_a_deflated_package_from_elsewhere_is_read_too(package: Path, tmp_path: Path) -> None:
    forged = _rewrite(package, tmp_path / "deflated.zip", compression=zipfile.ZIP_DEFLATED)
    with PackageReader(forged, **LIMITS) as reader:
        assert len(list(reader.instances())) == SERIES_SLICES


def test_the_writer_refuses_a_second_series(ct_small: Dataset, tmp_path: Path) -> None:
    first = make_series(ct_small, 1)[0]
    second = _other_series(first, "SEG")
    with (tmp_path / "x.zip").open("wb") as target, PackageWriter(target) as writer:
        writer.add(first)
        with pytest.raises(PackageError, match="one series"):
            writer.add(second)
        with pytest.raises(PackageError, match="one study"):
            writer.add(make_series(ct_small, 1)[0])


def _other_series(instance: Dataset, modality: str) -> Dataset:
    """A copy of ``instance`` as the one instance of a new series of its study."""
    other = copy.deepcopy(instance)
    other.SeriesInstanceUID = generate_uid()
    other.SOPInstanceUID = generate_uid()
    other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID
    other.Modality = modality
    return other


@pytest.fixture
def result_package(tmp_path: Path, ct_series: list[Dataset]) -> Path:
    """A package of two series of one study (as a SEG and its SR come back)."""
    path = tmp_path / "result.zip"
    with path.open("wb") as target, PackageWriter(target, max_series=2) as writer:
        writer.add(_other_series(ct_series[0], "SEG"))
        writer.add(_other_series(ct_series[0], "SR"))
    return path


def test_two_series_of_one_study_round_trip_in_format_2(
    result_package: Path, ct_series: list[Dataset]
) -> None:
    with PackageReader(result_package, **LIMITS, max_series=2) as reader:
        manifest = reader.manifest
        read = list(reader.instances())
    assert [s.modality for s in manifest.series] == ["SEG", "SR"]
    assert manifest.study_instance_uid == ct_series[0].StudyInstanceUID
    assert [d.SeriesInstanceUID for d in read] == [s.series_instance_uid for s in manifest.series]
    assert [e.series_instance_uid for e in manifest.entries] == [d.SeriesInstanceUID for d in read]
    with zipfile.ZipFile(result_package) as archive:
        document = json.loads(archive.read(MANIFEST_NAME))
    assert document["format"] == FORMAT_SERIES
    assert "series_instance_uid" not in document  # nothing a /1 reader could take for its one
    assert [s["modality"] for s in document["series"]] == ["SEG", "SR"]


def test_a_study_package_of_two_series_is_refused(result_package: Path) -> None:
    with pytest.raises(PackageError, match="holds 2 series, more than the 1"):
        PackageReader(result_package, **LIMITS)


def test_a_one_series_package_is_written_as_format_1(package: Path) -> None:
    """Bridges that read /1 only keep reading what holds one series."""
    with zipfile.ZipFile(package) as archive:
        document = json.loads(archive.read(MANIFEST_NAME))
    assert document["format"] == FORMAT
    assert "series" not in document
    assert all("series_instance_uid" not in i for i in document["instances"])


def test_a_format_1_package_opens_where_two_series_may_come(
    package: Path, tmp_path: Path, ct_series: list[Dataset]
) -> None:
    """A result package of an older provider: its one series, the manifest exactly as /1
    bridges wrote it."""

    def as_written_before(document: dict[str, object]) -> None:
        assert document["format"] == FORMAT
        del document["body_part"]  # before contracts checked it

    older = _rewrite(package, tmp_path / "older.zip", manifest=as_written_before)
    with PackageReader(older, **LIMITS, max_series=2) as reader:
        assert [s.series_instance_uid for s in reader.manifest.series] == [
            ct_series[0].SeriesInstanceUID
        ]
        assert len(list(reader.instances())) == SERIES_SLICES


def _unknown_series(document: dict[str, object]) -> None:
    _first(document)["series_instance_uid"] = "2.25.1"


def _unused_series(document: dict[str, object]) -> None:
    series = document["series"]
    assert isinstance(series, list)
    series.append({"series_instance_uid": "2.25.2", "modality": "CT"})


def _series_twice(document: dict[str, object]) -> None:
    series = document["series"]
    assert isinstance(series, list)
    series.append(dict(series[0]))


def _no_series(document: dict[str, object]) -> None:
    document["series"] = []


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (_unknown_series, r"instances of series it does not list: \['2.25.1'\]"),
        (_unused_series, r"series without instances: \['2.25.2'\]"),
        (_series_twice, "lists one series twice"),
        (_no_series, "no list 'series'"),
    ],
)
def test_a_two_series_manifest_that_does_not_add_up_is_refused(
    result_package: Path,
    tmp_path: Path,
    manifest: Callable[[dict[str, object]], None],
    message: str,
) -> None:
    forged = _rewrite(result_package, tmp_path / "forged.zip", manifest=manifest)
    with pytest.raises(PackageError, match=message):
        PackageReader(forged, **LIMITS, max_series=3)


def test_an_instance_in_another_series_than_its_entry_says_is_refused(
    result_package: Path, tmp_path: Path
) -> None:
    def swap(document: dict[str, object]) -> None:
        instances = document["instances"]
        assert isinstance(instances, list)
        first, second = instances
        first["series_instance_uid"], second["series_instance_uid"] = (
            second["series_instance_uid"],
            first["series_instance_uid"],
        )

    forged = _rewrite(result_package, tmp_path / "forged.zip", manifest=swap)
    with (
        PackageReader(forged, **LIMITS, max_series=2) as reader,
        pytest.raises(PackageError, match="SeriesInstanceUID differs from the manifest's"),
    ):
        list(reader.instances())


def test_limits_are_checked_before_anything_is_read(package: Path) -> None:
    with pytest.raises(PackageError, match=f"{SERIES_SLICES} instances, more than the limit of 4"):
        PackageReader(package, max_instances=4, max_bytes=100 << 20)
    with pytest.raises(PackageError, match="more than the limit of 1000"):
        PackageReader(package, max_instances=100, max_bytes=1000)


def _first(document: dict[str, object]) -> dict[str, object]:
    instances = document["instances"]
    assert isinstance(instances, list)
    first = instances[0]
    assert isinstance(first, dict)
    return first


def _unlisted(files: dict[str, bytes]) -> None:
    files["instances/00099.dcm"] = files["instances/00001.dcm"]


def _traversal(files: dict[str, bytes]) -> None:
    files["../../etc/cron.d/x"] = b"* * * * * root true"


def _absolute(files: dict[str, bytes]) -> None:
    files["/srv/x.dcm"] = b"x"


def _missing(files: dict[str, bytes]) -> None:
    del files["instances/00002.dcm"]


def _swapped(files: dict[str, bytes]) -> None:
    files["instances/00001.dcm"], files["instances/00002.dcm"] = (
        files["instances/00002.dcm"],
        files["instances/00001.dcm"],
    )


def _format(document: dict[str, object]) -> None:
    document["format"] = "dsf-bridge-dicom-series/9"


def _count(document: dict[str, object]) -> None:
    document["instance_count"] = 1


def _total(document: dict[str, object]) -> None:
    document["total_bytes"] = 10


def _size(document: dict[str, object]) -> None:
    first = _first(document)
    first["size"] = int(str(first["size"])) + 1
    document["total_bytes"] = int(str(document["total_bytes"])) + 1


def _unlist(document: dict[str, object]) -> None:
    instances = document["instances"]
    assert isinstance(instances, list)
    del instances[-1]
    document["instance_count"] = len(instances)
    document["total_bytes"] = sum(int(i["size"]) for i in instances)


@pytest.mark.parametrize(
    ("manifest", "files", "message"),
    [
        (None, _unlisted, r"does not list: \['instances/00099.dcm'\]"),
        (None, _traversal, "unexpected file '../../etc/cron.d/x'"),
        (None, _absolute, "unexpected file '/srv/x.dcm'"),
        (None, _missing, r"lacks files its manifest lists: \['instances/00002.dcm'\]"),
        (_format, None, "format is 'dsf-bridge-dicom-series/9'"),
        (_count, None, "declares 1 instances but lists 5"),
        (_total, None, "declares 10 bytes"),
        (_size, None, "the ZIP declares .* bytes for instances/00001.dcm"),
        (_unlist, None, r"does not list: \['instances/00005.dcm'\]"),
    ],
)
def test_a_manifest_that_does_not_match_the_zip_is_refused_on_opening(
    package: Path,
    tmp_path: Path,
    manifest: Callable[[dict[str, object]], None] | None,
    files: Callable[[dict[str, bytes]], None] | None,
    message: str,
) -> None:
    forged = _rewrite(package, tmp_path / "forged.zip", manifest=manifest, files=files)
    with pytest.raises(PackageError, match=message):
        PackageReader(forged, **LIMITS)


def test_an_altered_instance_fails_its_digest_before_it_is_parsed(
    package: Path, tmp_path: Path
) -> None:
    def alter(files: dict[str, bytes]) -> None:
        data = bytearray(files["instances/00003.dcm"])
        data[-1] ^= 0xFF
        files["instances/00003.dcm"] = bytes(data)

    forged = _rewrite(package, tmp_path / "forged.zip", files=alter)
    with PackageReader(forged, **LIMITS) as reader:
        instances = reader.instances()
        assert next(instances).InstanceNumber == 1
        assert next(instances).InstanceNumber == 2
        with pytest.raises(PackageError, match=r"00003\.dcm does not match its SHA-256"):
            next(instances)


def test_swapped_files_fail_their_digests(package: Path, tmp_path: Path) -> None:
    forged = _rewrite(package, tmp_path / "forged.zip", files=_swapped)
    # Two instances of one series differ in size when their generated UIDs differ in length:
    # then the sizes the ZIP declares give the swap away when the package is opened, else the
    # digests when the instances are read. Either way nothing of it is used.
    with (
        pytest.raises(PackageError, match=r"SHA-256|the ZIP declares"),
        PackageReader(forged, **LIMITS) as reader,
    ):
        list(reader.instances())


def test_a_zip_bomb_is_refused_by_its_declared_and_its_actual_size(
    package: Path, tmp_path: Path
) -> None:
    # Declared: a deflated manifest of 20 MB of spaces is refused from its header alone.
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST_NAME, b" " * (20 << 20))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(PackageError, match="declares 20971520 bytes"):
        PackageReader(bomb, **LIMITS)

    # Actual: headers lowered to claim a small entry while the data inflates to more.
    big = b"\x00" * (3 << 20)
    lying = tmp_path / "lying.zip"
    with zipfile.ZipFile(lying, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("instances/00001.dcm", big)
    raw = bytearray(lying.read_bytes())
    size = len(big).to_bytes(4, "little")
    small = (1000).to_bytes(4, "little")
    assert raw.count(size) == 2  # local header and central directory
    raw = raw.replace(size, small)
    lying.write_bytes(bytes(raw))
    document = {
        "format": FORMAT,
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "modality": "CT",
        "instance_count": 1,
        "total_bytes": 1000,
        "instances": [
            {
                "name": "instances/00001.dcm",
                "sop_instance_uid": "1.2.3.4.5",
                "size": 1000,
                "sha256": hashlib.sha256(big[:1000]).hexdigest(),
            }
        ],
    }
    with zipfile.ZipFile(lying, "a") as archive:
        archive.writestr(MANIFEST_NAME, json.dumps(document))
    with PackageReader(lying, **LIMITS) as reader, pytest.raises(PackageError, match="damaged"):
        list(reader.instances())


def test_not_a_zip_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.zip"
    path.write_bytes(b"PK\x03\x04 but nothing else")
    with pytest.raises(PackageError, match="not a readable ZIP"):
        PackageReader(path, **LIMITS)


def test_the_writer_streams_into_any_binary_file(ct_series: list[Dataset]) -> None:
    buffer = io.BytesIO()
    with PackageWriter(buffer) as writer:
        writer.add(ct_series[0])
    manifest = writer.close()
    assert manifest.instance_count == 1
    assert zipfile.ZipFile(io.BytesIO(buffer.getvalue())).namelist() == [
        "instances/00001.dcm",
        MANIFEST_NAME,
    ]


def test_nested_sequences_are_written_without_seeking(
    ct_series: list[Dataset], tmp_path: Path
) -> None:
    dataset = copy.deepcopy(ct_series[0])
    inner = Dataset()
    inner.CodeValue = "T-D0050"
    item = Dataset()
    item.ReferencedSOPInstanceUID = ct_series[1].SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [inner]
    dataset.ReferencedImageSequence = [item, item]
    path = tmp_path / "sq.zip"
    _write(path, [dataset])
    with PackageReader(path, **LIMITS) as reader:
        (read,) = reader.instances()
    assert read.ReferencedImageSequence[1].PurposeOfReferenceCodeSequence[0].CodeValue == "T-D0050"


def test_a_central_directory_of_too_many_entries_is_refused_before_it_is_parsed(
    tmp_path: Path,
) -> None:
    """Python's ZipFile builds one ZipInfo per central directory entry when it opens a file:
    a sender's package of millions of empty entries would take gigabytes before the manifest
    and its instance limit were looked at. The entry count in the end record is checked
    first."""
    import tracemalloc

    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for number in range(70_000):  # beyond 65535: a ZIP64 end record too
            archive.writestr(f"instances/{number % 99999:05d}.dcm", b"")
    tracemalloc.start()
    try:
        with pytest.raises(PackageError, match="entries"):
            PackageReader(path, max_instances=100, max_bytes=100 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, peak


@pytest.mark.parametrize("count", [40, 70_000])
def test_the_entry_count_is_read_from_either_end_record(tmp_path: Path, count: int) -> None:
    path = tmp_path / "entries.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for number in range(count):
            archive.writestr(f"e{number}", b"")
        archive.comment = b"a comment moves the end record"
    with pytest.raises(PackageError, match=f"{count} entries"):
        PackageReader(path, max_instances=1, max_bytes=100 << 20)


def test_a_central_directory_larger_than_its_count_is_refused(tmp_path: Path) -> None:
    """zipfile walks the directory by its size, not by the count: both are checked."""
    path = tmp_path / "long.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for number in range(300):
            archive.writestr(f"{number:05d}" + "x" * 200, b"")
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + 8 : end + 12] = (2).to_bytes(2, "little") * 2  # claim two entries
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="directory has"):
        PackageReader(path, max_instances=1, max_bytes=100 << 20)
