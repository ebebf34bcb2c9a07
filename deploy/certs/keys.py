"""Fallback of generate.sh and node-keys.sh where openssl / ssh-keygen are missing: the same files
made with `cryptography` (a Flower dependency, so present wherever spikefed is installed).

    python deploy/certs/keys.py tls DIR HOST...     # ca.crt ca.key server.pem server.key
    python deploy/certs/keys.py node-key PATH       # PATH (OpenSSH ECDSA P-384) and PATH.pub
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, private: bool) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def tls(out: Path, hosts: list[str], days: int) -> None:
    """A CA and a server certificate it signs for `hosts` (ECDSA P-256, SHA-256)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spikefed CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server.key", _pem_key(key), private=True)
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)


def node_key(path: Path) -> None:
    """An ECDSA P-384 key pair in OpenSSH format, as `ssh-keygen -t ecdsa -b 384` writes it."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write(path.with_name(path.name + ".pub"), public + f" spikefed {path.name}\n".encode(),
           private=False)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "tls":
        tls(Path(sys.argv[2]), sys.argv[3:], int(os.environ.get("SPIKEFED_CERT_DAYS", "365")))
    elif len(sys.argv) == 3 and sys.argv[1] == "node-key":
        node_key(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
