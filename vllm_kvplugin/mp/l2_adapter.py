# SPDX-License-Identifier: Apache-2.0
"""The direct-I/O chunk-file tier as an L2 adapter of LMCache's multiprocess server.

Runs in the ``lmcache server`` process (LMCache MP mode), loaded by LMCache's
``plugin`` L2 adapter type::

    lmcache server --l1-size-gb 4 --eviction-policy LRU --supported-transfer-mode auto \\
        --l2-adapter '{"type": "plugin", "module_path": "vllm_kvplugin.mp.l2_adapter",
                       "class_name": "DirectIOL2Adapter",
                       "adapter_params": {"path": "/nvme/kv", "max_size_gb": 500}}'

(``vllm-kvplugin server`` writes that line). The files are the in-process
tier's: a checksummed 4 KiB header naming the full key, shape and dtype, then
the payload, written to a temporary file and renamed, read back with O_DIRECT
where the filesystem allows (:mod:`vllm_kvplugin.storage`). What LMCache's
built-in ``fs`` adapter does not do and this one does:

* a restarted server is warm: the directory is indexed at startup, so a
  lookup is a dictionary hit, not a ``stat`` per key;
* a truncated, bit-flipped or foreign file fails its checks on load, is
  deleted, and the server reports that key as not loaded: LMCache then
  serves a shorter prefix and vLLM recomputes the rest (never wrong tokens);
* a byte budget with LRU eviction that never evicts a file between the
  server's lookup-and-lock and its load (locks are pin counts).

``RemoteL2Adapter`` (class name ``RemoteL2Adapter``, ``adapter_params``
``url`` and optionally ``endpoint_url``, ``timeout_s``, ``io_threads``) keeps
the same checksummed chunks as values in a Redis or objects in an S3 bucket
(:mod:`vllm_kvplugin.storage.chunk_store`): LMCache's own ``resp`` and ``s3``
adapters store no checksum, so a damaged value or object loads as KV.

LMCache's controller threads call the ``submit_*`` methods and must never
block; the I/O runs on a small thread pool, and each finished task wakes the
controller through the task kind's event fd.
"""

from __future__ import annotations

import abc
import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from lmcache.lmcache_native import Bitmap
from lmcache.v1.distributed.internal_api import L2StoreResult
from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface
from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase
from lmcache.v1.platform import create_event_notifier

from vllm_kvplugin.storage.chunk_store import open_chunk_store
from vllm_kvplugin.storage.directory import ChunkDirectory
from vllm_kvplugin.storage.format import ChunkHeader, ChunkRejected, crc32c, encode_header
from vllm_kvplugin.storage.select import select_io
from vllm_kvplugin.storage.settings import (ENGINE_KEY, PATH_KEY, REMOTE_ENDPOINT_KEY, REMOTE_THREADS_KEY,
                                            REMOTE_TIMEOUT_KEY, REMOTE_URL_KEY, SIZE_KEY, THREADS_KEY,
                                            remote_settings, tier_settings)

logger = logging.getLogger(__name__)

# Written into every header this adapter stores: an in-process chunk file (another key
# format, another fingerprint) is never taken for a server one, nor the other way round.
FINGERPRINT = "lmcache-mp-l2/1"


def object_key_text(key) -> str:
    """The full text of an LMCache ``ObjectKey``: what the header records and the file name hashes."""
    return f"{key.model_name}@{key.kv_rank:08x}@{key.object_group_id:x}@{key.chunk_hash.hex()}@{key.cache_salt}"


def _bytes_of(obj) -> memoryview:
    """An L1 object's bytes, in place (LMCache's ``byte_array`` is a ctypes ``<B`` view)."""
    return memoryview(obj.byte_array).cast("B")


def _squeezed(shape) -> tuple[int, ...]:
    """A shape without its 1-sized dimensions: LMCache's transfer modes label the same bytes
    ``(1, layers, tokens, hidden)`` (``lmcache_driven``) or ``(layers, tokens, hidden)`` (``engine_driven``)."""
    return tuple(d for d in shape if d != 1)


