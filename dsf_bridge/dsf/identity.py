"""The site's DSF identity: its client certificate and key, their checks, the DSF thumbprint, and
the one TLS context every DSF connection (REST and websocket, local and remote) uses.

DSF knows an organization by the SHA-512 thumbprint of its client certificate (128 lower-case hex
characters over the DER encoding), stored in the extension
``http://dsf.dev/fhir/StructureDefinition/extension-certificate-thumbprint`` of its Organization.
The bridge refuses to start with a certificate that is expired or not yet valid, is not a TLS
client certificate, or whose key does not match: such a bridge could never be authenticated, and
failing at start-up with the file name beats failing on the first Task.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from dsf_bridge.errors import BridgeError

__all__ = [
    "ClientIdentity",
    "IdentityError",
    "build_ssl_context",
    "describe_certificate",
    "load_identity",
    "thumbprint",
]

_PKCS12_SUFFIXES = (".p12", ".pfx")

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


class IdentityError(BridgeError):
    """The client certificate, its key or the trusted CAs cannot be used; never retryable."""

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(message, retryable=False)
        self.path = path


def thumbprint(certificate: x509.Certificate) -> str:
    """The DSF thumbprint: SHA-512 over the DER encoding, 128 lower-case hex characters."""
    return certificate.fingerprint(hashes.SHA512()).hex()


def describe_certificate(certificate: x509.Certificate) -> dict[str, str]:
    """What start-up prints about a certificate; no key material."""
    return {
        "thumbprint": thumbprint(certificate),
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "not_before": certificate.not_valid_before_utc.isoformat(),
        "not_after": certificate.not_valid_after_utc.isoformat(),
    }


@dataclass(frozen=True)
class ClientIdentity:
    """A loaded and checked client certificate with its key and any intermediate certificates."""

    certificate: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]
    certificate_path: Path
    key_path: Path | None

    @property
    def thumbprint(self) -> str:
        return thumbprint(self.certificate)

    def describe(self) -> dict[str, str]:
        return describe_certificate(self.certificate)


def load_identity(
    certificate_path: Path,
    key_path: Path | None = None,
    *,
    password: str | None = None,
    now: dt.datetime | None = None,
) -> ClientIdentity:
    """Load and check a client certificate from PEM (certificate plus key file) or PKCS#12.

    A PKCS#12 file (``.p12``/``.pfx``, or any file given without ``key_path`` that is not PEM)
    holds certificate, key and chain; ``password`` opens it. A PEM key may be encrypted, then
    ``password`` decrypts it.
    """
    certificate_path = Path(certificate_path)
    data = _read(certificate_path, "client certificate")
    if key_path is None and (
        certificate_path.suffix.lower() in _PKCS12_SUFFIXES or b"-----BEGIN" not in data
    ):
        certificate, key, chain = _load_pkcs12(certificate_path, data, password)
    else:
        certificates = _load_pem_certificates(certificate_path, data)
        certificate, chain = certificates[0], tuple(certificates[1:])
        key_file = Path(key_path) if key_path is not None else certificate_path
        key = _load_pem_key(key_file, password)
    identity = ClientIdentity(
        certificate=certificate,
        key=key,
        chain=chain,
        certificate_path=certificate_path,
        key_path=Path(key_path) if key_path is not None else None,
    )
    _check(identity, now or dt.datetime.now(dt.UTC))
    return identity


def build_ssl_context(
    identity: ClientIdentity,
    ca_files: Sequence[Path],
    *,
    password: str | None = None,
) -> ssl.SSLContext:
    """One client-side TLS context for httpx (``verify=ctx``) and websockets alike.

    Server certificates are checked against ``ca_files`` only (not the system store: a DSF
    network has its own trust anchors), with host name checking, TLS 1.2 or newer.
    """
    if not ca_files:
        raise IdentityError(
            "no CA certificate files configured for DSF servers; set dsf.ca_certificates to the "
            "PEM files of the CAs that issued your DSF FHIR servers' certificates"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    for ca_file in ca_files:
        path = Path(ca_file)
        try:
            context.load_verify_locations(cafile=str(path))
        except FileNotFoundError:
            raise IdentityError(f"CA file {path} does not exist", path=path) from None
        except (ssl.SSLError, OSError) as exc:
            raise IdentityError(
                f"CA file {path} holds no usable PEM certificate ({exc}); give a PEM file with "
                "one or more '-----BEGIN CERTIFICATE-----' blocks",
                path=path,
            ) from exc
    _load_client_chain(context, identity, password)
    return context


def _load_client_chain(
    context: ssl.SSLContext, identity: ClientIdentity, password: str | None
) -> None:
    if identity.key_path is not None or _is_pem_file(identity.certificate_path):
        # The ssl module reads (encrypted) PEM files itself: nothing else touches the disk.
        key_file = identity.key_path or identity.certificate_path
        try:
            context.load_cert_chain(
                certfile=str(identity.certificate_path),
                keyfile=str(key_file),
                password=password.encode() if password is not None else None,
            )
        except ssl.SSLError as exc:
            raise IdentityError(
                f"TLS cannot load client certificate {identity.certificate_path} with key "
                f"{key_file}: {exc}",
                path=identity.certificate_path,
            ) from exc
        return
    # PKCS#12: ssl.SSLContext only loads files. Write the key re-encrypted under a one-time
    # random password to a 0600 temporary file and delete it at once, so no unencrypted key
    # ever reaches the disk.
    one_time = secrets.token_urlsafe(32)
    pem = identity.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(one_time.encode()),
    )
    pem += identity.certificate.public_bytes(serialization.Encoding.PEM)
    for extra in identity.chain:
        pem += extra.public_bytes(serialization.Encoding.PEM)
    fd, name = tempfile.mkstemp(prefix="dsf-bridge-", suffix=".pem")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        context.load_cert_chain(certfile=name, keyfile=name, password=one_time.encode())
    except ssl.SSLError as exc:
        raise IdentityError(
            f"TLS cannot load the client certificate from {identity.certificate_path}: {exc}",
            path=identity.certificate_path,
        ) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _is_pem_file(path: Path) -> bool:
    try:
        return b"-----BEGIN" in path.read_bytes()
    except OSError:
        return False


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{what} file {path} does not exist", path=path) from None
    except OSError as exc:
        raise IdentityError(f"{what} file {path} cannot be read: {exc}", path=path) from exc


def _load_pem_certificates(path: Path, data: bytes) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityError(
            f"client certificate file {path} holds no PEM certificate; give the certificate in "
            "PEM ('-----BEGIN CERTIFICATE-----') or a PKCS#12 file (.p12/.pfx)",
            path=path,
        ) from exc
    return certificates


def _load_pem_key(path: Path, password: str | None) -> PrivateKey:
    data = _read(path, "client key")
    try:
        key = serialization.load_pem_private_key(
            data, password=password.encode() if password is not None else None
        )
    except TypeError as exc:
        # cryptography raises TypeError for "encrypted but no password" and the reverse.
        hint = (
            "the key is encrypted: set dsf.client_key_password"
            if password is None
            else "the key is not encrypted: remove dsf.client_key_password"
        )
        raise IdentityError(f"client key file {path}: {hint}", path=path) from exc
    except ValueError as exc:
        raise IdentityError(
            f"client key file {path} cannot be read: wrong password or not a PEM private key "
            f"({exc})",
            path=path,
        ) from exc
    return _supported_key(key, path)


def _load_pkcs12(
    path: Path, data: bytes, password: str | None
) -> tuple[x509.Certificate, PrivateKey, tuple[x509.Certificate, ...]]:
    try:
        bundle = pkcs12.load_pkcs12(data, password.encode() if password is not None else None)
    except ValueError as exc:
        raise IdentityError(
            f"PKCS#12 file {path} cannot be opened: wrong or missing password "
            f"(dsf.client_key_password), or not a PKCS#12 file ({exc})",
            path=path,
        ) from exc
    if bundle.cert is None or bundle.key is None:
        raise IdentityError(
            f"PKCS#12 file {path} must hold both the client certificate and its private key",
            path=path,
        )
    chain = tuple(item.certificate for item in bundle.additional_certs)
    return bundle.cert.certificate, _supported_key(bundle.key, path), chain


def _supported_key(key: object, path: Path) -> PrivateKey:
    if isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        return key
    raise IdentityError(
        f"client key in {path} is a {type(key).__name__}; TLS client keys must be RSA, EC or EdDSA",
        path=path,
    )


def _check(identity: ClientIdentity, now: dt.datetime) -> None:
    certificate, path = identity.certificate, identity.certificate_path
    public_der = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_der = identity.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public_der != key_der:
        raise IdentityError(
            f"the client key {identity.key_path or path} does not belong to the certificate "
            f"{path}; configure the key that was used to request this certificate",
            path=path,
        )
    if now < certificate.not_valid_before_utc:
        raise IdentityError(
            f"client certificate {path} is not valid before "
            f"{certificate.not_valid_before_utc.isoformat()}; check the system clock or wait",
            path=path,
        )
    if now > certificate.not_valid_after_utc:
        raise IdentityError(
            f"client certificate {path} expired on "
            f"{certificate.not_valid_after_utc.isoformat()}; request a new certificate and "
            "update the thumbprint in the allow list",
            path=path,
        )
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise IdentityError(
            f"certificate {path} is not a TLS client certificate (extended key usage clientAuth "
            "missing); DSF servers authenticate sites by client certificates only",
            path=path,
        )
