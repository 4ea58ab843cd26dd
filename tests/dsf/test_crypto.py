"""DSF API v2's Kem format: RFC 9180 vectors, pyhpke as an independent DHKEM, BouncyCastle's
RSA-KEM in a real JVM, and every way a ciphertext can be wrong."""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import subprocess
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pyhpke import KEMId, KEMKey
from pyhpke.kem import KEM

from dsf_bridge.dsf import crypto
from dsf_bridge.dsf.crypto import (
    CryptoError,
    DecryptionError,
    KemPrivateKey,
    StreamDecryptor,
    UnsupportedKeyError,
    certificate_public_key,
    decrypt_to,
    encrypt_to,
    load_private_key,
)
from dsf_bridge.sandbox.certs import CertificateAuthority

PLAIN = bytes(range(256)) * 4099 + b"tail"  # not a multiple of any chunk size used below

EC_KEYS: dict[str, tuple[Callable[[], KemPrivateKey], KEMId]] = {
    "P-256": (lambda: ec.generate_private_key(ec.SECP256R1()), KEMId.DHKEM_P256_HKDF_SHA256),
    "P-384": (lambda: ec.generate_private_key(ec.SECP384R1()), KEMId.DHKEM_P384_HKDF_SHA384),
    "P-521": (lambda: ec.generate_private_key(ec.SECP521R1()), KEMId.DHKEM_P521_HKDF_SHA512),
    "X25519": (x25519.X25519PrivateKey.generate, KEMId.DHKEM_X25519_HKDF_SHA256),
    "X448": (x448.X448PrivateKey.generate, KEMId.DHKEM_X448_HKDF_SHA512),
}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _encrypt(plain: bytes, key: KemPrivateKey, chunk_size: int = 1000) -> bytes:
    out = io.BytesIO()
    written = encrypt_to(io.BytesIO(plain), out, key.public_key(), chunk_size=chunk_size)
    assert written == len(out.getvalue())
    return out.getvalue()


def _decrypt(cipher: bytes, key: KemPrivateKey, limit: int = 10**9) -> bytes:
    out = io.BytesIO()
    count = decrypt_to(io.BytesIO(cipher), out, key, max_plaintext_bytes=limit, chunk_size=777)
    assert count == len(out.getvalue())
    return out.getvalue()


def _frame(encapsulation: bytes, aes_key: bytes, plain: bytes) -> bytes:
    """The Kem wire format built from its definition, independent of the module under test."""
    iv = bytes(range(12))
    return (
        struct.pack(">H", len(encapsulation))
        + encapsulation
        + iv
        + AESGCM(aes_key).encrypt(iv, plain, None)
    )


# -- known answers and independent implementations ----------------------------------------------


@pytest.mark.parametrize(
    ("make_key", "enc", "shared_secret"),
    [
        pytest.param(
            # RFC 9180 appendix A.1.1: DHKEM(X25519, HKDF-SHA256)
            lambda: x25519.X25519PrivateKey.from_private_bytes(
                bytes.fromhex("4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8")
            ),
            "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
            "fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc",
            id="rfc9180-a.1.1-x25519",
        ),
        pytest.param(
            # RFC 9180 appendix A.3.1: DHKEM(P-256, HKDF-SHA256)
            lambda: ec.derive_private_key(
                int("f3ce7fdae57e1a310d87f1ebbde6f328be0a99cdbcadf4d6589cf29de4b8ffd2", 16),
                ec.SECP256R1(),
            ),
            "04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac98536d7b61a1af4b7"
            "8e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4",
            "c0d26aeab536609a572b07695d933b589dcf363ff9d93c93adea537aeabb8cb8",
            id="rfc9180-a.3.1-p256",
        ),
    ],
)
def test_dhkem_decapsulation_matches_the_rfc_9180_vectors(
    make_key: Callable[[], KemPrivateKey], enc: str, shared_secret: str
) -> None:
    key = make_key()
    # Java's encapsulate(0, 32, "AES") is the first 32 bytes of the shared secret.
    aes_key = bytes.fromhex(shared_secret)[:32]
    cipher = _frame(bytes.fromhex(enc), aes_key, b"Beauty is truth, truth beauty")
    assert _decrypt(cipher, key) == b"Beauty is truth, truth beauty"


