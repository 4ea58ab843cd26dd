"""Certificate minting for the sandbox: a test CA, per organization a server certificate (SAN
localhost and 127.0.0.1) and a client certificate (extended key usage clientAuth), and the broken
certificates tests need (expired, from another CA, wrong host name, server-only).

Keys are EC P-256: fast to generate and accepted by every TLS stack we talk to.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "IssuedCertificate"]

_DEFAULT_VALIDITY = dt.timedelta(days=365)
# Back-dating covers clock skew between the minting and the verifying side.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate with its private key and the CA certificate that issued it."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    issuer: x509.Certificate

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, password: str | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password.encode())
            if password is not None
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def pkcs12(self, password: str | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password.encode())
            if password is not None
            else serialization.NoEncryption()
        )
        return pkcs12.serialize_key_and_certificates(
            b"client", self.key, self.certificate, None, encryption
        )

    def write(self, certificate_path: Path, key_path: Path, password: str | None = None) -> None:
        """Write certificate and key as PEM; the key file is created with mode 0600."""
        certificate_path.write_bytes(self.certificate_pem())
        key_path.touch(mode=0o600, exist_ok=True)
        key_path.chmod(0o600)
        key_path.write_bytes(self.key_pem(password))


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, name: str = "dsf-bridge sandbox CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> None:
        path.write_bytes(self.certificate_pem())

    def issue_server(
        self,
        common_name: str,
        *,
        hosts: Sequence[str] = ("localhost", "127.0.0.1"),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """A TLS server certificate; ``hosts`` become DNS or IP subject alternative names."""
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        return self._issue(
            common_name,
            usages=[ExtendedKeyUsageOID.SERVER_AUTH],
            alternative_names=names,
            not_before=not_before,
            not_after=not_after,
        )

    def issue_client(
        self,
        common_name: str,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        usages: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
        email: str | None = None,
    ) -> IssuedCertificate:
        """A TLS client certificate (clientAuth); pass other ``usages`` to mint a wrong one.

        ``email`` makes a personal certificate, as DSF's test practitioners have: the address in
        the subject (``emailAddress``) and as rfc822Name subject alternative name, where the
        DSF FHIR server finds a practitioner's identifier."""
        return self._issue(
            common_name,
            usages=list(usages),
            alternative_names=[x509.RFC822Name(email)] if email else [],
            not_before=not_before,
            not_after=not_after,
            email=email,
        )

    def issue_expired_client(self, common_name: str) -> IssuedCertificate:
        """A client certificate whose validity ended yesterday."""
        now = dt.datetime.now(dt.UTC)
        return self.issue_client(
            common_name,
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        )

    def _issue(
        self,
        common_name: str,
        *,
        usages: list[x509.ObjectIdentifier],
        alternative_names: list[x509.GeneralName],
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
        email: str | None = None,
    ) -> IssuedCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if email:
            subject.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - _BACKDATE)
            .not_valid_after(not_after or now + _DEFAULT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if alternative_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(alternative_names), critical=False
            )
        certificate = builder.sign(self.key, hashes.SHA256())
        return IssuedCertificate(certificate=certificate, key=key, issuer=self.certificate)
