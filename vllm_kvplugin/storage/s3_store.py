# SPDX-License-Identifier: Apache-2.0
"""Chunk values as objects in an S3 bucket (AWS S3, MinIO, Ceph RGW, SeaweedFS, VAST), one object per chunk.

Runs in the vLLM worker process (see :mod:`vllm_kvplugin.storage.chunk_store`
for what every shared store guarantees); boto3 clients are thread-safe, one
per store.

Credentials, region and, unless ``kvplugin.remote.endpoint_url`` names one,
the endpoint come from boto3's own chain (``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_ENDPOINT_URL_S3``, ``~/.aws``, an instance role): never from the
connector's config, which vLLM and LMCache write to their logs. Each call is
one attempt bounded by the timeout (boto3's retries would multiply it); an
absent object is an answer, anything else (no connection, a timeout, 5xx,
denied, no such bucket) marks the store down for ``retry_after_s``. Objects
carry our own CRC32C (the chunk header), so the SDK's optional request and
response checksums are off: older S3-compatible stores reject them and they
would hash every byte twice.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from vllm_kvplugin.storage.chunk_store import ChunkStore

DEFAULT_PREFIX = "kvplugin"


def parse_s3_url(url: str) -> tuple[str, str]:
    """The bucket and object-key prefix of ``s3://bucket[/prefix]`` (prefix ``kvplugin`` by default).

    Raises:
        ValueError: no bucket, or credentials in the URL (they would be logged).
    """
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError("kvplugin.remote.url must not carry S3 credentials: set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY in the environment (or any source boto3 reads)")
    if not parts.netloc or ":" in parts.netloc:
        raise ValueError("kvplugin.remote.url must be s3://<bucket>[/<prefix>] (the endpoint goes in "
                         "kvplugin.remote.endpoint_url)")
    return parts.netloc, parts.path.strip("/") or DEFAULT_PREFIX


class S3ChunkStore(ChunkStore):
    """Get, put and probe chunk values as objects ``<prefix>/<name>`` in one bucket.

    Args:
        url: ``s3://bucket[/prefix]``.
        timeout_s: bound on connecting and on each read of any one call.
        endpoint_url: the S3 endpoint (``http://host:port``) of a store other than AWS; addressed path-style.
        retry_after_s: how long calls answer at once after a failure.
    """

    def __init__(self, url: str, timeout_s: float = 1.0, endpoint_url: str | None = None, retry_after_s: float = 2.0):
        import boto3
        import botocore.config
        import botocore.exceptions

        super().__init__(retry_after_s)
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        config = botocore.config.Config(
            connect_timeout=timeout_s, read_timeout=timeout_s, retries={"total_max_attempts": 1},
            max_pool_connections=32, s3={"addressing_style": "path"} if endpoint_url else None,
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        self._client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self._errors = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError)
        self._client_error = botocore.exceptions.ClientError

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _absent(self, error: Exception) -> bool:
        """Whether ``error`` says the object is not there (an answer, not a failure)."""
        if not isinstance(error, self._client_error):
            return False
        code = error.response.get("Error", {}).get("Code")
        return code in ("NoSuchKey", "404", "NotFound")

    def _get(self, key: str) -> bytes | None:
        try:
            reply = self._client.get_object(Bucket=self.bucket, Key=key)
        except self._client_error as e:
            if self._absent(e):
                return None
            raise
        with reply["Body"] as body:
            return body.read()

    def _head(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
        except self._client_error as e:
            if self._absent(e):
                return False
            raise
        return True

    def get(self, name: str) -> bytes | None:
        return self._call(self._get, self._key(name))

    def exists(self, name: str) -> bool:
        return bool(self._call(self._head, self._key(name)))

    def put(self, name: str, value) -> bool:
        body = value if isinstance(value, bytes) else bytes(value)
        return self._call(lambda: self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=body)) \
            is not None

    def delete(self, name: str) -> None:
        self._call(lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(name)))

    def ping(self) -> bool:
        return self._call(lambda: self._client.head_bucket(Bucket=self.bucket)) is not None

    def close(self) -> None:
        self._client.close()
