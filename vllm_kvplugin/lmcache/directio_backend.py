# SPDX-License-Identifier: Apache-2.0
"""LMCache storage plugin: KV chunks in checksummed files, written and read with O_DIRECT where possible.

Runs in the vLLM worker process, inside LMCache's storage manager (see
:mod:`vllm_kvplugin.lmcache.chunk_tier` for what every checksummed tier does:
verification before the scheduler's promise, writer threads, skipped stores).
Selected through LMCache's plugin mechanism (``storage_plugins:
["kvplugin_directio"]``); the portable connector wires that for the user from
two keys of ``kv_connector_extra_config`` (see :func:`plugin_config`).

What is particular to files: a size budget with LRU eviction and a rescan at
startup (:mod:`vllm_kvplugin.storage.directory`), the I/O engine chosen for
the filesystem (:mod:`vllm_kvplugin.storage.select`), a file that fails its
checks is deleted, a held chunk's file is kept from eviction, and if the
whole directory is removed while serving, loads become misses, the index
forgets its entries, and the next store recreates the tree.
"""

from __future__ import annotations

from lmcache.logging import init_logger

from vllm_kvplugin.lmcache.chunk_tier import ChunkTier
from vllm_kvplugin.storage.directory import ChunkDirectory
from vllm_kvplugin.storage.select import select_io
from vllm_kvplugin.storage.settings import ENGINE_KEY, PATH_KEY, READ_AHEAD_KEY, SIZE_KEY, THREADS_KEY, tier_settings

__all__ = ["DirectIOBackend", "ENGINE_KEY", "PATH_KEY", "PLUGIN_NAME", "READ_AHEAD_KEY", "SIZE_KEY", "THREADS_KEY",
           "plugin_config", "tier_settings"]

logger = init_logger(__name__)

PLUGIN_NAME = "kvplugin_directio"


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


class DirectIOBackend(ChunkTier):
    """A local or shared directory of chunk files as an LMCache tier."""

    def __init__(self, dst_device="cpu", config=None, metadata=None, local_cpu_backend=None, loop=None):
        settings = tier_settings(config.extra_config or {})
        super().__init__(PLUGIN_NAME, "chunk file", settings.io_threads, settings.read_ahead, dst_device, config,
                         metadata, local_cpu_backend, loop)
        self.directory = ChunkDirectory(settings.path, round(settings.max_size_gb * 1e9))
        # LMCache hands us host memory
        self.io, self.io_choice = select_io(self.directory.root, chunks_on_device=False, engine=settings.engine)
        logger.info("%s: %s in %s (%.1f GB budget, %d files indexed; %s)", PLUGIN_NAME, self.io.name,
                    self.directory.root, self.directory.capacity_bytes / 1e9, len(self.directory._index),
                    self.io_choice.reason)

    def _exists(self, name: str) -> bool:
        return self.directory.lookup(name) is not None

    def _fetch(self, name: str):
        path = self.directory.lookup(name)
        if path is None:
            return None
        try:
            return self.io.read(path, name)
        except FileNotFoundError:  # evicted by another process since the lookup, or the tree removed
            dropped = self.directory.vanished(name)
            if dropped > 1:
                logger.warning("%s: %s was removed; forgot its %d chunks (misses until stored again)",
                               PLUGIN_NAME, self.directory.root, dropped)
        except OSError as e:  # unreadable: a miss, the file stays for an operator to inspect
            logger.warning("%s: could not read a chunk (%s); treated as a miss", PLUGIN_NAME, e)
        return None

    def _store(self, name: str, header: bytes, payload) -> None:
        reserved = self.directory.file_size(len(payload))
        self.directory.reserve(reserved)
        try:
            self._write_file(self.directory.path_for(name), header, payload)
        except BaseException:
            self.directory.release(reserved)
            raise
        self.directory.commit(name, reserved)

    def _write_file(self, path: str, header: bytes, payload) -> None:
        try:
            self.io.write(path, header, payload)
        except FileNotFoundError:  # a new fan-out subdirectory, or the tree was removed (rm -rf)
            dropped = self.directory.make_dirs_for(path)
            if dropped:
                logger.warning("%s: %s was removed; recreated it and forgot %d chunks",
                               PLUGIN_NAME, self.directory.root, dropped)
            self.io.write(path, header, payload)

    def _discard(self, name: str) -> None:
        self.directory.remove(name)

    def _hold_started(self, name: str) -> None:
        self.directory.pin(name, +1)

    def _hold_ended(self, name: str) -> None:
        self.directory.pin(name, -1)

    def _loaded(self, name: str) -> None:
        path = self.directory.lookup(name)
        if path is not None:
            self.directory.touch(path)

    def close(self) -> None:
        super().close()
        self.io.close()
