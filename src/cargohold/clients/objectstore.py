"""An S3-compatible object store under one bucket and prefix: the backup target's I/O.

boto3 in a pool of threads (its client is thread safe), so that many blocks are in flight
at once while the event loop goes on. Credentials are found as every AWS tool finds them
(environment, shared credentials file, profile); they are never passed through cargohold's
own records. Errors become cargohold's: a missing bucket, refused credentials, a target
that does not answer (after botocore's own retries), a missing object.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlparse

from cargohold.errors import (
    BackupBucketMissing,
    BackupCorrupt,
    BackupNotAuthorized,
    BackupTargetUnavailable,
    CargoholdError,
    InvalidArgument,
)

T = TypeVar("T")
#: An S3 bucket name (the rules S3 states, lower case: 3-63 characters).
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
#: Requests in flight at once (threads of the pool).
PARALLEL = 16
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden",
           "InvalidToken", "ExpiredToken", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def check_endpoint(endpoint: str) -> None:
    """An S3 server's URL: http(s)://HOST[:PORT] ("" is AWS)."""
    if not endpoint:
        return
    try:
        parsed = urlparse(endpoint)
        port = parsed.port
    except ValueError:
        parsed, port = None, None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname or \
            parsed.path not in ("", "/") or parsed.query or parsed.fragment or port == 0:
        raise InvalidArgument(what="endpoint", detail=f"{endpoint!r} is not "
                              "http(s)://HOST[:PORT]")


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://BUCKET[/PREFIX]``; the prefix ends with ``/`` (or is
    empty)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not BUCKET.fullmatch(parsed.netloc) or parsed.query or \
            parsed.fragment or parsed.params:
        raise InvalidArgument(what="backup target", detail=f"{url!r} is not "
                              "s3://BUCKET[/PREFIX]")
    prefix = parsed.path.strip("/")
    if not re.fullmatch(r"[A-Za-z0-9._/-]{0,512}", prefix) or "//" in prefix:
        raise InvalidArgument(what="backup target", detail=f"prefix {prefix!r}: use letters, "
                              "digits, '.', '_', '-' and single '/'")
    return parsed.netloc, f"{prefix}/" if prefix else ""


class ObjectStore:
    def __init__(self, url: str, endpoint: str = "", region: str = "",
                 parallel: int = PARALLEL) -> None:
        check_endpoint(endpoint)
        if region and not re.fullmatch(r"[a-z0-9-]{1,32}", region):
            raise InvalidArgument(what="region", detail=f"{region!r} is not an S3 region")
        self.url = url
        self.endpoint = endpoint
        self.region = region
        self.bucket, self.prefix = parse_url(url)
        self._parallel = parallel
        self._client: Any = None  # made in a worker thread (boto3 loads its models: slow)
        self._made = threading.Lock()
        self._pool = ThreadPoolExecutor(parallel, thread_name_prefix="s3")

    @property
    def _s3(self) -> Any:
        with self._made:
            if self._client is None:
                import boto3
                from botocore.config import Config

                config = Config(retries={"max_attempts": 4, "mode": "standard"},
                                connect_timeout=5, read_timeout=60,
                                max_pool_connections=self._parallel,
                                s3={"addressing_style": "path"} if self.endpoint else {})
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint or None, region_name=self.region or None,
                    config=config)
            return self._client

    def close(self) -> None:
        """Let go of the threads; calls still in flight end on their own (never wait for
        them here: the event loop must not block on a target that does not answer)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._guard, call)

    def _guard(self, call: Callable[[], T]) -> T:
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

        try:
            return call()
        except ClientError as e:
            raise self._error(e) from None
        except (ParamValidationError, ValueError) as e:
            raise InvalidArgument(what="backup target", detail=str(e)) from None
        except BotoCoreError as e:
            if "credentials" in type(e).__name__.lower():
                raise BackupNotAuthorized(target=self.url, detail=str(e)) from None
            raise BackupTargetUnavailable(target=self.url, detail=str(e)) from None

    def _error(self, e: Any) -> CargoholdError:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code == "NoSuchBucket":
            return BackupBucketMissing(bucket=self.bucket, endpoint=self.endpoint or "AWS")
        if code in _DENIED or status == "403":
            return BackupNotAuthorized(target=self.url, detail=error.get("Message") or code)
        if code in _MISSING or status == "404":
            return BackupCorrupt(what="an object", detail=f"{code or status}: not found")
        return BackupTargetUnavailable(target=self.url, detail=f"{code or status}: "
                                       f"{error.get('Message', '')}")

    async def check(self) -> None:
        """The bucket exists and the credentials are good (raises what is wrong)."""
        try:
            await self._run(lambda: self._s3.head_bucket(Bucket=self.bucket))
        except BackupCorrupt:  # HEAD has no body: a 404 is all it says
            raise BackupBucketMissing(bucket=self.bucket,
                                      endpoint=self.endpoint or "AWS") from None

    async def put(self, key: str, data: bytes) -> None:
        await self._run(lambda: self._s3.put_object(Bucket=self.bucket, Key=self.prefix + key,
                                                    Body=data))

    async def get(self, key: str) -> bytes:
        """The object's bytes; ``BackupCorrupt`` naming it if it is missing."""
        def fetch() -> bytes:
            body: bytes = self._s3.get_object(Bucket=self.bucket,
                                              Key=self.prefix + key)["Body"].read()
            return body

        try:
            return await self._run(fetch)
        except BackupCorrupt:
            raise BackupCorrupt(what=key, detail="missing") from None

    async def find(self, key: str) -> bytes | None:
        """The object's bytes, None if there is none."""
        try:
            return await self.get(key)
        except BackupCorrupt:
            return None

    async def names(self, under: str) -> list[str]:
        """The keys under ``under`` (relative to the prefix), all pages."""
        def listing() -> list[str]:
            found: list[str] = []
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + under)
            for page in pages:
                found.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
            return found

        return await self._run(listing)

    async def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 at most
            batch = keys[start:start + 1000]
            await self._run(lambda batch=batch: self._s3.delete_objects(  # type: ignore[misc]
                Bucket=self.bucket, Delete={"Objects": [{"Key": self.prefix + k}
                                                        for k in batch], "Quiet": True}))
