"""S3 through boto3: reading `s3://` and allowed `https://` inputs, writing a job's outputs, presigned URLs.

Endpoint and credentials come from the environment (`INPAINT_S3_ENDPOINT_URL`, the standard
`AWS_*` variables), never from a request. Transient failures are retried with backoff;
a missing object or a forbidden bucket is not.
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import ssl
import threading
import time
from typing import Any, TypeVar
from urllib.parse import SplitResult, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from .errors import InputForbidden, InputNotFound, InvalidRequest, StorageError
from .inputs import read_data_url
from .redaction import redacted_reference
from .retries import with_retries
from .schema import JOB_ID_PATTERN
from .settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
# the worker's own credentials refused: the operator's problem, not the request's
CREDENTIALS_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                       "TokenRefreshRequired", "InvalidClientTokenId"}
FORBIDDEN = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def s3_client(settings: Settings) -> Any:
    # a try waits at most 5 s to connect and 30 s for each reply (a PUT may wait twice: 100-continue, then the answer)
    config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                    signature_version="s3v4")
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


def parse_s3(ref: str, field: str) -> tuple[str, str]:
    """The bucket, and the key: everything after the bucket's slash, byte for byte (an S3 key may hold '#', '?',
    '%', spaces and '//'; URL parsing would cut or decode them and read another object)."""
    bucket, _, key = ref[len("s3://"):].partition("/")
    if ref[:5].lower() != "s3://" or not bucket or not key:
        raise InvalidRequest(field, f"{redacted_reference(ref)!r} is not s3://bucket/key")
    return bucket, key


def s3_trouble(error: Exception) -> str | None:
    """What went wrong when another try may help (connection errors, timeouts, 5xx); None when it cannot."""
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code"))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return None if code in NOT_FOUND or code in FORBIDDEN or status < 500 else f"{code} (HTTP {status})"
    if isinstance(error, NoCredentialsError):  # no try would find them
        return None
    return type(error).__name__ if isinstance(error, BotoCoreError) else None


class StorageFetcher:
    """Inputs for queued jobs: `s3://` from allowed buckets, `data:` URLs, `https://` from allowed hosts."""

    def __init__(self, settings: Settings, client: Any | None = None):
        self.settings = settings
        self.client = client or s3_client(settings)

    def fetch(self, ref: str, field: str) -> bytes:
        scheme = ref.split(":", 1)[0].lower() if ":" in ref else ""
        if scheme == "data":
            return read_data_url(ref, field, self.settings.data_url_max_bytes)
        if scheme == "s3":
            return self._fetch_s3(ref, field)
        if scheme == "https":
            return self._fetch_https(ref, field)
        raise InputForbidden(f"{field}: {scheme + ':' if scheme else 'local path'} references are not accepted; "
                             "use s3://bucket/key, a data: URL, or https:// on an allowed host", field=field)

    def _fetch_s3(self, ref: str, field: str) -> bytes:
        shown = redacted_reference(ref)  # a query (a copied presigned URL's signature) is not shown
        bucket, key = parse_s3(ref, field)
        if bucket not in self.settings.input_buckets:
            raise InputForbidden(f"{field}: bucket {bucket!r} is not one this worker reads "
                                 "(INPAINT_INPUT_BUCKETS)", field=field)

        def get() -> bytes:
            response = self.client.get_object(Bucket=bucket, Key=key)
            if response["ContentLength"] > self.settings.input_max_bytes:
                response["Body"].close()
                raise InvalidRequest(field, f"object is {response['ContentLength']} bytes, over the "
                                     f"{self.settings.input_max_bytes}-byte cap")
            return response["Body"].read()

        try:
            return with_retries(self.settings, f"{field}: reading {shown}", get, s3_trouble, field=field)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code"))
            if code in NOT_FOUND:
                raise InputNotFound(f"{field}: no object at {shown}", field=field) from None
            if code in CREDENTIALS_REFUSED:
                raise StorageError(f"{field}: reading {shown}: S3 refused this worker's credentials ({code}); "
                                   "the operator's S3 settings need fixing", field=field) from None
            raise InputForbidden(f"{field}: reading {shown} was refused ({code})", field=field) from None

    def _fetch_https(self, ref: str, field: str) -> bytes:
        shown = redacted_reference(ref)  # signed URLs carry their signature in the query
        parts = parse_https(ref, field, shown)
        host = parts.hostname or ""
        if host not in self.settings.http_allow:
            raise InputForbidden(f"{field}: host {host!r} is not on the allow-list (INPAINT_HTTP_ALLOW)", field=field)
        refuse_internal_address(host, field)
        deadline = time.monotonic() + HTTPS_FETCH_TIMEOUT_S

        def get() -> bytes:
            status, data = https_get(parts, field, shown, deadline, self.settings.input_max_bytes)
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

        return with_retries(self.settings, f"{field}: fetching {shown}", get, server_trouble, field, deadline)


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


def https_get(parts: SplitResult, field: str, shown: str, deadline: float, max_bytes: int) -> tuple[int, bytes]:
    """One GET, no redirects followed: the status, and for a 2xx the whole body, checked against Content-Length."""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPSConnection(parts.hostname or "", parts.port or 443,
                                             timeout=time_left(deadline, field, shown),
                                             context=ssl.create_default_context())
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


def refuse_internal_address(host: str, field: str) -> None:
    """An allowed name must still not lead inside: loopback, link-local (cloud metadata), private, reserved."""
    import ipaddress

    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP)}
    except OSError as error:
        raise InputNotFound(f"{field}: cannot resolve {host!r}: {error}", field=field) from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        for carried in (ip, *embedded_ipv4(ip)):
            if not carried.is_global:
                also = f" (it carries {carried})" if carried != ip else ""
                raise InputForbidden(f"{field}: {host!r} resolves to {ip}{also}, an internal address", field=field)


NAT64_PREFIXES = ("64:ff9b::/96", "64:ff9b:1::/48")  # RFC 6052's well-known prefix, RFC 8215's local-use one


def embedded_ipv4(ip: Any) -> list[Any]:
    """The IPv4 addresses an IPv6 address leads to by translation or tunnelling: IPv4-mapped and -compatible, NAT64,
    6to4 and Teredo (its client address; the server's too). A gateway would take `[64:ff9b::a00:5]` to 10.0.0.5."""
    import ipaddress

    if ip.version != 6:
        return []
    last32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    carried = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if int(ip) >> 32 == 0 or any(ip in ipaddress.ip_network(prefix) for prefix in NAT64_PREFIXES):
        carried.append(last32)  # ::a.b.c.d (IPv4-compatible), and NAT64's
    return [address for address in carried if address is not None]


class S3Sink:
    """Writes `{prefix}/{job_id}/{name}`: a redelivered job overwrites its own objects, never adds new ones."""

    def __init__(self, settings: Settings, job_id: str, bucket: str, prefix: str, client: Any | None = None):
        if not re.fullmatch(JOB_ID_PATTERN, job_id):  # a plain send_task's id: no '/' or '..' into another's keys
            raise InvalidRequest("job_id", f"the task's id {job_id!r:.80} must match {JOB_ID_PATTERN} (it names the "
                                 "job's objects in S3)")
        self.settings, self.bucket = settings, bucket
        self.prefix = f"{prefix.strip('/')}/{job_id}" if prefix.strip("/") else job_id
        self.client = client or s3_client(settings)

    def put(self, name: str, data: bytes, content_type: str) -> tuple[str, str | None]:
        key = f"{self.prefix}/{name}"
        try:
            with_retries(self.settings, f"writing s3://{self.bucket}/{key}",
                         lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                                        ContentType=content_type), s3_trouble)
        except ClientError as error:
            raise StorageError(f"writing s3://{self.bucket}/{key} was refused: "
                               f"{error.response.get('Error', {}).get('Code')}") from None
        url = self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                 ExpiresIn=self.settings.presign_expiry_s)
        return f"s3://{self.bucket}/{key}", url

    def delete(self, names: list[str]) -> None:
        """Remove what a failed job stored (one request, one try): a failure is the caller's to log."""
        objects = [{"Key": f"{self.prefix}/{name}"} for name in names]
        answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        if answer.get("Errors"):
            raise StorageError(f"deleting from s3://{self.bucket}/{self.prefix}/ failed: "
                               f"{sorted({error.get('Code') for error in answer['Errors']})}")