@pytest.mark.parametrize("curve", sorted(EC_KEYS))
def test_dhkem_interoperates_with_pyhpke_both_ways(curve: str) -> None:
    make_key, kem_id = EC_KEYS[curve]
    key = make_key()
    kem = KEM(kem_id)
    recipient = KEMKey.from_pyca_cryptography_key(key)
    # pyhpke encapsulates, we decrypt.
    secret, enc = kem.encap(KEMKey.from_pyca_cryptography_key(key.public_key()))
    assert _decrypt(_frame(enc, secret[:32], PLAIN), key) == PLAIN
    # We encrypt, pyhpke decapsulates.
    cipher = _encrypt(PLAIN, key)
    (length,) = struct.unpack(">H", cipher[:2])
    enc = cipher[2 : 2 + length]
    iv = cipher[2 + length : 14 + length]
    aes_key = kem.decap(enc, recipient)[:32]
    assert AESGCM(aes_key).decrypt(iv, cipher[14 + length :], None) == PLAIN


def test_rsa_kem_matches_its_definition(rsa_key: rsa.RSAPrivateKey) -> None:
    # r = 2: encapsulation 2^e mod n, key KDF2-SHA-512(Z = 2 in the modulus length, counter 1).
    numbers = rsa_key.public_key().public_numbers()
    length = (numbers.n.bit_length() + 7) // 8
    r = (2).to_bytes(length, "big")
    aes_key = hashlib.sha512(r + b"\x00\x00\x00\x01").digest()[:32]
    encapsulation = pow(2, numbers.e, numbers.n).to_bytes(length, "big")
    assert _decrypt(_frame(encapsulation, aes_key, PLAIN), rsa_key) == PLAIN


@pytest.mark.parametrize("curve", sorted(EC_KEYS))
def test_round_trip_for_every_supported_curve(curve: str) -> None:
    key = EC_KEYS[curve][0]()
    cipher = _encrypt(PLAIN, key)
    assert len(cipher) == 2 + crypto._encapsulation_length(key) + 12 + len(PLAIN) + 16
    assert _decrypt(cipher, key) == PLAIN


def test_rsa_round_trip_and_empty_plaintext(rsa_key: rsa.RSAPrivateKey) -> None:
    assert _decrypt(_encrypt(PLAIN, rsa_key), rsa_key) == PLAIN
    assert _decrypt(_encrypt(b"", rsa_key), rsa_key) == b""


def test_every_encryption_is_fresh(rsa_key: rsa.RSAPrivateKey) -> None:
    assert _encrypt(b"same", rsa_key) != _encrypt(b"same", rsa_key)


def test_decryption_accepts_chunks_of_any_size() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cipher = _encrypt(PLAIN, key)
    for size in (1, 2, 15, 16, 17, 80, 4096):
        decryptor = StreamDecryptor(key, max_plaintext_bytes=len(PLAIN))
        parts = [decryptor.update(cipher[i : i + size]) for i in range(0, len(cipher), size)]
        parts.append(decryptor.finalize())
        assert b"".join(parts) == PLAIN, size


# -- BouncyCastle in a real JVM ------------------------------------------------------------------

