"""Encryption of Binaries for one recipient, byte for byte as DSF API v2's ``CryptoService.Kem``.

DSF 2.x process plugins encrypt with ``CryptoService.createRsaKem()`` (RSA keys) or
``createEcDhKem()`` (P-256, P-384, P-521, X25519, X448 keys), implemented by the library
``de.hsheilbronn.mi.utils.crypto.kem``. Using the same format lets a Java plugin and the bridge
read each other's Binaries. The wire format::

    [encapsulation length, 2 bytes big-endian][encapsulation][IV, 12 bytes]
    [AES-256-GCM ciphertext][GCM tag, 16 bytes]

no associated data. The 32-byte AES key comes from a key encapsulation mechanism (KEM):

* RSA: RSA-KEM as BouncyCastle's ``RSAKEMGenerator(32, KDF2BytesGenerator(SHA-512))``: a random
  ``r`` in ``[0, n-1]``, encapsulation ``r^e mod n`` and key ``KDF2-SHA-512(r)[:32]``, both
  numbers unsigned big-endian in the modulus length, the KDF counter starting at 1.
* EC: RFC 9180 DHKEM (Java's ``KEM.getInstance("DHKEM")``): the encapsulation is an ephemeral
  public key (an uncompressed point on the NIST curves, raw bytes for X25519/X448) and the key
  the first 32 bytes of the DHKEM shared secret.

Decryption streams in constant memory, which is why it cannot wait for the tag before releasing
plaintext (DSF's advisory GHSA-xfv4-vhh2-m2j8 was the Java side buffering everything).
**Plaintext released before** :meth:`StreamDecryptor.finalize` **returned is unauthenticated**:
callers write it to a temporary file and use that only after ``finalize()`` (or
:func:`decrypt_to`) returned; on any error they delete it.

Errors::

    BridgeError
    └── CryptoError              a key or a ciphertext cannot be used; never retryable
        ├── UnsupportedKeyError  the key's type or curve is not one DSF's Kem supports
        └── DecryptionError      the ciphertext is malformed, altered, for another key, or too large
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x448, x25519
from cryptography.hazmat.primitives.ciphers import AEADDecryptionContext, Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from dsf_bridge.errors import BridgeError

__all__ = [
    "CHUNK_SIZE",
    "CryptoError",
    "DecryptionError",
    "KemPrivateKey",
    "KemPublicKey",
    "StreamDecryptor",
    "UnsupportedKeyError",
    "certificate_public_key",
    "decrypt_to",
    "decryption_key",
    "encrypt_to",
    "load_private_key",
]

KemPublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | x25519.X25519PublicKey | x448.X448PublicKey
)
KemPrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey | x448.X448PrivateKey
)

CHUNK_SIZE = 1 << 20
_LENGTH_BYTES = 2
_IV_BYTES = 12
_TAG_BYTES = 16
_AES_KEY_BYTES = 32  # AbstractKemAesGcm.Variant.AES_256, the one CryptoService creates
_MAX_ENCAPSULATION = 0x7FFF  # Java writes the length as a signed short


class CryptoError(BridgeError):
    """A key or a ciphertext cannot be used; never retryable (the same bytes fail again)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class UnsupportedKeyError(CryptoError):
    """The key is of a type or on a curve DSF's ``CryptoService.Kem`` cannot use."""


class DecryptionError(CryptoError):
    """The ciphertext is malformed, was altered, is for another key, or exceeds the limit."""