class DirectIOL2AdapterConfig(L2AdapterConfigBase):
    """``adapter_params``: ``path`` (required), ``max_size_gb`` (10), ``io_threads`` (2), ``engine`` (auto)."""

    def __init__(self, path: str, max_size_gb: float, io_threads: int, engine: str = "auto"):
        self.path, self.max_size_gb, self.io_threads, self.engine = path, max_size_gb, io_threads, engine

    @classmethod
    def from_dict(cls, d: dict) -> "DirectIOL2AdapterConfig":
        short = {"path": PATH_KEY, "max_size_gb": SIZE_KEY, "io_threads": THREADS_KEY, "engine": ENGINE_KEY}
        unknown = sorted(set(d) - set(short))
        if unknown:
            raise ValueError(f"unknown adapter_params {unknown}; known: {sorted(short)}")
        s = tier_settings({short[k]: v for k, v in d.items()})
        return cls(s.path, s.max_size_gb, s.io_threads, s.engine)

    @classmethod
    def help(cls) -> str:
        return (
            "vllm-kvplugin direct-I/O L2 adapter (adapter_params):\n"
            "- path (str): directory of chunk files (required; shared filesystems allowed)\n"
            "- max_size_gb (float): byte budget, least recently used files evicted first (default 10)\n"
            "- io_threads (int): reader/writer threads (default 2)\n"
            "- engine (str): I/O engine of the files: auto (default), posix, nixl or hipfile"
        )


