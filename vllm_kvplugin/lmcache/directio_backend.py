# SPDX-License-Identifier: Apache-2.0
"""LMCache storage plugin: KV chunks in checksummed files, written and read with O_DIRECT where possible.

Runs in the vLLM worker process, inside LMCache's storage manager. Writes run
on a small thread pool, so a store returns as soon as its chunks are queued;
reads are synchronous (LMCache's ``get_blocking``). Selected through
LMCache's plugin mechanism (``storage_plugins: ["kvplugin_directio"]``); the
portable connector wires that for the user from two keys of
``kv_connector_extra_config`` (see :func:`plugin_config`).

Whatever a file holds, a bad one is a miss, never bytes: a header or payload
that fails its checks (including a length or shape that does not match its
dtype) is deleted and reads as absent. LMCache's lookup (``contains`` with
``pin``) reads and checks a chunk before vLLM's scheduler is promised it and
holds the verified bytes for the load (:mod:`vllm_kvplugin.lmcache.held_chunks`),
so a load never finds a chunk gone or damaged. A store that cannot
be written (full disk, read-only filesystem, permissions, I/O error) is
skipped and counted, with one log line per kind of error and minute. If the
whole directory is removed while serving, loads become misses, the index
forgets its entries, and the next store recreates the tree.
"""

from __future__ import annotations

import errno
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from lmcache.logging import init_logger
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface

from vllm_kvplugin.lmcache.held_chunks import HeldChunks
from vllm_kvplugin.storage.directory import ChunkDirectory
from vllm_kvplugin.storage.format import ChunkHeader, ChunkRejected, crc32c, encode_header
from vllm_kvplugin.storage.select import select_io
from vllm_kvplugin.storage.settings import PATH_KEY, SIZE_KEY, THREADS_KEY, tier_settings

__all__ = ["DirectIOBackend", "PATH_KEY", "PLUGIN_NAME", "SIZE_KEY", "THREADS_KEY", "plugin_config", "tier_settings"]

logger = init_logger(__name__)

PLUGIN_NAME = "kvplugin_directio"
_LOG_EVERY_S = 60.0


