"""An S3-compatible object store under one bucket and prefix: the backup target's I/O.

boto3 in a pool of threads (its client is thread safe), so that many blocks are in flight
at once while the event loop goes on. Credentials are found as every AWS tool finds them
(environment, shared credentials file, profile); they are never passed through cargohold's
own records. Errors become cargohold's: a missing bucket, refused credentials, a target
that does not answer (after botocore's own retries), a missing object.

GETs, a restore's whole work, take another way: boto3 signs the request (a presigned URL:
its endpoint, addressing, region, credentials and signature, as for every other call) and
urllib3, which botocore itself sends with, fetches it. A ``get_object`` cost 2.6 ms of CPU
per 1 MiB object (botocore's request and response machinery, under the GIL), which held 16
threads to ~390 MB/s on loopback; signed and fetched this way, 0.9 ms and ~850 MB/s.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlparse

import urllib3

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
#: How long a presigned GET's signature holds (it is used at once).
SIGNED_FOR = 300
#: A GET is tried again after a refused or lost connection and after a 5xx answer (with
#: backoff: 0.2, 0.4, 0.8 s), as botocore's standard retry mode does for other calls.
_GET_RETRIES = urllib3.Retry(total=4, backoff_factor=0.2, allowed_methods={"GET"},
                             status_forcelist={500, 502, 503, 504}, raise_on_status=False)
_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,300})</Message>")


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
        self._http: urllib3.PoolManager | None = None  # GETs (see the module's docstring)
        self._made = threading.Lock()
        self._pool = ThreadPoolExecutor(parallel, thread_name_prefix="s3")

    @property
    def _s3(self) -> Any:
        with self._made:
            if self._client is None:
                import boto3
                import botocore.session
                from botocore.config import Config
                from botocore.httpsession import get_cert_path

                config = Config(retries={"max_attempts": 4, "mode": "standard"},
                                connect_timeout=5, read_timeout=60,
                                max_pool_connections=self._parallel, signature_version="s3v4",
                                s3={"addressing_style": "path"} if self.endpoint else {})
                core = botocore.session.get_session()
                self._client = boto3.session.Session(botocore_session=core).client(
                    "s3", endpoint_url=self.endpoint or None, region_name=self.region or None,
                    config=config)
                # the CA bundle botocore would use: AWS_CA_BUNDLE, ca_bundle, or its own
                bundle = core.get_config_variable("ca_bundle") or get_cert_path(True)
                self._http = urllib3.PoolManager(
                    maxsize=self._parallel, cert_reqs="CERT_REQUIRED", ca_certs=bundle,
                    timeout=urllib3.Timeout(connect=5, read=60), retries=_GET_RETRIES)
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
        return self._answer_error(
            str(error.get("Code", "")),
            str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")),
            str(error.get("Message", "")))

    def _answer_error(self, code: str, status: str, message: str) -> CargoholdError:
        if code == "NoSuchBucket":
            return BackupBucketMissing(bucket=self.bucket, endpoint=self.endpoint or "AWS")
        if code in _DENIED or status == "403":
            return BackupNotAuthorized(target=self.url, detail=message or code)
        if code in _MISSING or status == "404":
            return BackupCorrupt(what="an object", detail=f"{code or status}: not found")
        return BackupTargetUnavailable(target=self.url, detail=f"{code or status}: {message}")

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
            url = self._s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.prefix + key},
                ExpiresIn=SIGNED_FOR)
            assert self._http is not None  # made with the client
            try:
                reply = self._http.request("GET", url)
            except urllib3.exceptions.HTTPError as e:
                raise BackupTargetUnavailable(target=self.url, detail=str(e)) from None
            if reply.status != 200:
                code, message = _CODE.search(reply.data), _MESSAGE.search(reply.data)
                raise self._answer_error(code[1].decode(errors="replace") if code else "",
                                         str(reply.status),
                                         message[1].decode(errors="replace") if message else "")
            body: bytes = reply.data
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