_JAVA = """
import java.io.*;
import java.nio.ByteBuffer;
import java.nio.file.*;
import java.security.*;
import java.security.interfaces.*;
import java.security.spec.*;
import javax.crypto.*;
import javax.crypto.spec.*;
import org.bouncycastle.crypto.SecretWithEncapsulation;
import org.bouncycastle.crypto.digests.SHA512Digest;
import org.bouncycastle.crypto.generators.KDF2BytesGenerator;
import org.bouncycastle.crypto.kems.RSAKEMExtractor;
import org.bouncycastle.crypto.kems.RSAKEMGenerator;
import org.bouncycastle.crypto.params.RSAKeyParameters;

// The RsaKemAesGcm of crypto-utils (DSF API v2's CryptoService.createRsaKem()), AES-256.
public class RsaKem {
    public static void main(String[] args) throws Exception {
        byte[] der = Files.readAllBytes(Path.of(args[1]));
        KeyFactory factory = KeyFactory.getInstance("RSA");
        try (InputStream in = new FileInputStream(args[2]);
                OutputStream out = new FileOutputStream(args[3])) {
            if (args[0].equals("encrypt")) {
                RSAPublicKey key =
                        (RSAPublicKey) factory.generatePublic(new X509EncodedKeySpec(der));
                SecureRandom random = new SecureRandom();
                SecretWithEncapsulation kem = new RSAKEMGenerator(
                        32, new KDF2BytesGenerator(new SHA512Digest()), random)
                        .generateEncapsulated(new RSAKeyParameters(
                                false, key.getModulus(), key.getPublicExponent()));
                byte[] iv = new byte[12];
                random.nextBytes(iv);
                Cipher cipher = Cipher.getInstance("AES/GCM/NoPadding");
                cipher.init(Cipher.ENCRYPT_MODE, new SecretKeySpec(kem.getSecret(), "AES"),
                        new GCMParameterSpec(128, iv));
                byte[] enc = kem.getEncapsulation();
                out.write(ByteBuffer.allocate(2).putShort((short) enc.length).array());
                out.write(enc);
                out.write(iv);
                out.write(cipher.doFinal(in.readAllBytes()));
            } else {
                RSAPrivateKey key =
                        (RSAPrivateKey) factory.generatePrivate(new PKCS8EncodedKeySpec(der));
                DataInputStream data = new DataInputStream(in);
                byte[] enc = data.readNBytes(data.readShort());
                byte[] iv = data.readNBytes(12);
                byte[] secret = new RSAKEMExtractor(
                        new RSAKeyParameters(true, key.getModulus(), key.getPrivateExponent()),
                        32, new KDF2BytesGenerator(new SHA512Digest())).extractSecret(enc);
                Cipher cipher = Cipher.getInstance("AES/GCM/NoPadding");
                cipher.init(Cipher.DECRYPT_MODE, new SecretKeySpec(secret, "AES"),
                        new GCMParameterSpec(128, iv));
                out.write(cipher.doFinal(data.readAllBytes()));
            }
        }
    }
}
"""

_BCPROV = Path("/usr/share/java/bcprov.jar")


