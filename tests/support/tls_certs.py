"""Certificates for the TLS tests, made with the ``openssl`` command.

:func:`make_pki` writes, under a directory: a CA, the agent's server
certificate signed by it (for 127.0.0.1, ::1 and localhost), HAProxy's client
certificate signed by it (``haproxy.pem`` holds certificate and key, as
HAProxy's ``crt`` wants), and a second CA with a client certificate of its
own (a client the agent must refuse). EC P-256 keys: quick to make and to
handshake with.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl")
DAYS = "30"


def need_openssl() -> str:
    if OPENSSL is None:
        pytest.skip("the openssl command is not installed (apt-get install openssl)")
    return OPENSSL


@dataclass(frozen=True)
class PKI:
    ca: Path  # the CA both sides trust
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    haproxy_pem: Path  # client certificate + key in one file (HAProxy's crt)
    other_ca: Path  # an unrelated CA
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path
    other_haproxy_pem: Path


def _run(*args: str) -> None:
    subprocess.run([need_openssl(), *args], check=True, capture_output=True, timeout=60)


def _key(path: Path) -> None:
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _key(key)
    _run(
        "req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", DAYS,
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def make_cert(
    directory: Path, name: str, ca: tuple[Path, Path], *, server: bool, days: str = DAYS
) -> tuple[Path, Path]:
    """A certificate signed by `ca`: (certificate, key)."""
    cert, key, csr = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    ext = directory / f"{name}.ext"
    _key(key)
    _run("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    usage = "serverAuth" if server else "clientAuth"
    lines = [f"extendedKeyUsage={usage}", "basicConstraints=CA:FALSE"]
    if server:
        lines.append("subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost")
    ext.write_text("\n".join(lines) + "\n")
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", days, "-extfile", str(ext),
    )  # fmt: skip
    return cert, key


def combined(cert: Path, key: Path, out: Path) -> Path:
    out.write_bytes(cert.read_bytes() + key.read_bytes())
    return out


def make_pki(directory: Path) -> PKI:
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory, "ca")
    server = make_cert(directory, "agent", ca, server=True)
    client = make_cert(directory, "haproxy", ca, server=False)
    other = make_ca(directory, "other-ca")
    other_client = make_cert(directory, "intruder", other, server=False)
    return PKI(
        ca=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        haproxy_pem=combined(*client, directory / "haproxy-client.pem"),
        other_ca=other[0],
        other_client_cert=other_client[0],
        other_client_key=other_client[1],
        other_haproxy_pem=combined(*other_client, directory / "intruder-client.pem"),
    )
