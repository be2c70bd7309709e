"""attestd's own keys: credential signing keys (with rotation) and the issuing CA.

Signing keys live in DATA_DIR/keys/<kid>.pem (0600) with an index keys.json.
The newest key signs; a retired key stays published (JWKS) until
retired_at + credential lifetime, after which no credential it signed can
still be live. The issuing CA (for client certificates) is DATA_DIR/ca-key.pem
and ca-cert.pem, created on first start, or files named in the configuration.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attestd.core.ear import key_id, public_jwk
from attestd.privatefile import write_private
from attestd.service.config import ConfigError

URI_PREFIX = "urn:attestd:device:"
CALLER_URI_PREFIX = "urn:attestd:caller:"


def read_private_key(path: Path) -> object:
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise ConfigError(f"{path} is readable by others; chmod 600 it")
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the private key {path}: {e}") from None


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class SigningKey:
    kid: str
    key: ec.EllipticCurvePrivateKey
    created_at_ms: int
    retired_at_ms: int = 0

    # Fixed at retirement from the lifetime then in force (a later, shorter lifetime
    # must not unpublish a key whose credentials are still live).
    retired_lifetime_s: int = 0

    def publish_until_ms(self, lifetime_s: int) -> int:
        if not self.retired_at_ms:
            return 0
        return self.retired_at_ms + max(lifetime_s, self.retired_lifetime_s) * 1000


class SigningKeyring:
    """The credential signing keys in DATA_DIR/keys, newest first."""

    def __init__(self, data_dir: Path, lifetime_s: int, now_ms: int) -> None:
        self.dir = data_dir / "keys"
        self.lifetime_s = lifetime_s
        self._lock = threading.Lock()
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.keys: list[SigningKey] = []
        with self._file_lock():
            if (self.dir / "keys.json").exists():
                self.keys = self._load()
            else:
                legacy = data_dir / "signing-key.pem"
                if legacy.exists():  # the single key of earlier versions becomes the first
                    key = read_private_key(legacy)
                    if not isinstance(key, ec.EllipticCurvePrivateKey):
                        raise ConfigError(f"{legacy} is not an EC key")
                    self._add(key, now_ms)
                else:
                    self._add(ec.generate_private_key(ec.SECP256R1()), now_ms)
                self._save()

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Serialises changes to the ring between the processes sharing the data dir."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _load(self) -> list[SigningKey]:
        keys = []
        for entry in json.loads((self.dir / "keys.json").read_text()):
            key = read_private_key(self.dir / f"{entry['kid']}.pem")
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"signing key {entry['kid']} is not an EC key")
            keys.append(
                SigningKey(
                    entry["kid"],
                    key,
                    entry["created_at_ms"],
                    entry["retired_at_ms"],
                    entry.get("retired_lifetime_s", 0),
                )
            )
        return keys

    @property
    def current(self) -> SigningKey:
        return self.keys[0]

    def _add(self, key: ec.EllipticCurvePrivateKey, now_ms: int) -> SigningKey:
        entry = SigningKey(key_id(key.public_key()), key, now_ms)
        write_private(self.dir / f"{entry.kid}.pem", _pem(key))
        self.keys.insert(0, entry)
        return entry

    def _save(self) -> None:
        doc = [
            {
                "kid": k.kid,
                "created_at_ms": k.created_at_ms,
                "retired_at_ms": k.retired_at_ms,
                "retired_lifetime_s": k.retired_lifetime_s,
            }
            for k in self.keys
        ]
        write_private(self.dir / "keys.json", json.dumps(doc, indent=2).encode())

    def rotate(self, now_ms: int) -> SigningKey:
        """A new current key; the old one retires (and stays published for a lifetime).

        Another process may have rotated since this ring was read: the ring on disk is
        read again under the file lock, so no key is ever lost from the index.
        """
        with self._lock, self._file_lock():
            self.keys = self._load()
            self.current.retired_at_ms = now_ms
            self.current.retired_lifetime_s = self.lifetime_s
            new = self._add(ec.generate_private_key(ec.SECP256R1()), now_ms)
            self._save()
            return new

    def published(self, now_ms: int) -> list[SigningKey]:
        """Keys a relying party needs: the current one and retired ones with live credentials."""
        return [
            k
            for k in self.keys
            if not k.retired_at_ms or k.publish_until_ms(self.lifetime_s) > now_ms
        ]

    def find(self, kid: str, now_ms: int) -> SigningKey | None:
        return next((k for k in self.published(now_ms) if k.kid == kid), None)

    def jwks(self, now_ms: int) -> dict[str, object]:
        return {
            "keys": [
                public_jwk(k.key.public_key()) | {"kid": k.kid, "alg": "ES256", "use": "sig"}
                for k in self.published(now_ms)
            ]
        }


class IssuingCA:
    """Issues client certificates: to devices for TPM-resident keys their AK certified
    (the device CA, ``ca-*.pem``), and to callers with a role for the mTLS port (the
    client CA, ``stem="client-ca"``)."""

    def __init__(
        self,
        data_dir: Path,
        cert_path: Path | None,
        key_path: Path | None,
        *,
        stem: str = "ca",
        common_name: str = "attestd device CA",
    ) -> None:
        if cert_path is not None or key_path is not None:
            if cert_path is None or key_path is None:
                setting = "client_ca" if stem == "client-ca" else "issuing_ca"
                raise ConfigError(f"{setting}_cert and {setting}_key go together")
            key = read_private_key(key_path)
            chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
        else:
            cert_path, key_path = data_dir / f"{stem}-cert.pem", data_dir / f"{stem}-key.pem"
            if key_path.exists():
                key = read_private_key(key_path)
                chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
            else:
                key, chain = self._create(cert_path, key_path, common_name)
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise ConfigError("the issuing CA key must be an EC or RSA key")
        self.key = key
        self.chain = chain
        self.cert = chain[0]
        if self.cert.public_key() != key.public_key():
            raise ConfigError("the issuing CA certificate is not for the CA key")

    @staticmethod
    def _create(
        cert_path: Path, key_path: Path, common_name: str
    ) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_private(key_path, _pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, [cert]

    def chain_pem(self) -> str:
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in self.chain)

    def issue(
        self,
        public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        device_id: str,
        not_before_s: int,
        not_after_s: int,
    ) -> x509.Certificate:
        """A device's client certificate: subject CN and SAN URI carry the device id."""
        return self._issue(public_key, device_id, URI_PREFIX + device_id, not_before_s, not_after_s)

    def issue_caller(
        self,
        public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        cred_id: str,
        name: str,
        role: str,
        not_before_s: int,
        not_after_s: int,
    ) -> x509.Certificate:
        """A caller's client certificate (CN name, OU role, SAN URI the credential id)."""
        return self._issue(
            public_key,
            name,
            CALLER_URI_PREFIX + cred_id,
            not_before_s,
            not_after_s,
            unit=role,
        )

    def _issue(
        self,
        public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        common_name: str,
        uri: str,
        not_before_s: int,
        not_after_s: int,
        unit: str = "",
    ) -> x509.Certificate:
        start = datetime.datetime.fromtimestamp(not_before_s, datetime.UTC)
        end = datetime.datetime.fromtimestamp(not_after_s, datetime.UTC)
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if unit:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )


def device_id_of(cert: x509.Certificate) -> str | None:
    """The device id a client certificate names in its SAN URI."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(URI_PREFIX):
            return uri[len(URI_PREFIX) :]
    return None