# -- RFC 9180 DHKEM -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DhKem:
    """One DHKEM of RFC 9180 section 7.1: its id, HKDF hash, shared secret and enc lengths."""

    kem_id: int
    digest: Callable[[], hashes.HashAlgorithm]
    secret_length: int
    enc_length: int

    @property
    def suite_id(self) -> bytes:
        return b"KEM" + struct.pack(">H", self.kem_id)

    def labeled_extract(self, salt: bytes, label: bytes, ikm: bytes) -> bytes:
        algorithm = self.digest()
        key = salt or bytes(algorithm.digest_size)
        message = b"HPKE-v1" + self.suite_id + label + ikm
        return hmac.new(key, message, algorithm.name).digest()

    def labeled_expand(self, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
        labeled = struct.pack(">H", length) + b"HPKE-v1" + self.suite_id + label + info
        return HKDFExpand(self.digest(), length, labeled).derive(prk)

    def shared_secret(self, dh: bytes, enc: bytes, recipient: bytes) -> bytes:
        prk = self.labeled_extract(b"", b"eae_prk", dh)
        return self.labeled_expand(prk, b"shared_secret", enc + recipient, self.secret_length)


_NIST_KEMS: dict[str, _DhKem] = {
    "secp256r1": _DhKem(0x0010, hashes.SHA256, 32, 65),
    "secp384r1": _DhKem(0x0011, hashes.SHA384, 48, 97),
    "secp521r1": _DhKem(0x0012, hashes.SHA512, 64, 133),
}
_X25519_KEM = _DhKem(0x0020, hashes.SHA256, 32, 32)
_X448_KEM = _DhKem(0x0021, hashes.SHA512, 64, 56)


def _nist_kem(curve: ec.EllipticCurve) -> _DhKem:
    kem = _NIST_KEMS.get(curve.name)
    if kem is None:
        raise UnsupportedKeyError(
            f"the elliptic curve {curve.name} is not supported; DSF's DHKEM encryption takes "
            "P-256, P-384, P-521, X25519 or X448 keys"
        )
    return kem


def _raw(key: x25519.X25519PublicKey | x448.X448PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


# -- RSA-KEM --------------------------------------------------------------------------------------


def _kdf2_sha512(secret: bytes, length: int) -> bytes:
    """KDF2 (ISO 18033-2) with SHA-512 and no other info, counter from 1, as BouncyCastle's
    ``KDF2BytesGenerator``."""
    out = b""
    counter = 1
    while len(out) < length:
        out += hashlib.sha512(secret + struct.pack(">I", counter)).digest()
        counter += 1
    return out[:length]


def _modulus_length(n: int) -> int:
    return (n.bit_length() + 7) // 8


def _rsa_decapsulate(key: rsa.RSAPrivateKey, encapsulation: bytes) -> bytes:
    numbers = key.private_numbers()
    n, e, d = numbers.public_numbers.n, numbers.public_numbers.e, numbers.d
    c = int.from_bytes(encapsulation, "big")
    if c >= n:
        raise DecryptionError(
            "the Binary's RSA encapsulation is not below the key's modulus: it was encrypted "
            "for another key or altered"
        )
    # Blinding: Python's pow() is not constant time, so exponentiate a random multiple of c
    # and divide the blinding factor out; the timing then says nothing about d.
    while True:
        blind = secrets.randbelow(n - 2) + 2
        if math.gcd(blind, n) == 1:
            break
    r = (pow(c * pow(blind, e, n), d, n) * pow(blind, -1, n)) % n
    return _kdf2_sha512(r.to_bytes(_modulus_length(n), "big"), _AES_KEY_BYTES)


# -- keys -----------------------------------------------------------------------------------------


_MIN_RSA_BITS = 2048


def _check_public(key: object) -> KemPublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        _nist_kem(key.curve)
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
        # RSA-KEM is only as strong as the modulus; DSF's own certificates have 2048 and more.
        raise UnsupportedKeyError(
            f"an RSA key of {key.key_size} bits is too weak to encrypt for; at least "
            f"{_MIN_RSA_BITS} bits are needed (the organization must renew its certificate)"
        )
    if isinstance(key, rsa.RSAPublicKey | x25519.X25519PublicKey | x448.X448PublicKey):
        return key
    raise UnsupportedKeyError(
        f"a {type(key).__name__} cannot be encrypted for; DSF's Kem takes RSA keys or EC keys "
        "on P-256, P-384, P-521, X25519 or X448 (Ed25519/Ed448 keys only sign)"
    )


def decryption_key(key: object) -> KemPrivateKey:
    """``key`` if the KEM can decrypt with it; :class:`UnsupportedKeyError` says why not."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        _nist_kem(key.curve)
        return key
    if isinstance(key, rsa.RSAPrivateKey | x25519.X25519PrivateKey | x448.X448PrivateKey):
        return key
    raise UnsupportedKeyError(
        f"a {type(key).__name__} cannot decrypt; DSF's Kem takes RSA keys or EC keys on "
        "P-256, P-384, P-521, X25519 or X448 (Ed25519/Ed448 keys only sign)"
    )


def load_private_key(path: Path, password: bytes | str | None = None) -> KemPrivateKey:
    """The private key in ``path`` (PEM or DER, PKCS#8 or traditional, encrypted when
    ``password`` is given), checked to be one DSF's Kem can decrypt with. A site whose DSF
    client key is in a PKCS#12 file takes ``ClientIdentity.key`` from ``identity.load_identity``
    instead."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CryptoError(f"cannot read the private key {path}: {exc.strerror}") from exc
    secret = password.encode() if isinstance(password, str) else password
    pem = b"-----BEGIN" in data
    load = serialization.load_pem_private_key if pem else serialization.load_der_private_key
    try:
        key = load(data, secret)
    except TypeError as exc:  # password missing, or given for an unencrypted key
        raise CryptoError(f"the private key {path}: {exc}") from exc
    except ValueError as exc:
        raise CryptoError(
            f"the private key {path} cannot be read: not a PEM or DER private key, or the "
            "password is wrong"
        ) from exc
    return decryption_key(key)


def certificate_public_key(certificate: x509.Certificate) -> KemPublicKey:
    """The certificate's public key, checked to be one DSF's Kem can encrypt for."""
    try:
        key = certificate.public_key()
    except ValueError as exc:
        raise UnsupportedKeyError(f"the certificate's public key cannot be read: {exc}") from exc
    return _check_public(key)


def _encapsulate(public_key: KemPublicKey) -> tuple[bytes, bytes]:
    """(encapsulation, AES key) for ``public_key``."""
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        length = _modulus_length(numbers.n)
        r = secrets.randbelow(numbers.n)
        encapsulation = pow(r, numbers.e, numbers.n).to_bytes(length, "big")
        return encapsulation, _kdf2_sha512(r.to_bytes(length, "big"), _AES_KEY_BYTES)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        kem = _nist_kem(public_key.curve)
        ephemeral = ec.generate_private_key(public_key.curve)
        enc = _point(ephemeral.public_key())
        dh = ephemeral.exchange(ec.ECDH(), public_key)
        secret = kem.shared_secret(dh, enc, _point(public_key))
    elif isinstance(public_key, x25519.X25519PublicKey):
        kem = _X25519_KEM
        x_ephemeral = x25519.X25519PrivateKey.generate()
        enc = _raw(x_ephemeral.public_key())
        secret = kem.shared_secret(x_ephemeral.exchange(public_key), enc, _raw(public_key))
    else:
        kem = _X448_KEM
        x4_ephemeral = x448.X448PrivateKey.generate()
        enc = _raw(x4_ephemeral.public_key())
        secret = kem.shared_secret(x4_ephemeral.exchange(public_key), enc, _raw(public_key))
    return enc, secret[:_AES_KEY_BYTES]


def _encapsulation_length(private_key: KemPrivateKey) -> int:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return _modulus_length(private_key.private_numbers().public_numbers.n)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return _nist_kem(private_key.curve).enc_length
    if isinstance(private_key, x25519.X25519PrivateKey):
        return _X25519_KEM.enc_length
    return _X448_KEM.enc_length


def _decapsulate(private_key: KemPrivateKey, encapsulation: bytes) -> bytes:
    """The AES key from ``encapsulation``; the length was checked already."""
    if isinstance(private_key, rsa.RSAPrivateKey):
        return _rsa_decapsulate(private_key, encapsulation)
    try:
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            kem = _nist_kem(private_key.curve)
            ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(
                private_key.curve, encapsulation
            )
            dh = private_key.exchange(ec.ECDH(), ephemeral)
            recipient = _point(private_key.public_key())
        elif isinstance(private_key, x25519.X25519PrivateKey):
            kem = _X25519_KEM
            dh = private_key.exchange(x25519.X25519PublicKey.from_public_bytes(encapsulation))
            recipient = _raw(private_key.public_key())
        else:
            kem = _X448_KEM
            dh = private_key.exchange(x448.X448PublicKey.from_public_bytes(encapsulation))
            recipient = _raw(private_key.public_key())
    except ValueError as exc:  # not a point on the curve, or a low-order X25519/X448 point
        raise DecryptionError(
            "the Binary's encapsulated key is not a valid public key of the decrypting key's "
            "curve: it was altered, or encrypted for another kind of key"
        ) from exc
    return kem.shared_secret(dh, encapsulation, recipient)[:_AES_KEY_BYTES]


# -- streams --------------------------------------------------------------------------------------


def encrypt_to(
    source: BinaryIO, target: BinaryIO, public_key: KemPublicKey, *, chunk_size: int = CHUNK_SIZE
) -> int:
    """Encrypt ``source`` to the end of the stream for ``public_key`` into ``target`` in the
    DSF Kem format, ``chunk_size`` bytes at a time; the number of bytes written."""
    key = _check_public(public_key)
    encapsulation, aes_key = _encapsulate(key)
    iv = secrets.token_bytes(_IV_BYTES)
    encryptor = Cipher(algorithms.AES(aes_key), modes.GCM(iv)).encryptor()
    header = struct.pack(">H", len(encapsulation)) + encapsulation + iv
    target.write(header)
    written = len(header)
    while chunk := source.read(chunk_size):
        out = encryptor.update(chunk)
        target.write(out)
        written += len(out)
    tail = encryptor.finalize() + encryptor.tag
    target.write(tail)
    return written + len(tail)


class StreamDecryptor:
    """Incremental decryption of one DSF Kem ciphertext, fed in chunks of any size.

    ``update`` returns plaintext as soon as it can, holding back the last 16 bytes seen (they
    may be the tag); ``finalize`` verifies the tag. Everything ``update`` returned is
    unauthenticated until ``finalize`` returned: write it to a temporary file, use that only
    afterwards, delete it on any error. After an error the decryptor refuses further input.
    """

    def __init__(self, private_key: KemPrivateKey, *, max_plaintext_bytes: int) -> None:
        if max_plaintext_bytes < 0:
            raise ValueError("max_plaintext_bytes must not be negative")
        self._key = decryption_key(private_key)
        self._expected = _encapsulation_length(self._key)
        self._limit = max_plaintext_bytes
        self._header = bytearray()
        self._decryptor: AEADDecryptionContext | None = None
        self._tail = b""
        self._plaintext = 0
        self._failed = False
        self._done = False

    @property
    def plaintext_bytes(self) -> int:
        """How many plaintext bytes were released so far."""
        return self._plaintext

    def update(self, chunk: bytes) -> bytes:
        """Feed the next ciphertext bytes; the plaintext they complete (maybe empty)."""
        self._check_usable()
        try:
            return self._update(chunk)
        except CryptoError:
            self._failed = True
            raise

    def finalize(self) -> bytes:
        """Verify the tag; raises :class:`DecryptionError` when the ciphertext is truncated,
        altered or for another key. Returns the last plaintext bytes (empty for GCM)."""
        self._check_usable()
        self._done = True
        if self._decryptor is None:
            raise DecryptionError(
                f"the Binary ended after {len(self._header)} bytes, inside its encryption "
                "header: it was truncated or is not encrypted"
            )
        if len(self._tail) < _TAG_BYTES:
            raise DecryptionError(
                "the Binary ended before its authentication tag: it was truncated in transit"
            )
        try:
            return self._decryptor.finalize_with_tag(self._tail)
        except InvalidTag as exc:
            raise DecryptionError(
                "the Binary's authentication tag does not verify: it was altered or truncated "
                "in transit, or encrypted for another key of the same type; discard everything "
                "decrypted from it"
            ) from exc

    def _check_usable(self) -> None:
        if self._failed:
            raise DecryptionError("this decryption failed already; start again with a new one")
        if self._done:
            raise DecryptionError("this decryption was finalized already")

    def _update(self, chunk: bytes) -> bytes:
        if self._decryptor is None:
            self._header += chunk
            if len(self._header) < _LENGTH_BYTES:
                return b""
            (length,) = struct.unpack(">H", self._header[:_LENGTH_BYTES])
            if length != self._expected:
                raise DecryptionError(
                    f"the Binary was encrypted for another key: its encapsulated key has "
                    f"{length} bytes, the decrypting {_describe(self._key)} expects "
                    f"{self._expected}"
                )
            end = _LENGTH_BYTES + length + _IV_BYTES
            if len(self._header) < end:
                return b""
            encapsulation = bytes(self._header[_LENGTH_BYTES : _LENGTH_BYTES + length])
            iv = bytes(self._header[_LENGTH_BYTES + length : end])
            aes_key = _decapsulate(self._key, encapsulation)
            self._decryptor = Cipher(
                algorithms.AES(aes_key), modes.GCM(iv, min_tag_length=_TAG_BYTES)
            ).decryptor()
            chunk = bytes(self._header[end:])
            self._header = bytearray(self._header[:end])
        data = self._tail + chunk
        if len(data) <= _TAG_BYTES:
            self._tail = data
            return b""
        self._tail = data[-_TAG_BYTES:]
        body = data[:-_TAG_BYTES]
        if self._plaintext + len(body) > self._limit:
            raise DecryptionError(
                f"the Binary's plaintext exceeds the limit of {self._limit} bytes; raise the "
                "size limit if studies this large are expected"
            )
        self._plaintext += len(body)
        return self._decryptor.update(body)


def _describe(key: KemPrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA key of {key.key_size} bits"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC key on {key.curve.name}"
    return "X25519 key" if isinstance(key, x25519.X25519PrivateKey) else "X448 key"


def decrypt_to(
    source: BinaryIO,
    target: BinaryIO,
    private_key: KemPrivateKey,
    *,
    max_plaintext_bytes: int,
    chunk_size: int = CHUNK_SIZE,
) -> int:
    """Decrypt ``source`` into ``target``; the number of plaintext bytes.

    ``target`` holds unauthenticated plaintext until this returns: pass a temporary file and
    use it only afterwards. On an error, a seekable ``target`` is emptied before the error
    propagates, so nothing unauthenticated lingers in it."""
    decryptor = StreamDecryptor(private_key, max_plaintext_bytes=max_plaintext_bytes)
    try:
        while chunk := source.read(chunk_size):
            target.write(decryptor.update(chunk))
        target.write(decryptor.finalize())
    except CryptoError:
        if target.seekable():
            target.seek(0)
            target.truncate()
        raise
    return decryptor.plaintext_bytes
