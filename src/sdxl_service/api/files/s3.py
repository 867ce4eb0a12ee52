"""Images answered as `url`, kept in S3 (or any S3-compatible store).

With several replicas behind one Kubernetes Service, the replica that answers
`GET /v1/images/files/{id}` is rarely the one that rendered the image, so the
files must live somewhere all replicas share: `SDXL_FILES_URL=s3://bucket/prefix`.
Credentials come from boto3's usual chain (`AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY`, an instance or pod role); `SDXL_S3_ENDPOINT_URL`
points it at MinIO, Ceph, R2 and the like. Only this module imports boto3, and
`open_file_store` imports it only when `SDXL_FILES_URL` is set.

Each object `<prefix>/<id>` carries its content type as `Content-Type` and its
expiry (unix seconds) as the user metadata `expires-at`. `get` enforces the
expiry exactly. `purge_expired` lists the prefix and reads every object's
metadata, one HEAD request per object, which is fine for housekeeping but not
what should keep the bucket small: also give the bucket a lifecycle rule that
expires objects under the prefix a day after creation (S3 lifecycle rules count
whole days, so they are the backstop, not the TTL), e.g.

    {"Rules": [{"ID": "sdxl-url-files", "Status": "Enabled",
                "Filter": {"Prefix": "<prefix>/"}, "Expiration": {"Days": 1}}]}
"""

from __future__ import annotations

import time
from urllib.parse import urlparse

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError

from .store import StoredFile, is_valid_file_id, new_file_id

EXPIRES_AT_KEY = "expires-at"
# DeleteObjects takes at most 1000 keys per call.
_DELETE_BATCH = 1000
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class S3FileStore:
    """FileStore on an S3 bucket; objects are `<prefix>/<id>`."""

    def __init__(self, client: BaseClient, bucket: str, prefix: str, ttl_seconds: float) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.ttl_seconds = ttl_seconds

    @classmethod
    def from_url(cls, url: str, ttl_seconds: float, endpoint_url: str | None = None) -> S3FileStore:
        """`s3://bucket` or `s3://bucket/some/prefix`."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"SDXL_FILES_URL must look like s3://bucket/prefix, got {url!r}")
        config = Config(
            # boto3 >= 1.36 adds CRC checksums to every upload by default, which
            # several S3-compatible stores reject; only send them where required.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": 3},
        )
        # An empty SDXL_S3_ENDPOINT_URL means "AWS itself", not an endpoint "".
        client = boto3.client("s3", endpoint_url=endpoint_url or None, config=config)
        return cls(client, parsed.netloc, parsed.path, ttl_seconds)

    def put(self, data: bytes, content_type: str) -> str:
        file_id = new_file_id()
        expires_at = time.time() + self.ttl_seconds
        self.client.put_object(
            Bucket=self.bucket,
            Key=self._key(file_id),
            Body=data,
            ContentType=content_type,
            Metadata={EXPIRES_AT_KEY: repr(expires_at)},
        )
        return file_id

    def get(self, file_id: str) -> StoredFile | None:
        if not is_valid_file_id(file_id):
            return None
        key = self._key(file_id)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _error_code(error) in _MISSING_CODES:
                return None
            raise
        body = response["Body"]
        expires_at = _expires_at(response.get("Metadata", {}))
        if expires_at is None:
            # Not written by this store: never serve it.
            body.close()
            return None
        if expires_at <= time.time():
            body.close()
            self.client.delete_object(Bucket=self.bucket, Key=key)
            return None
        data = body.read()
        content_type = response.get("ContentType") or "application/octet-stream"
        return StoredFile(data, content_type, expires_at)

    def purge_expired(self) -> int:
        now = time.time()
        expired: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key("")):
            for entry in page.get("Contents", []):
                key = entry["Key"]
                if not is_valid_file_id(key.rsplit("/", 1)[-1]):
                    continue
                try:
                    head = self.client.head_object(Bucket=self.bucket, Key=key)
                except ClientError as error:
                    if _error_code(error) in _MISSING_CODES:
                        continue  # another replica purged it first
                    raise
                expires_at = _expires_at(head.get("Metadata", {}))
                if expires_at is not None and expires_at <= now:
                    expired.append(key)
        for start in range(0, len(expired), _DELETE_BATCH):
            batch = expired[start : start + _DELETE_BATCH]
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
        return len(expired)

    def delete(self, file_id: str) -> None:
        if is_valid_file_id(file_id):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(file_id))

    def _key(self, file_id: str) -> str:
        return f"{self.prefix}/{file_id}" if self.prefix else file_id


def _expires_at(metadata: dict[str, str]) -> float | None:
    try:
        return float(metadata[EXPIRES_AT_KEY])
    except (KeyError, ValueError):
        return None


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))
