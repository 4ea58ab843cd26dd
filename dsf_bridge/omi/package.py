"""The study package: DICOM series of one study as a ZIP of Part 10 files with a manifest of
digests.

What crosses between sites (issue 13) is packaged here, then encrypted (``dsf/crypto.py``) into
a FHIR Binary: a study package (requester to provider) holds one series, a result package
(provider to requester) the SEG series and the SR series of the SEG's measurement report. The
ZIP holds ``instances/00001.dcm``, ... and, written last, ``manifest.json``. A package of one
series has the format ``/1``, as every bridge has written it since issue 13::

    {"format": "dsf-bridge-dicom-series/1", "study_instance_uid": ..., "series_instance_uid": ...,
     "modality": "CT", "instance_count": 2, "total_bytes": 1048700,
     "instances": [{"name": "instances/00001.dcm", "sop_instance_uid": ..., "size": 524350,
                    "sha256": "<64 hex>"}, ...]}

A package of several series of the study has the format ``/2``: a list ``series`` (UID,
modality, body part) in place of the one series' fields, and each instance names its series::

    {"format": "dsf-bridge-dicom-series/2", "study_instance_uid": ...,
     "series": [{"series_instance_uid": ..., "modality": "SEG", "body_part": ""}, ...],
     "instance_count": 2, "total_bytes": 40960,
     "instances": [{"name": "instances/00001.dcm", "series_instance_uid": ...,
                    "sop_instance_uid": ..., "size": 30720, "sha256": "<64 hex>"}, ...]}

The format string is the version: a bridge that reads ``/1`` only refuses a ``/2`` package
("the sending site runs an incompatible version") instead of reading its second series as an
instance that contradicts the manifest. The writer writes ``/1`` whenever it can, so that
older readers keep reading one-series packages.

Entries are stored, not deflated: on CT pixel data deflate saves about a third of the bytes at
some 20 MB/s of one core (measured on pydicom's ``CT_small.dcm``: ratio 0.64 at level 1), so on
any link faster than about 50 Mbit/s compressing costs more time than it saves, and the bytes
are encrypted and streamed anyway.

The reader trusts nothing before it checked it: the manifest first (every ZIP entry listed,
nothing unlisted, only ``instances/NNNNN.dcm`` names, sizes declared by the ZIP equal to the
manifest's and within the limits), then each instance's size and SHA-256 while it is read and
before it is parsed, one instance in memory at a time. A package that fails any check raises
:class:`PackageError` saying what is wrong; nothing from it should be used.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dsf_bridge.errors import BridgeError

__all__ = [
    "FORMAT",
    "FORMAT_SERIES",
    "MANIFEST_NAME",
    "PackageEntry",
    "PackageError",
    "PackageManifest",
    "PackageReader",
    "PackageSeries",
    "PackageWriter",
]

FORMAT = "dsf-bridge-dicom-series/1"
# Several series of one study (a SEG and its SR): written only when there are several.
FORMAT_SERIES = "dsf-bridge-dicom-series/2"
MANIFEST_NAME = "manifest.json"
_INSTANCE_NAME = re.compile(r"instances/[0-9]{5}\.dcm")
_MAX_MANIFEST_BYTES = 16 << 20  # ~100 000 instances; more is no series
_READ_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
# What one entry of our central directory may take: 46 fixed bytes, a 19-character name, a
# ZIP64 extra field (28) and room to spare. Beyond it per allowed entry, a sender's directory
# is refused before Python's ZipFile builds a ZipInfo for every entry in it.
_CENTRAL_ENTRY_BYTES = 256
_END_RECORD = b"PK\x05\x06"
_END_RECORD_BYTES = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_LOCATOR_BYTES = 20
_ZIP64_END_RECORD = b"PK\x06\x06"


class PackageError(BridgeError):
    """A study package is malformed, altered, incomplete or over a limit; never retryable."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@dataclass(frozen=True)
class PackageEntry:
    """One instance file of the package."""

    name: str
    sop_instance_uid: str
    size: int
    sha256: str
    # The series it belongs to; the manifest's one series in a ``/1`` package.
    series_instance_uid: str = ""


