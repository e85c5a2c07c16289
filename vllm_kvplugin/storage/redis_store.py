# SPDX-License-Identifier: Apache-2.0
"""Chunk values in a Redis (or any RESP server: Valkey, KeyDB, Dragonfly), one key per chunk.

Runs in the vLLM worker process, called by the remote tier
(:mod:`vllm_kvplugin.lmcache.remote_tier`) from LMCache's lookup thread, the
forward thread and the tier's writer threads (redis-py's pool is thread-safe).

A value is a chunk file's bytes (:mod:`vllm_kvplugin.storage.format`: a
checksummed header naming the key, then the payload), so a value that is
truncated, bit-flipped or stored under another key is rejected by the same
checks as a file. The server being down, hung or restarted is never an
error here: every call answers "absent" or "not stored" within ``timeout_s``,
and after a failure the store stays quiet for ``retry_after_s`` (each call
answers at once) instead of making every lookup wait out the timeout.
"""

from __future__ import annotations

import os
import threading
import time
from urllib.parse import urlsplit, urlunsplit

KEY_PREFIX = "kvplugin:"
# Credentials from the environment keep them out of vLLM's and LMCache's config logs.
USERNAME_ENV, PASSWORD_ENV = "KVPLUGIN_REMOTE_USERNAME", "KVPLUGIN_REMOTE_PASSWORD"


def redacted(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (safe to log)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


class RedisChunkStore:
    """Get, put and probe chunk values by name on one RESP server.

    Args:
        url: ``redis://host:port[/db]`` (or ``rediss://`` for TLS); credentials from
            ``KVPLUGIN_REMOTE_USERNAME``/``KVPLUGIN_REMOTE_PASSWORD`` unless the URL has them.
        timeout_s: bound on any one call (connect, send, receive).
        retry_after_s: how long calls answer at once after a failure.
    """

    def __init__(self, url: str, timeout_s: float = 1.0, retry_after_s: float = 2.0):
        import redis

        self.url = redacted(url)
        self.password_in_url = urlsplit(url).password is not None
        credentials = {} if self.password_in_url else {
            k: os.environ[env] for k, env in (("username", USERNAME_ENV), ("password", PASSWORD_ENV)) if env in os.environ
        }
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False, **credentials,
        )
        self._errors = (redis.RedisError, OSError)
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _call(self, fn, *args):
        """``fn(*args)``, or None if the server is marked down or the call fails (then marked down)."""
        if not self.available():
            return None
        try:
            return fn(*args)
        except self._errors as e:
            with self._lock:
                self._down_until = time.monotonic() + self._retry_after_s
                self.last_error = f"{type(e).__name__}: {e}"
            return None

    def get(self, name: str) -> bytes | None:
        return self._call(self._client.get, KEY_PREFIX + name)

    def exists(self, name: str) -> bool:
        return bool(self._call(self._client.exists, KEY_PREFIX + name))

    def put(self, name: str, value) -> bool:
        """Store ``value`` (bytes-like) under ``name``; False if it was not stored."""
        return bool(self._call(self._client.set, KEY_PREFIX + name, value))

    def delete(self, name: str) -> None:
        self._call(self._client.delete, KEY_PREFIX + name)

    def ping(self) -> bool:
        return bool(self._call(self._client.ping))

    def close(self) -> None:
        self._client.close()
