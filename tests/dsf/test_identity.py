"""Loading and checking the client identity: PEM, encrypted PEM, PKCS#12, thumbprint, refusals."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from dsf_bridge.dsf.identity import (
    IdentityError,
    build_ssl_context,
    describe_certificate,
    load_identity,
    thumbprint,
)
from dsf_bridge.errors import BridgeError
from dsf_bridge.sandbox.certs import CertificateAuthority


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority("identity test CA")


def _write(
    tmp_path: Path, ca: CertificateAuthority, password: str | None = None
) -> tuple[Path, Path]:
    issued = ca.issue_client("Test Client")
    certificate, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    issued.write(certificate, key, password)
    return certificate, key


def test_thumbprint_is_sha512_over_der_in_lower_case_hex(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("Test Client")
    der = issued.certificate.public_bytes(serialization.Encoding.DER)
    value = thumbprint(issued.certificate)
    assert value == hashlib.sha512(der).hexdigest()
    assert len(value) == 128
    assert value == value.lower()


def test_loads_pem_and_describes_certificate(tmp_path: Path, ca: CertificateAuthority) -> None:
    certificate, key = _write(tmp_path, ca)
    identity = load_identity(certificate, key)
    described = identity.describe()
    assert described["thumbprint"] == identity.thumbprint
    assert described["subject"] == "CN=Test Client"
    assert described["issuer"] == "CN=identity test CA"
    assert dt.datetime.fromisoformat(described["not_after"]) > dt.datetime.now(dt.UTC)
    assert describe_certificate(identity.certificate) == described


def test_loads_encrypted_pem_with_password(tmp_path: Path, ca: CertificateAuthority) -> None:
    certificate, key = _write(tmp_path, ca, password="s3cret")
    identity = load_identity(certificate, key, password="s3cret")
    context = build_ssl_context(identity, [_ca_file(tmp_path, ca)], password="s3cret")
    assert isinstance(context, ssl.SSLContext)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_encrypted_pem_without_password_names_file_and_setting(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    certificate, key = _write(tmp_path, ca, password="s3cret")
    with pytest.raises(IdentityError, match="client_key_password") as caught:
        load_identity(certificate, key)
    assert str(key) in str(caught.value)
    assert caught.value.retryable is False
    assert isinstance(caught.value, BridgeError)


def test_wrong_password_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    certificate, key = _write(tmp_path, ca, password="s3cret")
    with pytest.raises(IdentityError, match="wrong password"):
        load_identity(certificate, key, password="other")


def test_loads_pkcs12_and_leaves_no_key_file(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = ca.issue_client("P12 Client")
    bundle = tmp_path / "client.p12"
    bundle.write_bytes(issued.pkcs12("pw"))
    identity = load_identity(bundle, password="pw")
    assert identity.thumbprint == thumbprint(issued.certificate)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    seen: list[tuple[bytes, int]] = []
    real_unlink = os.unlink

    def inspecting_unlink(path: Any) -> None:
        seen.append((Path(path).read_bytes(), os.stat(path).st_mode & 0o777))
        real_unlink(path)

    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.setattr(os, "unlink", inspecting_unlink)
    context = build_ssl_context(identity, [_ca_file(tmp_path, ca)], password="pw")
    assert context.verify_mode == ssl.CERT_REQUIRED
    # One one-time file, readable by the owner only, holding the key encrypted; gone again.
    assert len(seen) == 1
    content, mode = seen[0]
    assert mode == 0o600
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in content
    assert b"-----BEGIN PRIVATE KEY-----" not in content
    assert list(private_tmp.iterdir()) == []


def test_pkcs12_wrong_password_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    bundle = tmp_path / "client.p12"
    bundle.write_bytes(ca.issue_client("P12 Client").pkcs12("pw"))
    with pytest.raises(IdentityError, match="PKCS#12"):
        load_identity(bundle, password="nope")


def test_key_of_another_certificate_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    certificate, _ = _write(tmp_path, ca)
    other_key = tmp_path / "other-key.pem"
    other_key.write_bytes(ca.issue_client("Other").key_pem())
    with pytest.raises(IdentityError, match="does not belong to the certificate"):
        load_identity(certificate, other_key)


def test_expired_certificate_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    certificate, key = tmp_path / "c.pem", tmp_path / "k.pem"
    ca.issue_expired_client("Old").write(certificate, key)
    with pytest.raises(IdentityError, match="expired on"):
        load_identity(certificate, key)


def test_not_yet_valid_certificate_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    now = dt.datetime.now(dt.UTC)
    certificate, key = tmp_path / "c.pem", tmp_path / "k.pem"
    ca.issue_client(
        "Future", not_before=now + dt.timedelta(days=2), not_after=now + dt.timedelta(days=9)
    ).write(certificate, key)
    with pytest.raises(IdentityError, match="not valid before"):
        load_identity(certificate, key)


def test_server_only_certificate_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    certificate, key = tmp_path / "c.pem", tmp_path / "k.pem"
    ca.issue_client("Server Only", usages=[ExtendedKeyUsageOID.SERVER_AUTH]).write(certificate, key)
    with pytest.raises(IdentityError, match="clientAuth"):
        load_identity(certificate, key)


def test_missing_files_are_named(tmp_path: Path, ca: CertificateAuthority) -> None:
    with pytest.raises(IdentityError, match=r"missing\.pem does not exist"):
        load_identity(tmp_path / "missing.pem", tmp_path / "k.pem")
    certificate, key = _write(tmp_path, ca)
    identity = load_identity(certificate, key)
    with pytest.raises(IdentityError, match=r"nope\.pem does not exist"):
        build_ssl_context(identity, [tmp_path / "nope.pem"])
    with pytest.raises(IdentityError, match="no CA certificate files"):
        build_ssl_context(identity, [])


def _ca_file(tmp_path: Path, ca: CertificateAuthority) -> Path:
    path = tmp_path / "ca.pem"
    ca.write(path)
    return path