@dataclass(frozen=True)
class PackageSeries:
    """One series of the package: what QIDO-RS would say of it."""

    series_instance_uid: str
    modality: str
    # BodyPartExamined of its first instance ("" when it has none): what a contract checks.
    body_part: str = ""


@dataclass(frozen=True)
class PackageManifest:
    """What ``manifest.json`` says about the package. ``series_instance_uid``, ``modality``
    and ``body_part`` are those of its first series; ``more_series`` the others (a result
    package's SR)."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    entries: tuple[PackageEntry, ...]
    # BodyPartExamined of the first instance ("" when it has none): what a contract checks.
    body_part: str = ""
    more_series: tuple[PackageSeries, ...] = ()

    @property
    def series(self) -> tuple[PackageSeries, ...]:
        """Every series of the package, the first first."""
        first = PackageSeries(self.series_instance_uid, self.modality, self.body_part)
        return (first, *self.more_series)

    @property
    def instance_count(self) -> int:
        return len(self.entries)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries)

    def to_json(self) -> bytes:
        """``/1`` for one series (what every bridge reads), ``/2`` for several."""
        instances: list[dict[str, Any]] = [
            {
                "name": e.name,
                "sop_instance_uid": e.sop_instance_uid,
                "size": e.size,
                "sha256": e.sha256,
            }
            for e in self.entries
        ]
        document: dict[str, Any]
        if not self.more_series:
            document = {
                "format": FORMAT,
                "study_instance_uid": self.study_instance_uid,
                "series_instance_uid": self.series_instance_uid,
                "modality": self.modality,
                "body_part": self.body_part,
            }
        else:
            document = {
                "format": FORMAT_SERIES,
                "study_instance_uid": self.study_instance_uid,
                "series": [
                    {
                        "series_instance_uid": s.series_instance_uid,
                        "modality": s.modality,
                        "body_part": s.body_part,
                    }
                    for s in self.series
                ],
            }
            for item, entry in zip(instances, self.entries, strict=True):
                item["series_instance_uid"] = entry.series_instance_uid
        document |= {
            "instance_count": self.instance_count,
            "total_bytes": self.total_bytes,
            "instances": instances,
        }
        return json.dumps(document, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PackageManifest:
        """Parse and check a manifest; :class:`PackageError` names the first problem."""
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise PackageError(f"the package's {MANIFEST_NAME} is not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise PackageError(f"the package's {MANIFEST_NAME} is not a JSON object")
        version = document.get("format")
        if version not in (FORMAT, FORMAT_SERIES):
            raise PackageError(
                f"the package's format is {version!r}, this bridge reads {FORMAT!r} and "
                f"{FORMAT_SERIES!r}: the sending site runs an incompatible version"
            )
        study = _text(document, "study_instance_uid")
        if version == FORMAT:
            body_part = document.get("body_part", "")
            if not isinstance(body_part, str):
                raise PackageError(f"the package's {MANIFEST_NAME} gives no text 'body_part'")
            series = [
                PackageSeries(
                    _text(document, "series_instance_uid"),
                    _text(document, "modality", allow_empty=True),
                    body_part,
                )
            ]
        else:
            series = _series_list(document)
        items = document.get("instances")
        if not isinstance(items, list):
            raise PackageError(f"the package's {MANIFEST_NAME} has no list 'instances'")
        entries = []
        for item in items:
            if not isinstance(item, dict):
                raise PackageError(f"an entry of {MANIFEST_NAME} 'instances' is not an object")
            size = item.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise PackageError(f"{MANIFEST_NAME} gives no valid size for {item.get('name')!r}")
            digest = _text(item, "sha256")
            if not _SHA256.fullmatch(digest):
                raise PackageError(
                    f"{MANIFEST_NAME} gives no valid SHA-256 for {item.get('name')!r}"
                )
            if version == FORMAT:
                in_series = series[0].series_instance_uid
            else:
                in_series = _text(item, "series_instance_uid")
            entries.append(
                PackageEntry(
                    _text(item, "name"), _text(item, "sop_instance_uid"), size, digest, in_series
                )
            )
        listed = {s.series_instance_uid for s in series}
        used = {entry.series_instance_uid for entry in entries}
        if unknown := sorted(used - listed):
            raise PackageError(
                f"{MANIFEST_NAME} lists instances of series it does not list: {unknown[:3]}"
            )
        if version == FORMAT_SERIES and (empty := sorted(listed - used)):
            raise PackageError(f"{MANIFEST_NAME} lists series without instances: {empty[:3]}")
        first, *more = series
        manifest = cls(
            study,
            first.series_instance_uid,
            first.modality,
            tuple(entries),
            first.body_part,
            tuple(more),
        )
        if document.get("instance_count") != manifest.instance_count:
            raise PackageError(
                f"{MANIFEST_NAME} declares {document.get('instance_count')} instances but lists "
                f"{manifest.instance_count}"
            )
        if document.get("total_bytes") != manifest.total_bytes:
            raise PackageError(
                f"{MANIFEST_NAME} declares {document.get('total_bytes')} bytes but its "
                f"instances add up to {manifest.total_bytes}"
            )
        return manifest


def _series_list(document: dict[str, Any]) -> list[PackageSeries]:
    """The ``series`` of a ``/2`` manifest: at least one, each UID once."""
    items = document.get("series")
    if not isinstance(items, list) or not items:
        raise PackageError(f"the package's {MANIFEST_NAME} has no list 'series'")
    series: list[PackageSeries] = []
    for item in items:
        if not isinstance(item, dict):
            raise PackageError(f"an entry of {MANIFEST_NAME} 'series' is not an object")
        body_part = item.get("body_part", "")
        if not isinstance(body_part, str):
            raise PackageError(f"{MANIFEST_NAME} gives a series no text 'body_part'")
        series.append(
            PackageSeries(
                _text(item, "series_instance_uid"),
                _text(item, "modality", allow_empty=True),
                body_part,
            )
        )
    uids = [s.series_instance_uid for s in series]
    if len(set(uids)) != len(uids):
        raise PackageError(f"{MANIFEST_NAME} lists one series twice")
    return series


def _text(item: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (not value and not allow_empty):
        raise PackageError(f"{MANIFEST_NAME} has no valid {key!r}")
    return value


class _Hashing(io.RawIOBase):
    """A write-through stream that counts and hashes what passes."""

    def __init__(self, target: IO[bytes]) -> None:
        self._target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:  # pydicom measures what it wrote; it never seeks back
        return self.size

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += len(view)
        self._target.write(view)
        return len(view)


class PackageWriter:
    """Writes one series, or up to ``max_series`` series of one study, into ``target`` (a
    binary file open for writing).

    Use as a context manager; :meth:`close` (called on a clean exit) writes the manifest and
    returns it. Every instance must belong to the first instance's study, and to one of at
    most ``max_series`` series."""

    def __init__(self, target: BinaryIO, *, max_series: int = 1) -> None:
        self._zip = zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._max_series = max_series
        self._entries: list[PackageEntry] = []
        self._study: str | None = None
        self._series: dict[str, PackageSeries] = {}
        self._manifest: PackageManifest | None = None

    def __enter__(self) -> PackageWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._zip.close()

    def add(self, dataset: Dataset) -> None:
        """Write ``dataset`` as the next DICOM Part 10 file, hashing it while it is written."""
        if self._manifest is not None:
            raise ValueError("the package is closed")
        study = str(dataset.get("StudyInstanceUID", ""))
        series = str(dataset.get("SeriesInstanceUID", ""))
        sop = str(dataset.get("SOPInstanceUID", ""))
        if not (study and series and sop):
            raise PackageError(
                "an instance without Study, Series or SOP Instance UID cannot be packaged"
            )
        if self._study is None:
            self._study = study
        elif study != self._study:
            raise PackageError("a package holds one study; an instance of another was added")
        if series not in self._series:
            if len(self._series) == self._max_series:
                held = "one series" if self._max_series == 1 else f"{self._max_series} series"
                raise PackageError(
                    f"a package holds {held}; an instance of another series or study was added"
                )
            self._series[series] = PackageSeries(
                series,
                str(dataset.get("Modality", "")),
                str(dataset.get("BodyPartExamined", "") or ""),
            )
        name = f"instances/{len(self._entries) + 1:05d}.dcm"
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        with self._zip.open(info, "w", force_zip64=True) as entry:
            hashing = _Hashing(entry)
            pydicom.dcmwrite(hashing, dataset, enforce_file_format=True)
        self._entries.append(
            PackageEntry(name, sop, hashing.size, hashing.digest.hexdigest(), series)
        )

    def close(self) -> PackageManifest:
        """Write ``manifest.json`` and finish the ZIP; the manifest (idempotent)."""
        if self._manifest is not None:
            return self._manifest
        if self._study is None:
            self._zip.close()
            raise PackageError("an empty package: no instance was added")
        first, *more = self._series.values()
        manifest = PackageManifest(
            self._study,
            first.series_instance_uid,
            first.modality,
            tuple(self._entries),
            first.body_part,
            tuple(more),
        )
        info = zipfile.ZipInfo(MANIFEST_NAME, date_time=(1980, 1, 1, 0, 0, 0))
        self._zip.writestr(info, manifest.to_json())
        self._zip.close()
        self._manifest = manifest
        return manifest


class PackageReader:
    """Reads a package written by :class:`PackageWriter`, checking everything first.

    ``max_instances`` and ``max_bytes`` (the sum of the instance files) bound what the sending
    site can make this site store and parse; ``max_series`` how many series it may hold (a
    study package one, a result package its SEG and SR). Opening checks the manifest against
    the ZIP; :meth:`instances` then yields one verified dataset at a time."""

    def __init__(
        self, path: Path, *, max_instances: int, max_bytes: int, max_series: int = 1
    ) -> None:
        self._max_instances = max_instances
        self._max_bytes = max_bytes
        self._max_series = max_series
        # The instances and the manifest, with slack: the manifest's own check says more
        # precisely what is over; this one only keeps a directory from exhausting memory.
        _check_directory(path, 2 * (max_instances + 1) + 16)
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
            raise PackageError(f"the package is not a readable ZIP file: {exc}") from exc
        try:
            self.manifest = self._check()
        except BaseException:
            self._zip.close()
            raise

    def __enter__(self) -> PackageReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def _check(self) -> PackageManifest:
        infos = self._zip.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise PackageError("the package names one file twice")
        by_name = {info.filename: info for info in infos}
        for info in infos:
            if info.filename != MANIFEST_NAME and not _INSTANCE_NAME.fullmatch(info.filename):
                raise PackageError(
                    f"the package holds an unexpected file {info.filename!r}: only "
                    f"{MANIFEST_NAME} and instances/NNNNN.dcm belong in it"
                )
            if info.flag_bits & 0x1:
                raise PackageError(f"the package's file {info.filename} is ZIP-encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise PackageError(
                    f"the package's file {info.filename} uses an unsupported ZIP compression"
                )
        manifest_info = by_name.get(MANIFEST_NAME)
        if manifest_info is None:
            raise PackageError(f"the package has no {MANIFEST_NAME}")
        if manifest_info.file_size > _MAX_MANIFEST_BYTES:
            raise PackageError(
                f"the package's {MANIFEST_NAME} declares {manifest_info.file_size} bytes, more "
                f"than the {_MAX_MANIFEST_BYTES} a manifest may have"
            )
        manifest = PackageManifest.from_json(self._read_bounded(manifest_info, _MAX_MANIFEST_BYTES))
        if len(manifest.series) > self._max_series:
            raise PackageError(
                f"the package holds {len(manifest.series)} series, more than the "
                f"{self._max_series} a package of this kind may hold (a study package holds one)"
            )
        if manifest.instance_count > self._max_instances:
            raise PackageError(
                f"the package holds {manifest.instance_count} instances, more than the limit "
                f"of {self._max_instances}"
            )
        if manifest.total_bytes > self._max_bytes:
            raise PackageError(
                f"the package's instances have {manifest.total_bytes} bytes, more than the "
                f"limit of {self._max_bytes}"
            )
        listed = [entry.name for entry in manifest.entries]
        if len(set(listed)) != len(listed):
            raise PackageError(f"{MANIFEST_NAME} lists one file twice")
        files = set(by_name) - {MANIFEST_NAME}
        if missing := sorted(set(listed) - files):
            raise PackageError(f"the package lacks files its manifest lists: {missing[:5]}")
        if unlisted := sorted(files - set(listed)):
            raise PackageError(
                f"the package holds files its manifest does not list: {unlisted[:5]}"
            )
        for entry in manifest.entries:
            declared = by_name[entry.name].file_size
            if declared != entry.size:
                raise PackageError(
                    f"the ZIP declares {declared} bytes for {entry.name}, the manifest {entry.size}"
                )
        return manifest

    def _read_bounded(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        """The entry's bytes, refusing more than ``limit`` whatever its header claims."""
        buffer = bytearray()
        try:
            with self._zip.open(info) as stream:
                while chunk := stream.read(min(_READ_CHUNK, limit + 1 - len(buffer))):
                    buffer += chunk
                    if len(buffer) > limit:
                        raise PackageError(
                            f"the package's file {info.filename} holds more than the "
                            f"{limit} bytes declared"
                        )
        except (zipfile.BadZipFile, EOFError, OSError) as exc:  # CRC, sizes, truncation, inflate
            raise PackageError(f"the package's file {info.filename} is damaged: {exc}") from exc
        return bytes(buffer)

    def instances(self) -> Iterator[Dataset]:
        """Each instance in manifest order, after its size and SHA-256 were verified and its
        UIDs checked against the manifest."""
        manifest = self.manifest
        for entry in manifest.entries:
            data = self._read_bounded(self._zip.getinfo(entry.name), entry.size)
            if len(data) != entry.size:
                raise PackageError(
                    f"{entry.name} has {len(data)} bytes, the manifest says {entry.size}"
                )
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise PackageError(
                    f"{entry.name} does not match its SHA-256 in the manifest: the package was "
                    "altered or damaged"
                )
            try:
                dataset = pydicom.dcmread(io.BytesIO(data))
            except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
                raise PackageError(f"{entry.name} is not a DICOM Part 10 file: {exc}") from exc
            del data
            checks = (
                ("SOPInstanceUID", entry.sop_instance_uid),
                ("StudyInstanceUID", manifest.study_instance_uid),
                ("SeriesInstanceUID", entry.series_instance_uid),
            )
            for keyword, expected in checks:
                if str(dataset.get(keyword, "")) != expected:
                    raise PackageError(f"{entry.name}: its {keyword} differs from the manifest's")
            yield dataset


