# SPDX-License-Identifier: Apache-2.0
"""Shared stores of chunk values (a Redis, an S3 bucket): what the remote tier asks of one, and which one.

Runs in the vLLM worker process, called by the remote tier
(:mod:`vllm_kvplugin.lmcache.remote_tier`) from LMCache's lookup thread, the
forward thread and the tier's writer threads; and in ``vllm-kvplugin doctor``.

A value is a chunk file's bytes (:mod:`vllm_kvplugin.storage.format`: a
checksummed header naming the key, then the payload), so a value that is
truncated, bit-flipped or stored under another key is rejected by the same
checks as a file. The store being down, hung or restarted is never an error
here: every call answers "absent" or "not stored" within the timeout, and
after a failure the store stays quiet for ``retry_after_s`` (each call answers
at once) instead of making every lookup wait out the timeout.
"""

from __future__ import annotations

import abc
import errno
import threading
import time

from vllm_kvplugin.storage.format import HEADER_SIZE, ChunkHeader, ChunkRejected, check_payload, decode_header


def verified_value(value: bytes, name: str) -> tuple[ChunkHeader, memoryview]:
    """The header and payload of a stored value, if it is a whole, intact chunk of ``name``.

    Raises:
        ChunkRejected: truncated, padded, bit-flipped or another key's.
    """
    header = decode_header(value[:HEADER_SIZE], name)
    if len(value) != HEADER_SIZE + header.payload_len:
        raise ChunkRejected(f"value is {len(value)} bytes, header and payload {HEADER_SIZE + header.payload_len}")
    payload = memoryview(value)[HEADER_SIZE:]
    check_payload(header, payload)
    return header, payload


class ChunkStore(abc.ABC):
    """Get, put and probe chunk values by name; no call raises for the store being unreachable.

    Subclasses set ``url`` (safe to log), ``password_in_url`` and ``_errors``
    (the exceptions that mean "the store did not answer"), and implement the
    five calls through :meth:`_call`.
    """

    url: str
    password_in_url: bool = False
    _errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, retry_after_s: float):
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _call(self, fn, *args):
        """``fn(*args)``, or None if the store is marked down or the call fails (then marked down)."""
        if not self.available():
            return None
        try:
            return fn(*args)
        except self._errors as e:
            with self._lock:
                self._down_until = time.monotonic() + self._retry_after_s
                self.last_error = f"{type(e).__name__}: {e}"
            return None

    @abc.abstractmethod
    def get(self, name: str) -> bytes | None:
        """The value stored under ``name``, or None (absent, or the store did not answer)."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """Whether a value is stored under ``name`` (False if the store did not answer)."""

    @abc.abstractmethod
    def put(self, name: str, value) -> bool:
        """Store ``value`` (bytes-like) under ``name``; False if it was not stored."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Delete ``name``'s value if the store answers."""

    @abc.abstractmethod
    def ping(self) -> bool:
        """Whether the store answers (and, for a bucket, whether it exists and these credentials reach it)."""

    def close(self) -> None:
        """Release connections."""

    def put_chunk(self, name: str, header: bytes, payload) -> None:
        """Store one chunk (header and payload, one value); ``ConnectionError`` if it was not stored."""
        if not self.put(name, b"".join((header, payload))):
            raise ConnectionError(errno.ECONNREFUSED, f"{self.url}: {self.last_error or 'not stored'}")

    def get_chunk(self, name: str) -> tuple[ChunkHeader, memoryview] | None:
        """The verified header and payload of chunk ``name``, or None (absent, or the store did not answer).

        Raises:
            ChunkRejected: the stored value is not a whole, intact chunk of ``name``.
        """
        value = self.get(name)
        return None if value is None else verified_value(value, name)


def open_chunk_store(url: str, timeout_s: float, endpoint_url: str | None = None,
                     retry_after_s: float = 2.0) -> ChunkStore:
    """The store ``url`` names: ``redis://``/``rediss://``/``unix://`` a RESP server, ``s3://bucket[/prefix]`` a bucket."""
    if url.startswith("s3://"):
        from vllm_kvplugin.storage.s3_store import S3ChunkStore

        return S3ChunkStore(url, timeout_s, endpoint_url, retry_after_s)
    from vllm_kvplugin.storage.redis_store import RedisChunkStore

    return RedisChunkStore(url, timeout_s, retry_after_s)
