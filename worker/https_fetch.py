"""`https://` inputs from the hosts an operator allows: the allow-list, no internal address (IPv4 carried inside
IPv6 included) and a connection to the very address checked (a name that resolves again to another, DNS rebinding,
is never asked twice), one GET without redirects, bounded in time (a watchdog shuts the socket) and in size."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import SplitResult, urlsplit

from .errors import InputForbidden, InputNotFound, InvalidRequest, StorageError
from .redaction import redacted_reference
from .retries import with_retries
from .settings import Settings


def fetch_https(settings: Settings, ref: str, field: str) -> bytes:
    """An `https://` input from a host on `INPAINT_HTTP_ALLOW` that leads to no internal address: one GET, no
    redirects, at most `INPAINT_INPUT_MAX_BYTES` within HTTPS_FETCH_TIMEOUT_S, passing server trouble tried again."""
    shown = redacted_reference(ref)  # signed URLs carry their signature in the query
    parts = parse_https(ref, field, shown)
    host = parts.hostname or ""
    if host not in settings.http_allow:
        raise InputForbidden(f"{field}: host {host!r} is not on the allow-list (INPAINT_HTTP_ALLOW)", field=field)
    address = public_addresses(host, field)[0]  # connected to as checked: the name is not resolved again
    deadline = time.monotonic() + HTTPS_FETCH_TIMEOUT_S

    def get() -> bytes:
        status, data = https_get(parts, address, field, shown, deadline, settings.input_max_bytes)
        if 200 <= status < 300:
            return data
        if status == 404:
            raise InputNotFound(f"{field}: {shown} answered 404", field=field)
        if 300 <= status < 400:
            raise InputForbidden(f"{field}: {shown} answered HTTP {status}; redirects are not followed",
                                 field=field)
        if status in HTTPS_RETRIED_STATUSES or status >= 500:
            raise ServerTrouble(status)
        raise InputForbidden(f"{field}: {shown} answered HTTP {status}", field=field)

    return with_retries(settings, f"{field}: fetching {shown}", get, server_trouble, field, deadline)




class ServerTrouble(Exception):
    """An https answer that another try may change: 5xx, 408, 429 (the server's passing trouble)."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")


def server_trouble(error: Exception) -> str | None:
    return str(error) if isinstance(error, ServerTrouble) else None


# a whole https download, however slowly the server sends it (the socket timeout bounds each read only)
HTTPS_FETCH_TIMEOUT_S = 60.0
HTTPS_READ_TIMEOUT_S = 30.0  # connecting, or waiting for the next bytes
HTTPS_CHUNK_BYTES = 64 * 1024
HTTPS_RETRIED_STATUSES = {408, 429}  # and every 5xx: the server's passing trouble, not the request's


def parse_https(ref: str, field: str, shown: str) -> SplitResult:
    """An https URL that can be sent as it is; anything else is the request's mistake, told without its query."""
    bad = next((index for index, char in enumerate(ref) if not "!" <= char <= "~"), None)
    if bad is not None:
        raise InvalidRequest(field, f"{shown!r} is not a valid URL: character {bad + 1} is a space, a control "
                             "character or not ASCII; percent-encode it (a space is %20)")
    try:
        parts = urlsplit(ref)
        _ = parts.port  # raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        raise InvalidRequest(field, f"{shown!r} is not a valid URL: its host or port cannot be read (a port is "
                             "a number up to 65535)") from None
    if not parts.hostname:
        raise InvalidRequest(field, f"{shown!r} is not a valid URL: it names no host")
    return parts