def _java(tmp_path: Path, *args: str) -> None:
    java = shutil.which("java")
    assert java is not None, "install openjdk-17-jdk-headless (.ci/run does)"
    assert _BCPROV.exists(), "install libbcprov-java (.ci/run does)"
    source = tmp_path / "RsaKem.java"
    source.write_text(_JAVA)
    # The single-file source launcher compiles in memory: no javac step, no class files.
    done = subprocess.run(
        [java, "-cp", str(_BCPROV), str(source), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_bouncycastle_rsa_kem_reads_ours_and_we_read_its(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    private = tmp_path / "key.der"
    private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = tmp_path / "public.der"
    public.write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (tmp_path / "ours.bin").write_bytes(_encrypt(PLAIN, rsa_key))
    _java(tmp_path, "decrypt", str(private), str(tmp_path / "ours.bin"), str(tmp_path / "a.out"))
    assert (tmp_path / "a.out").read_bytes() == PLAIN

    (tmp_path / "plain").write_bytes(PLAIN)
    _java(tmp_path, "encrypt", str(public), str(tmp_path / "plain"), str(tmp_path / "java.bin"))
    assert _decrypt((tmp_path / "java.bin").read_bytes(), rsa_key) == PLAIN


# -- refusals ------------------------------------------------------------------------------------


def test_a_flipped_bit_anywhere_fails_and_the_target_is_emptied(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    cipher = bytearray(_encrypt(PLAIN, rsa_key))
    for position in (5, 2 + 256 + 3, len(cipher) // 2, len(cipher) - 1):
        altered = bytearray(cipher)
        altered[position] ^= 0x01
        target = io.BytesIO()
        with pytest.raises(DecryptionError):
            decrypt_to(io.BytesIO(bytes(altered)), target, rsa_key, max_plaintext_bytes=10**9)
        assert target.getvalue() == b""


def test_truncation_is_detected() -> None:
    key = x25519.X25519PrivateKey.generate()
    cipher = _encrypt(PLAIN, key)
    with pytest.raises(DecryptionError, match="authentication tag does not verify"):
        _decrypt(cipher[:-1], key)
    with pytest.raises(DecryptionError, match="before its authentication tag"):
        _decrypt(cipher[: 2 + 32 + 12 + 10], key)
    with pytest.raises(DecryptionError, match="inside its encryption header"):
        _decrypt(cipher[:20], key)


def test_another_key_of_another_size_is_named(rsa_key: rsa.RSAPrivateKey) -> None:
    cipher = _encrypt(b"x", ec.generate_private_key(ec.SECP384R1()))
    decryptor = StreamDecryptor(rsa_key, max_plaintext_bytes=10)
    # The length alone tells: the error comes before the rest arrived.
    with pytest.raises(DecryptionError, match=r"encrypted for another key: .* 97 bytes.* 256"):
        decryptor.update(cipher[:2])
    with pytest.raises(DecryptionError, match="failed already"):
        decryptor.update(cipher[2:])


def test_another_key_of_the_same_type_fails_the_tag() -> None:
    cipher = _encrypt(PLAIN, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(DecryptionError, match="encrypted for another key of the same type"):
        _decrypt(cipher, ec.generate_private_key(ec.SECP256R1()))


def test_an_encapsulation_off_the_curve_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cipher = bytearray(_encrypt(b"x", key))
    cipher[2 + 64] ^= 0x01  # the last byte of y: no longer on the curve
    with pytest.raises(DecryptionError, match="not a valid public key"):
        _decrypt(bytes(cipher), key)


def test_the_plaintext_limit_is_enforced_while_streaming(rsa_key: rsa.RSAPrivateKey) -> None:
    cipher = _encrypt(PLAIN, rsa_key)
    assert _decrypt(cipher, rsa_key, limit=len(PLAIN)) == PLAIN
    decryptor = StreamDecryptor(rsa_key, max_plaintext_bytes=len(PLAIN) - 1)
    released: list[int] = []

    def feed() -> None:
        for i in range(0, len(cipher), 4096):
            released.append(len(decryptor.update(cipher[i : i + 4096])))

    with pytest.raises(DecryptionError, match=f"limit of {len(PLAIN) - 1} bytes"):
        feed()
    assert 0 < sum(released) <= len(PLAIN) - 1


def test_unsupported_keys_are_refused_with_what_is_supported() -> None:
    with pytest.raises(UnsupportedKeyError, match="secp256k1 is not supported"):
        encrypt_to(
            io.BytesIO(b""), io.BytesIO(), ec.generate_private_key(ec.SECP256K1()).public_key()
        )
    with pytest.raises(UnsupportedKeyError, match="only sign"):
        StreamDecryptor(ed25519.Ed25519PrivateKey.generate(), max_plaintext_bytes=1)  # type: ignore[arg-type]


def test_keys_load_from_files_and_certificates(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    loaded = load_private_key(path, "secret")
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == key.private_numbers()
    with pytest.raises(CryptoError, match="password is wrong"):
        load_private_key(path, "wrong")
    with pytest.raises(CryptoError, match="cannot read the private key"):
        load_private_key(tmp_path / "missing.pem")
    der = tmp_path / "key.der"
    der.write_bytes(
        x25519.X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert isinstance(load_private_key(der), x25519.X25519PrivateKey)
    signing = tmp_path / "ed25519.pem"
    signing.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(UnsupportedKeyError, match="Ed25519PrivateKey cannot decrypt"):
        load_private_key(signing)

    issued = CertificateAuthority("crypto test CA").issue_client("Test Client")
    assert certificate_public_key(issued.certificate) == issued.key.public_key()


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, made as they are read: a large source that takes no memory."""

    def __init__(self, size: int) -> None:
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        count = self._left if size < 0 else min(size, self._left)
        self._left -= count
        return bytes(count)


class _Sink(io.RawIOBase):
    """Counts and hashes what is written, keeps nothing."""

    def __init__(self) -> None:
        self.size = 0
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.size += len(data)
        self.digest.update(data)
        return len(data)


def test_encryption_and_decryption_run_in_constant_memory(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    size = 48 << 20
    encrypted = tmp_path / "big.bin"
    tracemalloc.start()
    try:
        with encrypted.open("wb") as target:
            encrypt_to(_Zeros(size), target, key.public_key())  # type: ignore[arg-type]
        sink = _Sink()
        with encrypted.open("rb") as source:
            decrypt_to(source, sink, key, max_plaintext_bytes=size)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.size == size
    assert sink.digest.hexdigest() == hashlib.sha256(bytes(size)).hexdigest()
    assert peak < 8 << 20, f"peak {peak} bytes for a {size}-byte stream"


@pytest.mark.parametrize("bits", [1024, 1536])
def test_nothing_is_encrypted_for_a_weak_rsa_key(bits: int) -> None:
    """RSA-KEM is as strong as the modulus: a recipient key under 2048 bits (NIST SP 800-57,
    BSI TR-02102) would protect a patient's study with a key that can be factored."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    with pytest.raises(UnsupportedKeyError, match=f"{bits} bits"):
        crypto.encrypt_to(io.BytesIO(b"study"), io.BytesIO(), weak.public_key())
