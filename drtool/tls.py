"""The TLS server context drtool's listeners use (the NBD export, the replica server, the
metrics endpoint): TLS 1.2 or later, a private key only its owner can read, client certificates
when a CA is given; and which listening addresses stay on this host (those need no TLS)."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat

from drtool.errors import UsageError


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """A server SSLContext from PEM files; a clear UsageError for each way they can be wrong."""
    try:
        mode = stat.S_IMODE(os.stat(key).st_mode)
    except OSError as exc:
        raise UsageError(f"cannot read --tls-key {key}: {exc.strerror}") from None
    if mode & 0o077:
        raise UsageError(f"TLS key {key} is mode {mode:04o}; it must be readable by its owner only "
                         f"(chmod 600 {key})")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load TLS CA certificate {ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (a wildcard such as 0.0.0.0
    or :: is not): a listener there is reachable from this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False  # binding will say what is wrong with it
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