def https_get(parts: SplitResult, address: str, field: str, shown: str, deadline: float,
              max_bytes: int) -> tuple[int, bytes]:
    """One GET to `address`, no redirects followed: the status, and for a 2xx the whole body, checked against
    Content-Length. TLS (the certificate checked, SNI) and the Host header name the URL's host."""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPSConnection(parts.hostname or "", parts.port or 443,
                                             timeout=time_left(deadline, field, shown),
                                             context=ssl.create_default_context())
    connection._create_connection = lambda host_port, *args: socket.create_connection((address, host_port[1]), *args)
    chunks: list[bytes] = []
    held: list[socket.socket] = []  # getresponse() drops the socket from the connection when the server will close
    # at the deadline the socket is shut, whatever the fetch is waiting for: a per-read timeout alone lets a server
    # that sends its headers (or its TLS handshake) a byte at a time hold the worker for as long as it likes
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), shut, args=(connection, held))
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request("GET", target, headers={"User-Agent": "qwen-inpaint-worker"})
        sock = connection.sock
        held.append(sock)
        sock.settimeout(time_left(deadline, field, shown))
        response = connection.getresponse()
        if not 200 <= response.status < 300:
            return response.status, b""
        expected = response.length  # Content-Length, when the server sent one
        if expected is not None and expected > max_bytes:
            raise InvalidRequest(field, f"{shown} is {expected} bytes, over the {max_bytes}-byte cap")
        received = 0
        while True:
            sock.settimeout(time_left(deadline, field, shown))
            chunk = response.read1(HTTPS_CHUNK_BYTES)  # what has arrived, not a full chunk: a trickle is seen
            if not chunk:
                break
            received += len(chunk)
            if received > max_bytes:
                raise InvalidRequest(field, f"{shown} is over the {max_bytes}-byte cap")
            chunks.append(chunk)
    except (OSError, http.client.HTTPException, ValueError) as error:  # str(error) may quote the URL
        if time.monotonic() >= deadline:
            raise too_slow(field, shown) from None
        if isinstance(error, TimeoutError):
            raise StorageError(f"{field}: fetching {shown} failed: no data for {HTTPS_READ_TIMEOUT_S:g} s",
                               field=field) from None
        raise StorageError(f"{field}: fetching {shown} failed: {type(error).__name__}", field=field) from None
    finally:
        watchdog.cancel()
        connection.close()
    if time.monotonic() >= deadline:  # the watchdog shut the socket: what came is cut short
        raise too_slow(field, shown)
    if expected is not None and received < expected:
        raise StorageError(f"{field}: fetching {shown} failed: the connection closed after {received} of {expected} "
                           "bytes", field=field)
    return response.status, b"".join(chunks)


def shut(connection: http.client.HTTPSConnection, held: list[socket.socket]) -> None:
    """Wake whatever read or handshake is waiting on the fetch's socket: it fails at once."""
    for sock in {connection.sock, *held} - {None}:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # closed already, or never connected
            pass


def time_left(deadline: float, field: str, shown: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise too_slow(field, shown)
    return min(left, HTTPS_READ_TIMEOUT_S)


def too_slow(field: str, shown: str) -> StorageError:
    return StorageError(f"{field}: fetching {shown} took over {HTTPS_FETCH_TIMEOUT_S:g} s; gave up", field=field)


def public_addresses(host: str, field: str) -> list[str]:
    """The addresses `host` resolves to, in the resolver's order, when none leads inside: an allowed name must still
    not lead to loopback, link-local (cloud metadata), private or reserved addresses."""
    try:
        addresses = list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, 443,
                                                                                 proto=socket.IPPROTO_TCP)))
    except OSError as error:
        raise InputNotFound(f"{field}: cannot resolve {host!r}: {error}", field=field) from None
    for address in addresses:
        refuse_internal(host, address, field)
    return addresses


def refuse_internal(host: str, address: str, field: str) -> None:
    """`InputForbidden` when `address`, or an IPv4 address it carries, is not a public one."""
    import ipaddress

    ip = ipaddress.ip_address(address.split("%")[0])
    for carried in (ip, *embedded_ipv4(ip)):
        if not carried.is_global or getattr(carried, "is_site_local", False):  # fec0::/10: deprecated, not public
            also = f" (it carries {carried})" if carried != ip else ""
            raise InputForbidden(f"{field}: {host!r} resolves to {ip}{also}, an internal address", field=field)


# the last 32 bits are an IPv4 address: RFC 6052's well-known NAT64 prefix, RFC 8215's local-use one, SIIT's (RFC 6052)
IPV4_IN_LAST_32 = ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96")


def embedded_ipv4(ip: Any) -> list[Any]:
    """The IPv4 addresses an IPv6 address leads to by translation or tunnelling: IPv4-mapped and -compatible, NAT64,
    6to4 and Teredo (its client address; the server's too). A gateway would take `[64:ff9b::a00:5]` to 10.0.0.5."""
    import ipaddress

    if ip.version != 6:
        return []
    last32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    carried = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if int(ip) >> 32 == 0 or any(ip in ipaddress.ip_network(prefix) for prefix in IPV4_IN_LAST_32):
        carried.append(last32)  # ::a.b.c.d (IPv4-compatible), NAT64's and SIIT's
    return [address for address in carried if address is not None]
