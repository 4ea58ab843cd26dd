"""Pseudonymized copies of DICOM instances at the requesting site (issue 13, first step).

What it owns: the DICOM PS3.15 Basic Application Level Confidentiality Profile with the options
Retain Safe Private, Retain Device Identity, Clean Descriptors and Retain Longitudinal Temporal
Information (modified dates, or full dates when a site keeps them), applied to one instance at a
time; the refusal of instances that may show identity in their pixels; and re-identification of
UIDs that come back. The SQL mapping of original and replaced UIDs lives in the store
(``store/repository.py``); this module only hands the pairs over.

The profile's action per attribute (D, Z, X, U and the combined codes of Table E.1-1) comes from
the data of the ``dicom-anonymizer`` package (its ``dicomfields_2026c`` table, generated from
the standard's 2026c edition). The option columns are not in that data: the short lists below
(:data:`DEVICE_IDENTITY`, :data:`DESCRIPTORS`) are ours, taken from the option columns of
Table E.1-1, and ``docs/privacy.md`` names them.

UIDs are replaced by a keyed hash (HMAC-SHA-256 with the site's secret) under the ``2.25`` root:
the same original gives the same replacement at one site, across instances, series and runs,
with no lookup; without the secret the replacement says nothing about the original. Dates move
by a per-study offset derived the same way (whole days into the past), so intervals inside a
study are kept and two studies do not share an offset.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as profile
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag

from dsf_bridge.config import PseudonymizationSettings
from dsf_bridge.errors import BridgeError, ConfigError

__all__ = [
    "DESCRIPTORS",
    "DEVICE_IDENTITY",
    "PseudonymizationPolicy",
    "PseudonymizationRefusedError",
    "PseudonymizedInstance",
    "Pseudonymizer",
    "policy_from_settings",
    "reidentify",
    "replace_uid",
]

# Retain Device Identity Option: K in its column of Table E.1-1. Device UID is not among them:
# it is replaced like every other UID (consistently, so one device stays one device).
DEVICE_IDENTITY = frozenset(
    Tag(keyword)
    for keyword in (
        "CassetteID",
        "DetectorID",
        "DeviceDescription",
        "DeviceLabel",
        "DeviceSerialNumber",
        "GantryID",
        "GeneratorID",
        "PerformedStationName",
        "PlateID",
        "ScheduledStationName",
        "StationName",
    )
)

# Clean Descriptors Option: C in its column of Table E.1-1, for the descriptions a model or its
# contract may read. Any other descriptor keeps the basic profile's action.
DESCRIPTORS = frozenset(
    Tag(keyword)
    for keyword in (
        "AcquisitionComments",
        "DerivationDescription",
        "ImageComments",
        "PerformedProcedureStepDescription",
        "ProtocolName",
        "RequestedProcedureDescription",
        "ScheduledProcedureStepDescription",
        "SeriesDescription",
        "StudyDescription",
    )
)

# UIDs of the standard itself (SOP classes, transfer syntaxes, coding schemes) identify nobody.
_STANDARD_UID_ROOT = "1.2.840.10008."
# Values a cleaned descriptor must not contain besides the instance's own identifiers: digit
# runs that look like a date, an ID or a phone number.
_LONG_DIGITS = re.compile(r"\d{6,}")
# A written date ("05.01.2020", "2020-01-05", "5/1/20"): in a descriptor it would give away the
# study's real date next to its shifted one.
_WRITTEN_DATE = re.compile(r"\d{1,4}[./-]\d{1,2}[./-]\d{2,4}")
_DATE_VRS = frozenset({"DA", "DT"})
_MAX_SHIFT_DAYS = 3650
_PATIENT_GROUP = 0x0010
# File meta attributes a copy keeps (its UIDs replaced like any UID); every other one (AE
# titles, presentation addresses, Private Information and its creator) is removed.
_FILE_META_KEPT = frozenset(
    Tag(keyword)
    for keyword in (
        "FileMetaInformationVersion",
        "MediaStorageSOPClassUID",
        "MediaStorageSOPInstanceUID",
        "TransferSyntaxUID",
        "ImplementationClassUID",
        "ImplementationVersionName",
    )
)
# Identifying attributes the library's table lacks: the patient's birth and death dates in an
# alternative calendar (free text, group 0010) are removed like the Gregorian ones.
_EXTRA_ACTIONS: dict[BaseTag, str] = {
    Tag(0x0010, 0x0033): "X",
    Tag(0x0010, 0x0034): "X",
}


def _actions() -> tuple[dict[BaseTag, str], tuple[tuple[int, int, int, int, str], ...]]:
    """Table E.1-1 as {tag: action code} plus the masked rows (repeating groups such as overlay
    data 60xx,3000) as (group, element, group mask, element mask, action); the combined codes
    resolved to the one we take.

    X/Z, Z/D and X/Z/D become Z (an empty value keeps a type 2 attribute valid), X/D becomes D
    (the attribute may be type 1), X/Z/U* becomes U for UIDs and for sequences (a reference
    sequence is kept, every UID in it replaced) and Z otherwise ("ZU").
    """
    table: dict[BaseTag, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for name, action in (
        ("X_TAGS", "X"),
        ("Z_TAGS", "Z"),
        ("D_TAGS", "D"),
        ("U_TAGS", "U"),
        ("X_Z_TAGS", "Z"),
        ("Z_D_TAGS", "Z"),
        ("X_Z_D_TAGS", "Z"),
        ("X_D_TAGS", "D"),
        ("X_Z_U_STAR_TAGS", "ZU"),
    ):
        for row in getattr(profile, name):
            if len(row) == 2:
                table[Tag(row[0], row[1])] = action
            else:
                group, element, group_mask, element_mask = row
                masked.append((group, element, group_mask, element_mask, action))
    return table, tuple(masked)


_PROFILE, _PROFILE_MASKED = _actions()


def _profile_action(tag: BaseTag) -> str | None:
    action = _PROFILE.get(tag) or _EXTRA_ACTIONS.get(tag)
    if action is not None:
        return action
    for group, element, group_mask, element_mask, masked in _PROFILE_MASKED:
        if tag.group & group_mask == group and tag.element & element_mask == element:
            return masked
    return None


_DUMMY_TEXT = "ANONYMIZED"
# A dummy of a binary attribute (a certificate, an encapsulated document) is an empty value.
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_DUMMY_BY_VR: dict[str, Any] = {
    "PN": "ANONYMIZED",
    "AE": "ANONYMIZED",
    "CS": "ANONYMIZED",
    "DS": "0",
    "IS": "0",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "UL": 0,
    "US": 0,
    "SV": 0,
    "UV": 0,
    "AS": "000Y",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
}


class PseudonymizationRefusedError(BridgeError):
    """An instance cannot be made pseudonymous by attribute rules alone (burned-in text in its
    pixels, or a modality the site refuses); nothing of it may leave the site."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@dataclass(frozen=True)
