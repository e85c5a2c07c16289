# SPDX-License-Identifier: Apache-2.0
"""What every checksummed LMCache tier of this plugin does, whatever holds its chunks.

Runs in the vLLM worker process, inside LMCache's storage manager: lookups on
LMCache's lookup thread, loads on the forward thread, stores on the tier's own
writer threads (a store returns as soon as its chunks are queued).

A tier subclass says where chunks live (files: :mod:`.directio_backend`; a
Redis: :mod:`.remote_tier`) through four primitives — ``_fetch``, ``_store``,
``_discard``, ``_exists`` — and inherits the rest:

- every chunk is stored in the format of :mod:`vllm_kvplugin.storage.format`
  (a header naming its key, shape and dtype, CRC32C of header and payload);
- whatever a tier hands back, a chunk that fails a check is discarded and is a
  miss, never bytes;
- LMCache's pinned lookup (the promise vLLM's scheduler acts on) reads and
  checks the chunk and holds the verified bytes until the load takes them
  (:mod:`.held_chunks`): a chunk damaged or gone after the promise still loads,
  one damaged before it is never promised;
- a lookup or load of many chunks keeps ``read_ahead`` reads in flight on the
  tier's reader threads (the next chunks are read while one is checked and
  copied), answering in order and by prefix as LMCache expects;
- a store that fails (full disk, server down) is skipped and counted, with one
  log line per kind of failure and minute.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch
from lmcache.logging import init_logger
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface

from vllm_kvplugin.lmcache.held_chunks import HeldChunks
from vllm_kvplugin.lmcache.ordered_reads import read_in_order
from vllm_kvplugin.storage.format import ChunkHeader, ChunkRejected, crc32c, encode_header

logger = init_logger(__name__)

_LOG_EVERY_S = 60.0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bytes_view(buffer) -> memoryview:
    """A flat unsigned-byte view of ``buffer`` (LMCache's ``byte_array`` may carry another format)."""
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def parse_layout(header: ChunkHeader) -> tuple[torch.dtype, MemoryFormat]:
    """The dtype and memory format a header names, refusing anything else a chunk might claim,
    and a shape that does not hold exactly its payload (checked before anything is allocated)."""
    dtype = getattr(torch, header.dtype, None)
    if not isinstance(dtype, torch.dtype) or header.memory_format not in MemoryFormat.__members__:
        raise ChunkRejected(f"unknown dtype or memory format {header.dtype!r}/{header.memory_format!r}")
    if math.prod(header.shape) * dtype.itemsize != header.payload_len:
        raise ChunkRejected(f"shape {header.shape} of {header.dtype} is not {header.payload_len} bytes")
    return dtype, MemoryFormat[header.memory_format]


_PINNED = object()  # a lookup's read found the chunk held already and pinned it once more


def _release(name: str, obj) -> None:
    if obj is not None:
        obj.ref_count_down()


class ChunkTier(StoragePluginInterface):
    """An LMCache storage plugin whose chunks are checksummed and verified before they are promised.

    Args:
        name: the tier's name in logs (LMCache's plugin name).
        chunk_noun: what one stored chunk is called in logs ("chunk file").
        io_threads: writer threads.
        read_ahead: chunks read at once by a lookup or load of several (reader threads).
        (the rest): LMCache's storage plugin constructor arguments.
    """

    def __init__(self, name: str, chunk_noun: str, io_threads: int, read_ahead: int, dst_device="cpu", config=None,
                 metadata=None, local_cpu_backend=None, loop=None):
        super().__init__(dst_device, config, metadata, local_cpu_backend, loop)
        self.name, self.chunk_noun = name, chunk_noun
        self.fingerprint = metadata.model_name if metadata is not None else ""
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvplugin-io")
        self.read_ahead = read_ahead
        self._readers = ThreadPoolExecutor(read_ahead, thread_name_prefix="kvplugin-read")
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.skipped_stores = 0  # chunks not stored because writing failed, ever
        self._last_skip: tuple[object, float] = (None, -math.inf)  # (kind, when logged)
        self._held = HeldChunks(on_release=self._hold_ended)  # verified at lookup, waiting for their load

    def __str__(self) -> str:
        return self.name

    # -- where chunks live (subclasses) ---------------------------------------

    @abc.abstractmethod
    def _fetch(self, name: str) -> tuple[ChunkHeader, memoryview] | None:
        """The verified header and payload of chunk ``name`` (payload valid until the caller's next
        fetch on this thread), or None if it is absent or unreadable right now.

        Raises:
            ChunkRejected: it is there but damaged, truncated or another key's.
        """

    @abc.abstractmethod
    def _store(self, name: str, header: bytes, payload) -> None:
        """Store one chunk; raise ``OSError`` (its ``errno`` names the failure) if it cannot be."""

    @abc.abstractmethod
    def _discard(self, name: str) -> None:
        """Forget (and delete) a chunk that failed its checks."""

    @abc.abstractmethod
    def _exists(self, name: str) -> bool:
        """Whether a chunk is stored (unverified: an unpinned lookup or a retrieve's planning)."""

    def _hold_started(self, name: str) -> None:
        """A verified chunk is now held for a load (e.g. keep its file from eviction)."""

    def _hold_ended(self, name: str) -> None:
        """The hold of ``name`` ended."""

    def _loaded(self, name: str) -> None:
        """Chunk ``name`` was read (e.g. record the access for LRU)."""

    # -- lookup -----------------------------------------------------------

    def contains(self, key, pin: bool = False) -> bool:
        """Whether the chunk can be loaded; with ``pin`` (LMCache's lookup), verified and held.

        A pinned lookup is the promise vLLM's scheduler acts on: it counts the
        tokens as computed before the load runs, and some runners (vllm-gaudi's)
        drop the load errors that would undo that. So the chunk is read and
        checked now, and the verified bytes are held in host memory until the
        load takes them or the pin is released: a chunk that is damaged,
        truncated or vanishes is a miss here, never a failed load later.
        """
        if pin:
            return self.batched_contains([key], pin=True) == 1
        name = key.to_string()
        return self._held.has(name) or self._exists(name)

    def batched_contains(self, keys, pin: bool = False) -> int:
        """How many of ``keys``, from the first, can be loaded; with ``pin``, verified and held (LMCache's lookup).

        Up to ``read_ahead`` chunks are read at once; chunks read past the first
        miss are released again, so exactly the counted prefix stays pinned.
        """
        if not pin:
            return super().batched_contains(keys, pin)
        hits = 0
        names = [k.to_string() for k in keys]
        with contextlib.closing(self._in_order(names, self._verify_for_pin, self._drop_pin)) as results:
            for name, result in results:
                if result is None:
                    break
                if result is not _PINNED:
                    self._held.add(name, result)
                    self._hold_started(name)
                hits += 1
        return hits

    def _verify_for_pin(self, name: str):
        """Reader thread: ``_PINNED`` if ``name`` is held already (one more pin), else its verified bytes or None."""
        return _PINNED if self._held.pin(name) else self._read(name)

    def _in_order(self, names: list[str], read, undo):
        """:func:`.ordered_reads.read_in_order` on this tier's readers, ``read_ahead`` deep."""
        return read_in_order(self._readers, self.read_ahead, names, read, undo)

    def _drop_pin(self, name: str, result) -> None:
        """Undo :meth:`_verify_for_pin` for a chunk past the hit prefix."""
        if result is _PINNED:
            self._held.unpin(name)
        elif result is not None:
            result.ref_count_down()

    def exists_in_put_tasks(self, key) -> bool:
        with self._lock:
            return key.to_string() in self._pending

    def pin(self, key) -> bool:
        return self.contains(key, pin=True)

    def unpin(self, key) -> bool:
        self._held.unpin(key.to_string())
        return True

    # -- store --------------------------------------------------------------

    def batched_submit_put_task(self, keys, objs, transfer_spec=None, on_complete_callback=None):
        futures = []
        for key, obj in zip(keys, objs):
            name = key.to_string()
            with self._lock:
                if name in self._pending:
                    continue
                obj.ref_count_up()  # LMCache drops its reference when this returns
                future = self._pool.submit(self._write, key, name, obj, on_complete_callback)
                self._pending[name] = future
            futures.append(future)
        return futures

    def wait_for_stores(self, timeout_s: float) -> bool:
        """Block until every chunk submitted so far is written or given up; False if ``timeout_s`` passed first."""
        with self._lock:
            writes = list(self._pending.values())
        return not wait(writes, timeout=timeout_s).not_done

    def _write(self, key, name: str, obj, on_complete) -> None:
        try:
            payload = bytes_view(obj.byte_array)
            header = ChunkHeader(
                name, _dtype_name(obj.metadata.dtype), tuple(obj.metadata.shape), self.fingerprint,
                len(payload), crc32c(payload), obj.metadata.fmt.name,
            )
            self._store(name, encode_header(header), payload)
            if on_complete is not None:
                on_complete(key)
        except OSError as e:  # ENOSPC, EROFS, EACCES, EIO, a server down: not stored, serving goes on
            self._skipped(e.errno, str(e))
        except Exception as e:
            self._skipped(type(e), f"unexpected {type(e).__name__}: {e}")
        finally:
            obj.ref_count_down()
            with self._lock:
                self._pending.pop(name, None)

    def _skipped(self, kind, reason: str) -> None:
        """Count a chunk not stored; log the first of each kind, then at most once a minute.

        A full disk fails every chunk of every request: one line per chunk would flood the log.
        """
        now = time.monotonic()
        with self._lock:
            self.skipped_stores += 1
            count = self.skipped_stores
            last_kind, last_time = self._last_skip
            if kind == last_kind and now - last_time < _LOG_EVERY_S:
                return
            self._last_skip = (kind, now)
        code = errno.errorcode.get(kind, "") if isinstance(kind, int) else ""
        logger.warning("%s: could not store a chunk (%s%s); skipped (%d skipped so far)",
                       self.name, f"{code}: " if code else "", reason, count)

    # -- load ---------------------------------------------------------------

    def get_blocking(self, key):
        name = key.to_string()
        held = self._held.take(name)
        return held if held is not None else self._read(name)

    def batched_get_blocking(self, keys) -> list:
        """Each key's verified bytes (held ones taken, the others read ``read_ahead`` at a time), None for a miss."""
        names = [k.to_string() for k in keys]
        objs = [self._held.take(name) for name in names]
        unheld = [name for name, obj in zip(names, objs) if obj is None]
        if unheld:
            read = (obj for _, obj in self._in_order(unheld, self._read, _release))
            objs = [obj if obj is not None else next(read) for obj in objs]
        return objs

    def _read(self, name: str):
        """The chunk's bytes in a new host object if it passes every check, else None."""
        try:
            fetched = self._fetch(name)
            if fetched is None:
                return None
            header, payload = fetched
            dtype, fmt = parse_layout(header)
        except ChunkRejected as e:
            logger.warning("%s: discarding a bad %s (%s)", self.name, self.chunk_noun, e)
            self._discard(name)
            return None
        obj = self.local_cpu_backend.allocate(torch.Size(header.shape), dtype, fmt)
        if obj is None:
            return None  # no host memory free right now: recompute instead
        dst = bytes_view(obj.byte_array)
        if len(dst) != len(payload):
            obj.ref_count_down()
            self._discard(name)
            return None
        dst[:] = payload
        self._loaded(name)
        return obj

    # -- management -----------------------------------------------------------

    def remove(self, key, force: bool = True) -> bool:
        self._discard(key.to_string())
        return True

    def get_allocator_backend(self):
        return self.local_cpu_backend

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._held.clear()