class ChecksummedL2Adapter(L2AdapterInterface, abc.ABC):
    """An LMCache MP server's L2 tier of checksummed chunks; subclasses say where chunks live
    (``_has``, ``_lock_chunk``, ``_unlock_chunk``, ``_put``, ``_get``, ``_drop``, ``_accessed``)."""

    chunk_noun = "chunk"

    def __init__(self, io_threads: int):
        super().__init__()  # capacity 0: the backing store evicts; LMCache's L2 eviction stays off
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvplugin-l2")
        self._events = {kind: create_event_notifier() for kind in ("store", "lookup", "load")}
        self._done: dict[str, dict] = {kind: {} for kind in self._events}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.rejected = 0  # chunks that failed their checks on load (deleted, reported as misses)

    # -- where chunks live (subclasses) -------------------------------------

    @abc.abstractmethod
    def _has(self, name: str) -> bool:
        """Whether chunk ``name`` is stored (unverified)."""

    def _lock_chunk(self, name: str) -> None:
        """Keep ``name`` from eviction until :meth:`_unlock_chunk` (LMCache's lookup-and-lock)."""

    def _unlock_chunk(self, name: str) -> None:
        """Release one :meth:`_lock_chunk`."""

    @abc.abstractmethod
    def _put(self, name: str, header: bytes, payload) -> None:
        """Store one chunk; raise ``OSError`` if it cannot be."""

    @abc.abstractmethod
    def _get(self, name: str) -> tuple[ChunkHeader, memoryview] | None:
        """The verified header and payload of ``name``, or None (absent or unreadable: a miss).

        Raises:
            ChunkRejected: it is there but damaged, truncated or another key's (it is then dropped).
        """

    @abc.abstractmethod
    def _drop(self, name: str) -> None:
        """Delete a chunk that failed its checks (or that LMCache deletes)."""

    def _accessed(self, name: str) -> None:
        """Chunk ``name`` was loaded (e.g. record the access for LRU)."""

    # -- event fds: the controllers poll them -------------------------------

    def get_store_event_fd(self) -> int:
        return self._events["store"].fileno()

    def get_lookup_and_lock_event_fd(self) -> int:
        return self._events["lookup"].fileno()

    def get_load_event_fd(self) -> int:
        return self._events["load"].fileno()

    # -- tasks: submitted by controller threads, run on the pool ------------

    def _submit(self, kind: str, work, *args) -> int:
        task_id = next(self._ids)

        def run():
            try:
                result = work(*args)
            except Exception:  # a task must always finish, or its request waits forever
                logger.exception("kvplugin L2 adapter: %s task failed", kind)
                result = L2StoreResult(False, 0) if kind == "store" else Bitmap(len(args[0]))
            with self._lock:
                self._done[kind][task_id] = result
            self._events[kind].notify()

        self._pool.submit(run)
        return task_id

    def _result(self, kind: str, task_id: int):
        with self._lock:
            return self._done[kind].pop(task_id, None)

    def submit_store_task(self, keys, objects) -> int:
        return self._submit("store", self._store, keys, objects)

    def pop_completed_store_tasks(self) -> dict:
        with self._lock:
            done, self._done["store"] = self._done["store"], {}
        return done

    def submit_lookup_and_lock_task(self, keys, group_layout_descs) -> int:
        return self._submit("lookup", self._lookup_and_lock, keys)

    def query_lookup_and_lock_result(self, task_id: int):
        return self._result("lookup", task_id)

    def submit_unlock(self, keys) -> None:
        for key in keys:  # cheap and never fails: done on the caller's thread
            self._unlock_chunk(object_key_text(key))

    def submit_load_task(self, keys, objects) -> int:
        return self._submit("load", self._load, keys, objects)

    def query_load_result(self, task_id: int):
        return self._result("load", task_id)

    # -- the work ---------------------------------------------------------------

    def _store(self, keys, objects) -> L2StoreResult:
        stored, sizes, ok = [], [], True
        for key, obj in zip(keys, objects):
            name = object_key_text(key)
            if self._has(name):
                continue  # already there (another server on a shared tier, or stored before)
            payload = _bytes_of(obj)
            meta = obj.metadata
            header = ChunkHeader(
                key=name, dtype=str(meta.dtype).removeprefix("torch."), shape=tuple(meta.shape),
                fingerprint=FINGERPRINT, payload_len=len(payload), payload_crc=crc32c(payload),
                memory_format=meta.fmt.name,
            )
            try:
                self._put(name, encode_header(header), payload)
            except OSError as e:  # full disk, read-only filesystem, a store down: the chunk stays L1-only
                logger.warning("kvplugin L2 adapter: could not store a chunk (%s)", e)
                ok = False
                continue
            stored.append(key)
            sizes.append(len(payload))
        if stored:
            self._notify_keys_stored(stored, sizes)
        return L2StoreResult(ok, sum(sizes))

    def _lookup_and_lock(self, keys) -> Bitmap:
        found = Bitmap(len(keys))
        for i, key in enumerate(keys):
            name = object_key_text(key)
            if self._has(name):
                self._lock_chunk(name)  # kept from eviction until the server unlocks it
                found.set(i)
        return found

    def _load(self, keys, objects) -> Bitmap:
        loaded, accessed = Bitmap(len(keys)), []
        for i, (key, obj) in enumerate(zip(keys, objects)):
            if self._load_one(object_key_text(key), obj):
                loaded.set(i)
                accessed.append(key)
        if accessed:
            self._notify_keys_accessed(accessed)
        return loaded

    def _load_one(self, name: str, obj) -> bool:
        """Fill ``obj`` from the stored chunk; ``False`` (a miss) unless every check passes."""
        try:
            got = self._get(name)
            if got is None:
                return False
            header, payload = got
            meta = obj.metadata
            expected = (obj.get_size(), _squeezed(meta.shape), str(meta.dtype).removeprefix("torch."))
            if header.fingerprint != FINGERPRINT or (header.payload_len, _squeezed(header.shape), header.dtype) != expected:
                raise ChunkRejected(f"stored {header.shape} {header.dtype} does not fit the server's "
                                    f"{tuple(meta.shape)} {expected[2]}")
        except ChunkRejected as e:
            self.rejected += 1
            logger.warning("kvplugin L2 adapter: dropped a %s that failed its checks (%s); a miss", self.chunk_noun, e)
            self._drop(name)
            return False
        _bytes_of(obj)[:] = payload
        self._accessed(name)
        return True

    # -- the rest of LMCache's adapter interface ------------------------------

    def delete(self, keys) -> None:
        for key in keys:
            self._drop(object_key_text(key))

    def close(self) -> None:
        self._pool.shutdown(wait=True)  # queued stores complete: nothing handed to us is lost
        for event in self._events.values():
            event.close()