class PseudonymizationPolicy:
    """What a site decided: its secret, dates shifted or kept, the modalities it refuses, and the
    private attributes (private creator, element byte) it knows to be safe."""

    secret: bytes
    dates: Literal["shift", "keep"]
    refused_modalities: frozenset[str]
    safe_private: frozenset[tuple[str, int]] = frozenset()

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("the pseudonymization secret must be at least 16 bytes")


@dataclass
class PseudonymizedInstance:
    """One pseudonymized copy and the UIDs it replaced (original -> replacement)."""

    dataset: Dataset
    original_study_uid: str
    uids: dict[str, str] = field(default_factory=dict)


def policy_from_settings(settings: PseudonymizationSettings) -> PseudonymizationPolicy:
    """The policy of ``[pseudonymization]``; a site without a secret cannot pseudonymize."""
    if settings.secret is None:
        raise ConfigError(
            "pseudonymization needs a secret: set pseudonymization.secret (at least 32 "
            "characters), better from a file with DSF_BRIDGE_PSEUDONYMIZATION__SECRET_FILE",
            field="pseudonymization.secret",
        )
    return PseudonymizationPolicy(
        secret=settings.secret.get_secret_value().encode("utf-8"),
        dates=settings.dates,
        refused_modalities=frozenset(settings.refused_modalities),
        safe_private=settings.safe_private_attributes(),
    )