def plugin_config(path: str, max_size_gb: float) -> dict:
    """LMCache config entries that select this tier (what LMCache YAML users write by hand)."""
    return {
        "storage_plugins": [PLUGIN_NAME],
        "extra_config": {
            f"storage_plugin.{PLUGIN_NAME}.module_path": __name__,
            f"storage_plugin.{PLUGIN_NAME}.class_name": "DirectIOBackend",
            PATH_KEY: path,
            SIZE_KEY: max_size_gb,
        },
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bytes_view(buffer) -> memoryview:
    """A flat unsigned-byte view of ``buffer`` (LMCache's ``byte_array`` may carry another format)."""
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _parse_layout(header: ChunkHeader) -> tuple[torch.dtype, MemoryFormat]:
    """The dtype and memory format a header names, refusing anything else a file might claim,
    and a shape that does not hold exactly its payload (checked before anything is allocated)."""
    dtype = getattr(torch, header.dtype, None)
    if not isinstance(dtype, torch.dtype) or header.memory_format not in MemoryFormat.__members__:
        raise ChunkRejected(f"unknown dtype or memory format {header.dtype!r}/{header.memory_format!r}")
    if math.prod(header.shape) * dtype.itemsize != header.payload_len:
        raise ChunkRejected(f"shape {header.shape} of {header.dtype} is not {header.payload_len} bytes")
    return dtype, MemoryFormat[header.memory_format]


class DirectIOBackend(StoragePluginInterface):
    """A local or shared directory of chunk files as an LMCache tier."""

    def __init__(self, dst_device="cpu", config=None, metadata=None, local_cpu_backend=None, loop=None):
        super().__init__(dst_device, config, metadata, local_cpu_backend, loop)
        settings = tier_settings(config.extra_config or {})
        self.directory = ChunkDirectory(settings.path, round(settings.max_size_gb * 1e9))
        self.io, self.io_choice = select_io(self.directory.root, chunks_on_device=False)  # LMCache hands us host memory
        self.fingerprint = metadata.model_name if metadata is not None else ""
        self._pool = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="kvplugin-io")
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.skipped_stores = 0  # chunks not stored because writing failed, ever
        self._last_skip: tuple[object, float] = (None, -math.inf)  # (kind, when logged)
        # verified at lookup, waiting for their load; the file stays pinned (not evicted) meanwhile
        self._held = HeldChunks(on_release=lambda name: self.directory.pin(name, -1))
        logger.info("%s: %s in %s (%.1f GB budget, %d files indexed; %s)", PLUGIN_NAME, self.io.name,
                    self.directory.root, self.directory.capacity_bytes / 1e9, len(self.directory._index),
                    self.io_choice.reason)

    def __str__(self) -> str:
        return PLUGIN_NAME

    # -- lookup -----------------------------------------------------------

    def contains(self, key, pin: bool = False) -> bool:
        """Whether the chunk can be loaded; with ``pin`` (LMCache's lookup), verified and held.

        A pinned lookup is the promise vLLM's scheduler acts on: it counts the
        tokens as computed before the load runs, and some runners (vllm-gaudi's)
        drop the load errors that would undo that. So the file is read and
        checked now, and the verified bytes are held in host memory until the
        load takes them or the pin is released: a chunk that is damaged,
        truncated or vanishes is a miss here, never a failed load later.
        """
        name = key.to_string()
        if not pin:
            return self._held.has(name) or self.directory.lookup(name) is not None
        if self._held.pin(name):
            return True
        obj = self._read(name)
        if obj is None:
            return False
        self._held.add(name, obj)
        self.directory.pin(name, +1)
        return True

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

    def _write(self, key, name: str, obj, on_complete) -> None:
        reserved = 0
        try:
            payload = _bytes_view(obj.byte_array)
            header = ChunkHeader(
                name, _dtype_name(obj.metadata.dtype), tuple(obj.metadata.shape), self.fingerprint,
                len(payload), crc32c(payload), obj.metadata.fmt.name,
            )
            reserved = self.directory.file_size(len(payload))
            self.directory.reserve(reserved)
            self._write_file(self.directory.path_for(name), encode_header(header), payload)
            self.directory.commit(name, reserved)
            reserved = 0
            if on_complete is not None:
                on_complete(key)
        except OSError as e:  # ENOSPC, EROFS, EACCES, EIO: this chunk is not stored, serving goes on
            self._skipped(e.errno, str(e))
        except Exception as e:
            self._skipped(type(e), f"unexpected {type(e).__name__}: {e}")
        finally:
            if reserved:
                self.directory.release(reserved)
            obj.ref_count_down()
            with self._lock:
                self._pending.pop(name, None)

    def _write_file(self, path: str, header: bytes, payload) -> None:
        try:
            self.io.write(path, header, payload)
        except FileNotFoundError:  # a new fan-out subdirectory, or the tree was removed (rm -rf)
            dropped = self.directory.make_dirs_for(path)
            if dropped:
                logger.warning("%s: %s was removed; recreated it and forgot %d chunks",
                               PLUGIN_NAME, self.directory.root, dropped)
            self.io.write(path, header, payload)

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
        name = errno.errorcode.get(kind, "") if isinstance(kind, int) else ""
        logger.warning("%s: could not store a chunk (%s%s); skipped (%d skipped so far)",
                       PLUGIN_NAME, f"{name}: " if name else "", reason, count)

    # -- load ---------------------------------------------------------------

    def get_blocking(self, key):
        name = key.to_string()
        held = self._held.take(name)
        return held if held is not None else self._read(name)

    def _read(self, name: str):
        """The chunk's bytes in a new host object if its file passes every check, else None."""
        path = self.directory.lookup(name)
        if path is None:
            return None
        try:
            header, payload = self.io.read(path, name)
            dtype, fmt = _parse_layout(header)
        except ChunkRejected as e:
            logger.warning("%s: discarding a bad chunk file (%s)", PLUGIN_NAME, e)
            self.directory.remove(name)
            return None
        except FileNotFoundError:  # evicted by another process since the lookup, or the tree removed
            dropped = self.directory.vanished(name)
            if dropped > 1:
                logger.warning("%s: %s was removed; forgot its %d chunks (misses until stored again)",
                               PLUGIN_NAME, self.directory.root, dropped)
            return None
        except OSError as e:  # unreadable: a miss, the file stays for an operator to inspect
            logger.warning("%s: could not read a chunk (%s); treated as a miss", PLUGIN_NAME, e)
            return None
        obj = self.local_cpu_backend.allocate(torch.Size(header.shape), dtype, fmt)
        if obj is None:
            return None  # no host memory free right now: recompute instead
        dst = _bytes_view(obj.byte_array)
        if len(dst) != len(payload):
            obj.ref_count_down()
            self.directory.remove(name)
            return None
        dst[:] = payload
        self.directory.touch(path)
        return obj

    # -- management -----------------------------------------------------------

    def remove(self, key, force: bool = True) -> bool:
        return self.directory.remove(key.to_string())

    def get_allocator_backend(self):
        return self.local_cpu_backend

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._held.clear()
        self.io.close()
