"""S3 through boto3 (reading `s3://` inputs, writing a job's outputs, presigned URLs), and the queue's input
fetcher: `s3://`, `data:`, and `https://` from allowed hosts (worker.https_fetch).

Endpoint and credentials come from the environment (`INPAINT_S3_ENDPOINT_URL`, the standard
`AWS_*` variables), never from a request. Transient failures are retried with backoff;
a missing object or a forbidden bucket is not.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from .errors import InputForbidden, InputNotFound, InvalidRequest, StorageError
from .https_fetch import fetch_https
from .inputs import read_data_url
from .redaction import redacted_reference
from .retries import with_retries
from .schema import JOB_ID_PATTERN
from .settings import Settings

log = logging.getLogger(__name__)
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


def s3_presigner(settings: Settings, client: Any | None = None) -> Any:
    """The client that signs URLs for the S3 endpoint browsers reach: `client` (the workers' own) unless
    `INPAINT_S3_PUBLIC_ENDPOINT_URL` names another. A signature covers the host, so a URL cannot be signed for one
    name and rewritten to another. Signing makes no request."""
    if client is not None and not settings.s3_public_endpoint_url:
        return client
    return boto3.client("s3", endpoint_url=settings.s3_public_endpoint_url or settings.s3_endpoint_url,
                        config=Config(signature_version="s3v4"))


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
            return fetch_https(self.settings, ref, field)
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


class S3Sink:
    """Writes `{prefix}/{job_id}/{name}`: a redelivered job overwrites its own objects, never adds new ones."""

    def __init__(self, settings: Settings, job_id: str, bucket: str, prefix: str, client: Any | None = None,
                 presigner: Any | None = None):
        if not re.fullmatch(JOB_ID_PATTERN, job_id):  # a plain send_task's id: no '/' or '..' into another's keys
            raise InvalidRequest("job_id", f"the task's id {job_id!r:.80} must match {JOB_ID_PATTERN} (it names the "
                                 "job's objects in S3)")
        self.settings, self.bucket = settings, bucket
        self.prefix = f"{prefix.strip('/')}/{job_id}" if prefix.strip("/") else job_id
        self.client = client or s3_client(settings)
        self.presigner = presigner or s3_presigner(settings, self.client)

    def put(self, name: str, data: bytes, content_type: str) -> tuple[str, str | None]:
        key = f"{self.prefix}/{name}"
        try:
            with_retries(self.settings, f"writing s3://{self.bucket}/{key}",
                         lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                                        ContentType=content_type), s3_trouble)
        except ClientError as error:
            raise StorageError(f"writing s3://{self.bucket}/{key} was refused: "
                               f"{error.response.get('Error', {}).get('Code')}") from None
        url = self.presigner.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                    ExpiresIn=self.settings.presign_expiry_s)
        return f"s3://{self.bucket}/{key}", url

    def delete(self, names: list[str]) -> None:
        """Remove what a failed job stored (one request, one try): a failure is the caller's to log."""
        objects = [{"Key": f"{self.prefix}/{name}"} for name in names]
        answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        if answer.get("Errors"):
            raise StorageError(f"deleting from s3://{self.bucket}/{self.prefix}/ failed: "
                               f"{sorted({error.get('Code') for error in answer['Errors']})}")
