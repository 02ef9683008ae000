"""Throwaway X.509 material for the NBD TLS tests, made with openssl.

``make_pki(dir)`` writes, in the layout libnbd (``tls-certificates=DIR``) and
qemu (``tls-creds-x509,dir=DIR``) read:

    server/   ca-cert.pem, server-cert.pem, server-key.pem   (the agent's side)
    client/   ca-cert.pem, client-cert.pem, client-key.pem   (a trusted client)
    anon/     ca-cert.pem                                     (trusts the server, no certificate)
    wrong-ca/ ca-cert.pem (another CA), client-cert.pem, client-key.pem (signed by that CA)

The server certificate is for 127.0.0.1 and localhost.  Keys are mode 0600.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require_tool


@dataclass(frozen=True)
class Pki:
    root: Path

    @property
    def server(self) -> Path:
        return self.root / "server"

    @property
    def cert(self) -> Path:
        return self.server / "server-cert.pem"

    @property
    def key(self) -> Path:
        return self.server / "server-key.pem"

    @property
    def ca(self) -> Path:
        return self.server / "ca-cert.pem"

    @property
    def client(self) -> Path:
        return self.root / "client"

    @property
    def anon(self) -> Path:
        return self.root / "anon"

    @property
    def wrong_ca(self) -> Path:
        return self.root / "wrong-ca"


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    return cert, key


def _leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr = directory / f"{name}-cert.pem", directory / f"{name}-key.pem", directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", ext)
    key.chmod(0o600)
    return cert, key


def make_pki(root: Path) -> Pki:
    require_tool("openssl")
    work = root / "work"
    work.mkdir(parents=True)
    ca = _ca(work, "test-ca")
    other_ca = _ca(work, "other-ca")
    server = _leaf(work, "server", ca, "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                   "keyUsage=digitalSignature\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    client = _leaf(work, "client", ca, "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
                   "keyUsage=digitalSignature\n")
    stranger = _leaf(work, "stranger", other_ca, "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
                     "keyUsage=digitalSignature\n")
    layout = {
        "server": {"ca-cert.pem": ca[0], "server-cert.pem": server[0], "server-key.pem": server[1]},
        "client": {"ca-cert.pem": ca[0], "client-cert.pem": client[0], "client-key.pem": client[1]},
        "anon": {"ca-cert.pem": ca[0]},
        "wrong-ca": {"ca-cert.pem": other_ca[0], "client-cert.pem": stranger[0],
                     "client-key.pem": stranger[1]},
    }
    for name, files in layout.items():
        directory = root / name
        directory.mkdir(mode=0o700)
        for target, source in files.items():
            shutil.copy(source, directory / target)
            (directory / target).chmod(0o600 if "key" in target else 0o644)
    return Pki(root)
