"""S3 through boto3: reading `s3://` and allowed `https://` inputs, writing a job's outputs, presigned URLs.

Endpoint and credentials come from the environment (`INPAINT_S3_ENDPOINT_URL`, the standard
`AWS_*` variables), never from a request. Transient failures are retried with backoff;
a missing object or a forbidden bucket is not.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .errors import InputForbidden, InputNotFound, InvalidRequest, StorageError
from .inputs import read_data_url
from .schema import redacted_reference
from .settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
# the worker's own credentials refused: the operator's problem, not the request's
CREDENTIALS_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                       "TokenRefreshRequired", "InvalidClientTokenId"}
FORBIDDEN = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def s3_client(settings: Settings) -> Any:
    config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                    signature_version="s3v4")
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


def parse_s3(ref: str, field: str) -> tuple[str, str]:
    parts = urlsplit(ref)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not bucket or not key:
        raise InvalidRequest(field, f"{ref!r} is not s3://bucket/key")
    return bucket, key


def with_retries(settings: Settings, what: str, call: Callable[[], T]) -> T:
    """Run an S3 call, retrying connection errors and 5xx with exponential backoff, a bounded number of times."""
    wait = settings.storage_backoff_s
    for attempt in range(1, settings.storage_attempts + 1):
        try:
            return call()
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code"))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in NOT_FOUND or code in FORBIDDEN or status < 500:
                raise
            problem = f"{code} (HTTP {status})"
        except BotoCoreError as error:  # endpoint unreachable, timeouts
            problem = type(error).__name__
        if attempt == settings.storage_attempts:
            raise StorageError(f"{what} failed after {attempt} tries: {problem}")
        log.warning("%s failed (%s); try %d of %d in %.1f s", what, problem, attempt + 1, settings.storage_attempts,
                    wait)
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


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
            return with_retries(self.settings, f"reading {ref}", get)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code"))
            if code in NOT_FOUND:
                raise InputNotFound(f"{field}: no object at {ref}", field=field) from None
            if code in CREDENTIALS_REFUSED:
                raise StorageError(f"{field}: reading {ref}: S3 refused this worker's credentials ({code}); "
                                   "the operator's S3 settings need fixing", field=field) from None
            raise InputForbidden(f"{field}: reading {ref} was refused ({code})", field=field) from None

    def _fetch_https(self, ref: str, field: str) -> bytes:
        host = urlsplit(ref).hostname or ""
        if host not in self.settings.http_allow:
            raise InputForbidden(f"{field}: host {host!r} is not on the allow-list (INPAINT_HTTP_ALLOW)", field=field)
        refuse_internal_address(host, field)
        opener = urllib.request.build_opener(NoRedirects)
        shown = redacted_reference(ref)  # signed URLs carry their signature in the query
        try:
            with opener.open(ref, timeout=30) as response:
                data = response.read(self.settings.input_max_bytes + 1)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise InputNotFound(f"{field}: {shown} answered 404", field=field) from None
            raise InputForbidden(f"{field}: {shown} answered HTTP {error.code}", field=field) from None
        except OSError as error:
            raise StorageError(f"{field}: fetching {shown} failed: {error}", field=field) from None
        if len(data) > self.settings.input_max_bytes:
            raise InvalidRequest(field, f"over the {self.settings.input_max_bytes}-byte cap")
        return data


def refuse_internal_address(host: str, field: str) -> None:
    """An allowed name must still not lead inside: loopback, link-local (cloud metadata), private, reserved."""
    import ipaddress
    import socket

    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP)}
    except OSError as error:
        raise InputNotFound(f"{field}: cannot resolve {host!r}: {error}", field=field) from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global:
            raise InputForbidden(f"{field}: {host!r} resolves to {ip}, an internal address", field=field)


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect could lead off the allow-list: refuse it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class S3Sink:
    """Writes `{prefix}/{job_id}/{name}`: a redelivered job overwrites its own objects, never adds new ones."""

    def __init__(self, settings: Settings, job_id: str, bucket: str, prefix: str, client: Any | None = None):
        self.settings, self.bucket = settings, bucket
        self.prefix = f"{prefix.strip('/')}/{job_id}" if prefix.strip("/") else job_id
        self.client = client or s3_client(settings)

    def put(self, name: str, data: bytes, content_type: str) -> tuple[str, str | None]:
        key = f"{self.prefix}/{name}"
        try:
            with_retries(self.settings, f"writing s3://{self.bucket}/{key}",
                         lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                                        ContentType=content_type))
        except ClientError as error:
            raise StorageError(f"writing s3://{self.bucket}/{key} was refused: "
                               f"{error.response.get('Error', {}).get('Code')}") from None
        url = self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                 ExpiresIn=self.settings.presign_expiry_s)
        return f"s3://{self.bucket}/{key}", url