def _check_directory(path: Path, max_entries: int) -> None:
    """Refuse a ZIP whose end record declares more than ``max_entries`` entries or a central
    directory larger than they need, read from the end records alone (as ``zipfile`` reads
    them: the ZIP64 record wins where its locator is present). ``zipfile`` parses the whole
    directory when it opens a file, whatever the manifest later says."""
    with path.open("rb") as file:
        size = file.seek(0, io.SEEK_END)
        tail_size = min(size, _END_RECORD_BYTES + 0xFFFF + _ZIP64_LOCATOR_BYTES)
        file.seek(size - tail_size)
        tail = file.read(tail_size)
        at = tail.rfind(_END_RECORD)
        if at < 0 or len(tail) - at < _END_RECORD_BYTES:
            raise PackageError("the package is not a readable ZIP file: it has no end record")
        entries, directory_bytes = struct.unpack("<HI", tail[at + 10 : at + 16])
        locator = at - _ZIP64_LOCATOR_BYTES
        if locator >= 0 and tail[locator : locator + 4] == _ZIP64_LOCATOR:
            (offset,) = struct.unpack("<Q", tail[locator + 8 : locator + 16])
            file.seek(offset)
            record = file.read(56)
            if len(record) < 56 or record[:4] != _ZIP64_END_RECORD:
                raise PackageError("the package is not a readable ZIP file: bad ZIP64 end record")
            entries, directory_bytes = struct.unpack("<QQ", record[32:48])
    if entries > max_entries:
        raise PackageError(
            f"the package's ZIP directory declares {entries} entries, far more than a package "
            "within the limits has ([omi] max_package_instances)"
        )
    if directory_bytes > max_entries * _CENTRAL_ENTRY_BYTES:
        raise PackageError(
            f"the package's ZIP directory has {directory_bytes} bytes, far more than a "
            "package within the limits needs ([omi] max_package_instances)"
        )
