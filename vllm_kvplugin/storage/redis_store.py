# SPDX-License-Identifier: Apache-2.0
"""Chunk values in a Redis (or any RESP server: Valkey, KeyDB, Dragonfly), one key per chunk.

Runs in the vLLM worker process (see :mod:`vllm_kvplugin.storage.chunk_store`
for what every shared store guarantees); redis-py's pool is thread-safe.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

from vllm_kvplugin.storage.chunk_store import ChunkStore

KEY_PREFIX = "kvplugin:"
# Credentials from the environment keep them out of vLLM's and LMCache's config logs.
USERNAME_ENV, PASSWORD_ENV = "KVPLUGIN_REMOTE_USERNAME", "KVPLUGIN_REMOTE_PASSWORD"


def redacted(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (safe to log)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


class RedisChunkStore(ChunkStore):
    """Get, put and probe chunk values by name on one RESP server.

    Args:
        url: ``redis://host:port[/db]`` (or ``rediss://`` for TLS); credentials from
            ``KVPLUGIN_REMOTE_USERNAME``/``KVPLUGIN_REMOTE_PASSWORD`` unless the URL has them.
        timeout_s: bound on any one call (connect, send, receive).
        retry_after_s: how long calls answer at once after a failure.
    """

    def __init__(self, url: str, timeout_s: float = 1.0, retry_after_s: float = 2.0):
        import redis

        super().__init__(retry_after_s)
        self.url = redacted(url)
        self.password_in_url = urlsplit(url).password is not None
        credentials = {} if self.password_in_url else {
            k: os.environ[env] for k, env in (("username", USERNAME_ENV), ("password", PASSWORD_ENV)) if env in os.environ
        }
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False, **credentials,
        )
        self._errors = (redis.RedisError, OSError)

    def get(self, name: str) -> bytes | None:
        return self._call(self._client.get, KEY_PREFIX + name)

    def exists(self, name: str) -> bool:
        return bool(self._call(self._client.exists, KEY_PREFIX + name))

    def put(self, name: str, value) -> bool:
        return bool(self._call(self._client.set, KEY_PREFIX + name, value))

    def delete(self, name: str) -> None:
        self._call(self._client.delete, KEY_PREFIX + name)

    def ping(self) -> bool:
        return bool(self._call(self._client.ping))

    def close(self) -> None:
        self._client.close()
