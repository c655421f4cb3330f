"""The cluster's certificate authority and each node's credentials, as files.

What mutual TLS between hosts and the data path's capabilities are made of:

- an **authority** directory (``cargohold pki init``; keep it on one host, or offline):
  ``ca.crt``, ``ca.key`` and ``cluster.key``, the secret that signs capabilities;
- a node's **credentials** directory (``cargohold pki issue NAME``; one per node, copied to
  it): ``ca.crt``, ``node.crt`` and ``node.key`` (its certificate, for the name ``NAME``) and
  a copy of ``cluster.key``.

A node started without any gets both in its state directory on first start, so that one host
works out of the box (as k3s does). Keys are ECDSA P-256 (quick handshakes); certificates are
valid for ten years (the CA) and five (a node). Secrets are written 0600 in 0700 folders.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
import shutil
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cargohold.config import check_private
from cargohold.errors import InvalidArgument

CA_CERT, CA_KEY, CLUSTER_KEY = "ca.crt", "ca.key", "cluster.key"
NODE_CERT, NODE_KEY = "node.crt", "node.key"
CA_YEARS, NODE_YEARS = 10, 5
_DAY = datetime.timedelta(days=1)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a new file with its final mode from the start; never replace one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _new_dir(path: Path, what: str) -> None:
    if path.exists() and any(path.iterdir()):
        raise InvalidArgument(what=what, detail=f"{path} exists and is not empty; "
                              "refusing to overwrite keys")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def init_authority(directory: Path, cluster: str = "cargohold") -> None:
    """Make a cluster CA and a cluster key in ``directory`` (new or empty)."""
    _new_dir(directory, "pki init")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} cluster CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cargohold")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + CA_YEARS * 365 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write(directory / CA_KEY, _pem_key(key), 0o600)
    _write(directory / CLUSTER_KEY, secrets.token_hex(32).encode() + b"\n", 0o600)
    _write(directory / CA_CERT, _pem_cert(cert), 0o644)


def _alt_names(name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The node's name and every host name or address it is reached by (HTTPS clients check
    the one they connect to)."""
    found: list[x509.GeneralName] = [x509.DNSName(name)]
    for host in hosts:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in found:
            found.append(entry)
    return found


def issue(authority: Path, name: str, out: Path, hosts: Sequence[str] = ()) -> None:
    """Write the credentials of node ``name`` into ``out`` (new or empty), signed by the CA
    in ``authority``; ``hosts``: more names and addresses its certificate holds."""
    if not name or any(c.isspace() or c in "/\\" for c in name) or len(name) > 64:
        raise InvalidArgument(what="node name", detail=f"{name!r}: 1-64 characters, no "
                              "spaces or slashes")
    try:
        ca_key = serialization.load_pem_private_key((authority / CA_KEY).read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((authority / CA_CERT).read_bytes())
        cluster_key = (authority / CLUSTER_KEY).read_bytes()
    except (OSError, ValueError) as e:
        raise InvalidArgument(what="pki authority", detail=f"{authority}: {e}; make one with "
                              "`cargohold pki init`") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(what="pki authority", detail=f"{authority / CA_KEY}: not an EC key")
    _new_dir(out, "pki issue")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                        "node")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + NODE_YEARS * 365 * _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(_alt_names(name, hosts)), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(out / NODE_KEY, _pem_key(key), 0o600)
    _write(out / CLUSTER_KEY, cluster_key, 0o600)
    _write(out / NODE_CERT, _pem_cert(cert), 0o644)
    shutil.copyfile(authority / CA_CERT, out / CA_CERT)


@dataclass(frozen=True)
class Credentials:
    """One node's TLS files and the cluster key, checked to belong together."""

    ca: Path
    cert: Path
    key: Path
    cluster_key: bytes
    name: str  # the certificate's common name: the node it was issued to
    ca_fingerprint: str  # SHA-256 of the CA certificate (DER), hex

    @classmethod
    def load(cls, ca: Path, cert: Path, key: Path, cluster_key: Path) -> Credentials:
        """Read and check: the certificate is signed by the CA and matches the key; the
        cluster key is 32 bytes or more; secrets are not readable by others."""
        what = "TLS credentials"
        try:
            ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
            own = x509.load_pem_x509_certificate(cert.read_bytes())
            private = serialization.load_pem_private_key(key.read_bytes(), None)
            secret = bytes.fromhex(cluster_key.read_text().strip())
        except (OSError, ValueError) as e:
            raise InvalidArgument(what=what, detail=str(e)) from None
        for path in (key, cluster_key):
            check_private(path, what)
        if len(secret) < 32:
            raise InvalidArgument(what=what, detail=f"{cluster_key}: a cluster key is 32 "
                                  "random bytes or more, as hex")
        try:
            own.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise InvalidArgument(what=what, detail=f"{cert} is not signed by the CA in "
                                  f"{ca}") from None
        if private.public_key().public_numbers() != own.public_key().public_numbers():  # type: ignore[union-attr]
            raise InvalidArgument(what=what, detail=f"{key} is not the key of {cert}")
        names = own.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            raise InvalidArgument(what=what, detail=f"{cert} names no node (no common name)")
        fingerprint = hashlib.sha256(ca_cert.public_bytes(serialization.Encoding.DER))
        return cls(ca=ca, cert=cert, key=key, cluster_key=secret, name=str(names[0].value),
                   ca_fingerprint=fingerprint.hexdigest())

    @classmethod
    def from_dir(cls, directory: Path) -> Credentials:
        """The credentials in a directory made by ``issue``."""
        return cls.load(directory / CA_CERT, directory / NODE_CERT, directory / NODE_KEY,
                        directory / CLUSTER_KEY)

    @property
    def key_id(self) -> str:
        """Names the cluster key without revealing it (nodes compare it at start)."""
        return hashlib.sha256(b"cargohold cluster key id\0" + self.cluster_key).hexdigest()[:16]

    def client_context(self) -> ssl.SSLContext:
        return client_context(self.ca, self.cert, self.key)


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3 serving, asking every client for a certificate of the cluster CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3 to a peer whose certificate, of the cluster CA, names the node expected
    (``server_hostname``); this host's certificate is shown in return."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the name and the chain
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    return context


def ensure_own(state_dir: Path, name: str, hosts: Sequence[str] = ()) -> tuple[Path, bool]:
    """The credentials directory of a node started without any (``STATE_DIR/tls``), made
    with a new cluster CA (``STATE_DIR/pki``) on first start; also whether it was made now.
    Its certificate holds ``hosts``, this host's name, ``localhost`` and the loopback
    addresses besides the node's name."""
    creds, authority = state_dir / "tls", state_dir / "pki"
    if (creds / NODE_CERT).exists():
        return creds, False
    if not (authority / CA_KEY).exists():
        init_authority(authority)
    issue(authority, name, creds,
          [*hosts, socket.gethostname(), "localhost", "127.0.0.1", "::1"])
    return creds, True