class DirectIOL2Adapter(ChecksummedL2Adapter):
    """Checksummed chunk files in one directory, as an LMCache MP server's L2 tier."""

    chunk_noun = "chunk file"

    def __init__(self, config: DirectIOL2AdapterConfig, l1_memory_desc=None):
        super().__init__(config.io_threads)
        self.directory = ChunkDirectory(config.path, round(config.max_size_gb * 1e9))
        # L1 is host memory
        self.io, choice = select_io(self.directory.root, chunks_on_device=False, engine=config.engine)
        logger.info("kvplugin L2 adapter: %s in %s (%.1f GB budget, %d files indexed; %s)", self.io.name,
                    self.directory.root, self.directory.capacity_bytes / 1e9, len(self.directory._index),
                    choice.reason)

    def _has(self, name: str) -> bool:
        return self.directory.lookup(name) is not None

    def _lock_chunk(self, name: str) -> None:
        self.directory.pin(name, +1)

    def _unlock_chunk(self, name: str) -> None:
        self.directory.pin(name, -1)

    def _put(self, name: str, header: bytes, payload) -> None:
        reserved = self.directory.file_size(len(payload))
        self.directory.reserve(reserved)
        path = self.directory.path_for(name)
        try:
            try:
                self.io.write(path, header, payload)
            except FileNotFoundError:  # a new fan-out subdirectory, or the tree was removed
                self.directory.make_dirs_for(path)
                self.io.write(path, header, payload)
        except BaseException:
            self.directory.release(reserved)
            raise
        self.directory.commit(name, reserved)

    def _get(self, name: str):
        path = self.directory.lookup(name)
        if path is None:
            return None
        try:
            return self.io.read(path, name)
        except FileNotFoundError:  # evicted by another process, or the tree removed
            self.directory.vanished(name)
        except OSError as e:  # unreadable: a miss, the file stays for an operator to inspect
            logger.warning("kvplugin L2 adapter: could not read a chunk (%s); a miss", e)
        return None

    def _drop(self, name: str) -> None:
        self.directory.remove(name)

    def _accessed(self, name: str) -> None:
        path = self.directory.lookup(name)
        if path is not None:
            self.directory.touch(path)

    def report_status(self) -> dict:
        return {
            "is_healthy": True, "type": type(self).__name__, "path": self.directory.root, "engine": self.io.name,
            "files": len(self.directory._index), "used_bytes": self.directory.used_bytes,
            "capacity_bytes": self.directory.capacity_bytes, "evictions": self.directory.evictions,
            "rejected_files": self.rejected,
        }

    def close(self) -> None:
        super().close()
        self.io.close()


class RemoteL2AdapterConfig(L2AdapterConfigBase):
    """``adapter_params``: ``url`` (required), ``endpoint_url``, ``timeout_s``, ``io_threads``."""

    _SHORT = {"url": REMOTE_URL_KEY, "endpoint_url": REMOTE_ENDPOINT_KEY, "timeout_s": REMOTE_TIMEOUT_KEY,
              "io_threads": REMOTE_THREADS_KEY}

    def __init__(self, settings):
        self.settings = settings

    @classmethod
    def from_dict(cls, d: dict) -> "RemoteL2AdapterConfig":
        unknown = sorted(set(d) - set(cls._SHORT))
        if unknown:
            raise ValueError(f"unknown adapter_params {unknown}; known: {sorted(cls._SHORT)}")
        return cls(remote_settings({cls._SHORT[k]: v for k, v in d.items()}))

    @classmethod
    def help(cls) -> str:
        return (
            "vllm-kvplugin remote L2 adapter (adapter_params):\n"
            "- url (str): redis://host:port or s3://bucket[/prefix] (required; credentials from the environment)\n"
            "- endpoint_url (str): the S3 endpoint of a store other than AWS\n"
            "- timeout_s (float): bound on any one call (default 1; 5 for s3://)\n"
            "- io_threads (int): reader/writer threads (default 2)"
        )


class RemoteL2Adapter(ChecksummedL2Adapter):
    """Checksummed chunk values in a Redis or objects in an S3 bucket, as an LMCache MP server's L2 tier.

    Eviction is the store's (Redis ``maxmemory-policy``, an S3 lifecycle rule), so nothing is locked.
    """

    chunk_noun = "chunk value"

    def __init__(self, config: RemoteL2AdapterConfig, l1_memory_desc=None):
        settings = config.settings
        super().__init__(settings.io_threads)
        self.store = open_chunk_store(settings.url, settings.timeout_s, settings.endpoint_url)
        logger.info("kvplugin L2 adapter: chunks in %s (%s)", self.store.url,
                    "reachable" if self.store.ping() else "not reachable yet: misses until it is")

    def _has(self, name: str) -> bool:
        return self.store.exists(name)

    def _put(self, name: str, header: bytes, payload) -> None:
        self.store.put_chunk(name, header, payload)

    def _get(self, name: str):
        return self.store.get_chunk(name)

    def _drop(self, name: str) -> None:
        self.store.delete(name)

    def report_status(self) -> dict:
        return {"is_healthy": self.store.available(), "type": type(self).__name__, "url": self.store.url,
                "rejected_values": self.rejected, "last_error": self.store.last_error}

    def close(self) -> None:
        super().close()
        self.store.close()
