"""The object-store adapter: ``LLMOS_STORAGE_URL=s3://BUCKET/PREFIX`` on boto3 (AWS S3, MinIO, Ceph).

Importing this module installs it for `domain.storage` (as `infra.broker` installs the task publisher);
credentials come from boto3's usual chain (the ``AWS_*`` variables, a profile, an instance role).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from domain import storage


class S3ObjectStore:
    """One bucket and key prefix, through one boto3 client (thread-safe; shared by a process's threads)."""

    def __init__(self, url: str, endpoint_url: str | None) -> None:
        import boto3
        from botocore.config import Config

        bucket, _, prefix = url.removeprefix(storage.S3_SCHEME).partition("/")
        if not bucket:
            raise storage.StorageError(f"LLMOS_STORAGE_URL={url!r} names no bucket; expected s3://BUCKET/PREFIX")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.client: Any = boto3.client(
            "s3", endpoint_url=endpoint_url,
            # Transient 5xx and throttling are retried by botocore; a dead endpoint fails within seconds.
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )

    def _where(self) -> str:
        return f"bucket '{self.bucket}'" + (f" at LLMOS_S3_ENDPOINT_URL={self.endpoint_url}" if self.endpoint_url
                                            else " on AWS (LLMOS_S3_ENDPOINT_URL unset)")

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise storage.StorageError(
                f"LLMOS_STORAGE_URL: no credentials for {self._where()}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
        except EndpointConnectionError as exc:
            raise storage.StorageError(f"LLMOS_STORAGE_URL: cannot reach {self._where()}: {exc}") from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise storage.StorageError(
                    f"LLMOS_STORAGE_URL: {self._where()} does not exist; create it or fix the URL") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise storage.StorageError(
                    f"LLMOS_STORAGE_URL: {self._where()} refused these credentials ({code}); check "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
            raise storage.StorageError(f"LLMOS_STORAGE_URL: {self._where()} answered {code}: {exc}") from None
        except BotoCoreError as exc:
            raise storage.StorageError(f"LLMOS_STORAGE_URL: {self._where()} cannot be used: {exc}") from None

    def upload(self, local: Path, key: str) -> None:
        self.client.upload_file(str(local), self.bucket, key)

    def download(self, key: str, local: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, key, str(local))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey"):
                raise FileNotFoundError(f"{storage.S3_SCHEME}{self.bucket}/{key}") from None
            raise

    def list_objects(self, prefix: str) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found.extend((item["Key"], int(item["Size"])) for item in page.get("Contents", []))
        return found

    def delete(self, keys: list[str]) -> None:
        # DeleteObjects takes at most 1000 keys a call.
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})


storage.use_object_store(S3ObjectStore)