def replace_uid(secret: bytes, uid: str) -> str:
    """The site's replacement of ``uid``: ``2.25.`` and the decimal of 128 bits of
    HMAC-SHA-256(secret, uid); a valid UID of at most 44 characters."""
    digest = hmac.new(secret, b"uid:" + uid.encode("utf-8"), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _study_offset(secret: bytes, study_uid: str) -> dt.timedelta:
    digest = hmac.new(secret, b"date-shift:" + study_uid.encode("utf-8"), hashlib.sha256).digest()
    # 1..MAX days into the past: never zero, so a shifted date is never the original.
    return -dt.timedelta(days=1 + int.from_bytes(digest[:4], "big") % _MAX_SHIFT_DAYS)


def _shift_date(value: str, offset: dt.timedelta) -> str:
    text = value.strip()
    try:
        day = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        # A partial date (year or year-month), a range or an old "1993.04.14" cannot be
        # shifted by days: it is dropped rather than sent as it is.
        return ""
    if len(text) != 8 or not text.isdigit():
        return ""
    try:
        return (day + offset).strftime("%Y%m%d")
    except OverflowError:  # a date in the first years of the calendar: nothing to move it to
        return ""


def _shift_datetime(value: str, offset: dt.timedelta) -> str:
    text = value.strip()
    day = _shift_date(text[:8], offset)
    return day + text[8:] if day else ""


class Pseudonymizer:
    """Applies one site's policy to instances, one at a time (never a whole study in memory)."""

    def __init__(self, policy: PseudonymizationPolicy) -> None:
        self._policy = policy

    def pseudonymize(self, instance: Dataset) -> PseudonymizedInstance:
        """A pseudonymized copy of ``instance``; the original is left untouched.

        Raises :class:`PseudonymizationRefusedError` for burned-in annotation or a refused
        modality, before anything is copied.
        """
        self._check_refused(instance)
        study_uid = str(instance.get("StudyInstanceUID", ""))
        if not study_uid:
            raise PseudonymizationRefusedError("the instance has no StudyInstanceUID")
        offset = _study_offset(self._policy.secret, study_uid)
        identifiers = _identifiers(instance)
        dataset = copy.deepcopy(instance)
        uids: dict[str, str] = {}
        self._clean(dataset, offset, identifiers, uids)
        if hasattr(dataset, "file_meta"):
            meta = dataset.file_meta
            for tag in [e.tag for e in meta if e.tag not in _FILE_META_KEPT]:
                del meta[tag]
            self._clean(dataset.file_meta, offset, identifiers, uids)
        self._mark(dataset)
        return PseudonymizedInstance(dataset=dataset, original_study_uid=study_uid, uids=uids)

    def pseudonymize_all(self, instances: Iterable[Dataset]) -> Iterator[PseudonymizedInstance]:
        """Each instance of ``instances`` pseudonymized in turn, lazily."""
        for instance in instances:
            yield self.pseudonymize(instance)

    def _check_refused(self, instance: Dataset) -> None:
        burned_in = str(instance.get("BurnedInAnnotation", "")).strip().upper()
        modality = str(instance.get("Modality", "")).strip().upper()
        if burned_in == "YES":
            raise PseudonymizationRefusedError(
                "an instance is flagged BurnedInAnnotation=YES: its pixels may show the "
                "patient's identity, which attribute rules cannot remove; no copy is made"
            )
        if modality in self._policy.refused_modalities:
            raise PseudonymizationRefusedError(
                f"modality {modality} often carries burned-in text and this site refuses it "
                "(pseudonymization.refused_modalities); remove it from that list to allow it"
            )

    def _clean(
        self,
        dataset: Dataset,
        offset: dt.timedelta,
        identifiers: tuple[str, ...],
        uids: dict[str, str],
    ) -> None:
        private_creators = _private_creators(dataset)
        for element in list(dataset):
            tag = element.tag
            if tag.is_private:
                if not self._safe_private(tag, private_creators):
                    del dataset[tag]
                    continue
                # A safe private attribute can still hold UIDs or sequences: clean inside.
                self._values(element, offset, identifiers, uids)
                continue
            action = _profile_action(tag)
            if action is None and element.VR == "PN":
                action = "Z"  # a person's name the table does not list is a name all the same
            elif action is None and element.VR == "UR":
                # A URL the table does not list (Retrieve URL, Retrieve URI, Pixel Data Provider
                # URL...) names the site's systems and carries original UIDs in its path.
                action = "X"
            if tag in DEVICE_IDENTITY:
                action = "K"
            elif tag in DESCRIPTORS:
                action = "C"
            if action == "X":
                del dataset[tag]
            elif action == "C":
                if _carries_identity(element.value, identifiers):
                    element.value = None if element.VR != "SQ" else Sequence()
            elif (
                action in ("Z", "D")
                and element.VR in _DATE_VRS | {"TM"}
                and tag.group != _PATIENT_GROUP
            ):
                # Retain Longitudinal Temporal Information: the dates of the study and its
                # procedures are shifted (or kept); the patient's own (birth) dates are not.
                self._values(element, offset, identifiers, uids)
            elif action == "Z" or (action == "ZU" and element.VR not in ("UI", "SQ")):
                element.value = Sequence() if element.VR == "SQ" else None
            elif action == "D" and element.VR == "SQ":
                # A dummy item would invent content; an empty sequence is the safe dummy.
                element.value = Sequence()
            elif action == "D" and element.VR in _BINARY_VRS:
                element.value = b""
            elif action == "D" and element.VR != "UI":
                element.value = _DUMMY_BY_VR.get(element.VR, _DUMMY_TEXT)
            else:
                self._values(element, offset, identifiers, uids)

    def _values(
        self,
        element: DataElement,
        offset: dt.timedelta,
        identifiers: tuple[str, ...],
        uids: dict[str, str],
    ) -> None:
        """The value rules every kept attribute follows: UIDs replaced, dates shifted, items
        of sequences cleaned by the profile in turn."""
        if element.VR == "SQ":
            for item in element.value:
                self._clean(item, offset, identifiers, uids)
        elif element.VR == "UI" and element.value:
            element.value = _map_values(element.value, lambda uid: self._uid(uid, uids))
        elif element.VR in _DATE_VRS and element.value and self._policy.dates == "shift":
            shift = _shift_date if element.VR == "DA" else _shift_datetime
            element.value = _map_values(element.value, lambda text: shift(text, offset))

    def _uid(self, uid: str, uids: dict[str, str]) -> str:
        uid = uid.strip().rstrip("\x00")
        if not uid or uid.startswith(_STANDARD_UID_ROOT):
            return uid
        replaced = uids.get(uid)
        if replaced is None:
            replaced = uids[uid] = replace_uid(self._policy.secret, uid)
        return replaced

    def _safe_private(self, tag: BaseTag, creators: Mapping[int, str]) -> bool:
        safe = self._policy.safe_private
        if tag.element < 0x0010:
            return False  # group length: rebuilt on write if anything
        if tag.element <= 0x00FF:
            # A private creator: kept while one of its block's attributes may be kept.
            return any(creator == creators.get(tag) for creator, _ in safe)
        creator = creators.get((tag.group << 16) | (tag.element >> 8))
        return creator is not None and (creator, tag.element & 0xFF) in safe

    def _mark(self, dataset: Dataset) -> None:
        dataset.PatientIdentityRemoved = "YES"
        dataset.LongitudinalTemporalInformationModified = (
            "MODIFIED" if self._policy.dates == "shift" else "UNMODIFIED"
        )
        dates = (
            codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption
            if self._policy.dates == "shift"
            else codes.DCM.RetainLongitudinalTemporalInformationFullDatesOption
        )
        methods = [
            codes.DCM.BasicApplicationConfidentialityProfile,
            codes.DCM.RetainSafePrivateOption,
            codes.DCM.RetainDeviceIdentityOption,
            codes.DCM.CleanDescriptorsOption,
            dates,
        ]
        sequence = Sequence()
        for code in methods:
            item = Dataset()
            item.CodeValue = code.value
            item.CodingSchemeDesignator = code.scheme_designator
            item.CodeMeaning = code.meaning
            sequence.append(item)
        dataset.DeidentificationMethodCodeSequence = sequence
        dataset.DeidentificationMethod = "dsf-bridge: PS3.15 Basic Profile with options"


def reidentify(dataset: Dataset, originals: Mapping[str, str]) -> Dataset:
    """A copy of ``dataset`` with every UID found in ``originals`` (replacement -> original)
    mapped back, in sequences too: for results that come back referencing the pseudonymized
    study. UIDs the mapping does not know (the result's own) stay as they are."""
    copied = copy.deepcopy(dataset)

    def back(value: str) -> str:
        return originals.get(value.strip().rstrip("\x00"), value)

    def walk(target: Dataset) -> None:
        for element in target:
            if element.VR == "SQ":
                for item in element.value:
                    walk(item)
            elif element.VR == "UI" and element.value:
                element.value = _map_values(element.value, back)

    walk(copied)
    if hasattr(copied, "file_meta"):
        walk(copied.file_meta)
    return copied


def _map_values(value: Any, change: Any) -> Any:
    if isinstance(value, str):
        return change(value)
    return [change(str(item)) for item in value]


def _private_creators(dataset: Dataset) -> dict[int, str]:
    """Private creator of each block, keyed ``group << 16 | block``."""
    creators: dict[int, str] = {}
    for element in dataset:
        tag = element.tag
        if tag.is_private and 0x0010 <= tag.element <= 0x00FF and element.value:
            creators[(tag.group << 16) | tag.element] = str(element.value).strip()
    return creators


def _identifiers(instance: Dataset) -> tuple[str, ...]:
    """The instance's identifying strings a cleaned descriptor must not contain."""
    found: set[str] = set()
    for keyword in (
        "PatientName",
        "PatientID",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "AccessionNumber",
        "StudyID",
        "InstitutionName",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "PatientBirthDate",
        "StudyDate",
    ):
        value = instance.get(keyword)
        if value is None or value == "":
            continue
        values = list(value) if isinstance(value, MultiValue | list) else [value]
        for item in values:
            for part in re.split(r"[\^=\s,]+", str(item)):
                if len(part) >= 2:  # two-letter names ("Li", "Ng") as whole words
                    found.add(part.lower())
    return tuple(sorted(found))


def _carries_identity(value: Any, identifiers: tuple[str, ...]) -> bool:
    if value is None:
        return False
    text = str(value).lower()
    if _LONG_DIGITS.search(text) or _WRITTEN_DATE.search(text):
        return True
    return any(
        part in text if len(part) >= 3 else re.search(rf"\b{re.escape(part)}\b", text)
        for part in identifiers
    )
