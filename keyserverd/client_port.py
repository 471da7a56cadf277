"""Settings of the key server's client port: the TLS server context, a
client's identity, TCP keepalive, the connection caps, and asyncio's TLS read
buffer (peering)."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from .ca import CertificateAuthority

#: The read buffer of each asyncio TLS connection (peering; clients use ``tls_link``).
#: asyncio's default (256 KiB, made and zeroed per connection) was most of a
#: connection's memory; a TLS record holds at most 16 KiB.
TLS_READ_BUFFER_BYTES = 32 * 1024
#: TCP keepalive: first probe after this much silence, then every
#: ``KEEPALIVE_INTERVAL_S``; ``KEEPALIVE_PROBES`` unanswered ones end the connection.
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 6


@dataclass(frozen=True)
class ConnectionLimits:
    """Caps on client connections (``server``'s module docstring, 6)."""

    #: Connections open at once, TLS handshakes included.
    max_connections: int = 4096
    #: Connections one certificate ID may hold at once.
    max_connections_per_host: int = 8
    #: Connections without a client certificate open at once (after the handshake).
    max_unauthenticated_connections: int = 256
    #: Seconds a connection without a client certificate may stay open in all.
    unauth_deadline_s: float = 30.0


def shrink_tls_buffers(size: int = TLS_READ_BUFFER_BYTES) -> None:
    """Make every asyncio TLS connection of this process (peering) read through a
    ``size`` buffer (``asyncio.sslproto.SSLProtocol.max_size``; keyserverd calls it at start)."""
    from asyncio import sslproto

    if getattr(sslproto.SSLProtocol, "max_size", 0) > size:
        sslproto.SSLProtocol.max_size = size


def set_keepalive(sock) -> None:
    """Turn on TCP keepalive with the short timers above (best effort)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    except (OSError, AttributeError):
        pass


def make_server_ssl_context(ca: CertificateAuthority) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_cert_chain(ca.server_cert_path, ca.server_key_path)
    ctx.load_verify_locations(cafile=str(ca.ca_cert_path))
    return ctx


def identity_of(peercert: dict | None) -> str | None:
    """The CN of a verified peer certificate (``SSLSocket.getpeercert()``), or None."""
    for rdn in (peercert or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return None
