"""A throw-away certificate authority for TLS tests, made with ``openssl``.

Tests of TLS must talk to real servers with real certificates; generating
them per test session (instead of committing keys to the repository) means
nothing secret ever lands in git and nothing expires under us. The
``openssl`` command line is used because it is on every Debian machine and
needs no extra Python dependency.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TestPki:
    """Paths of one CA and the server and client pairs it signed."""

    __test__ = False  # not a pytest test class despite the name

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _signed_pair(directory: Path, name: str, subject: str,
                 extensions: str) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}.key", directory / f"{name}.csr",
                      directory / f"{name}.crt")
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout",
             str(key), "-out", str(csr), "-subj", subject, cwd=directory)
    _openssl("x509", "-req", "-in", str(csr), "-CA", "ca.crt", "-CAkey",
             "ca.key", "-CAcreateserial", "-days", "2", "-sha256",
             "-extfile", str(ext), "-out", str(cert), cwd=directory)
    return cert, key


def make_test_pki(directory: Path) -> TestPki:
    """A CA, a server certificate valid for 127.0.0.1 and localhost, and a
    client certificate (for servers that require client certificates)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl not found; install the Debian package "
                           "'openssl'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", "ca.key", "-out", "ca.crt",
             "-subj", "/CN=ares-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    server_cert, server_key = _signed_pair(
        directory, "server", "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth,clientAuth\n")
    # No CommonName: etcd's JSON gateway refuses client certificates that
    # carry one while auth is enabled (the user comes from the token).
    client_cert, client_key = _signed_pair(
        directory, "client", "/O=ares-client",
        "extendedKeyUsage=clientAuth\n")
    return TestPki(directory / "ca.crt", server_cert, server_key,
                   client_cert, client_key)
