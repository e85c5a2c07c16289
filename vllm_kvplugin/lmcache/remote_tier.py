# SPDX-License-Identifier: Apache-2.0
"""LMCache storage plugin: KV chunks as checksummed values in a Redis or an S3 bucket shared by many servers.

Runs in the vLLM worker process, inside LMCache's storage manager (see
:mod:`vllm_kvplugin.lmcache.chunk_tier` for what every checksummed tier does).
The portable connector wires it from ``kvplugin.remote.url``
(:func:`plugin_config`); LMCache's own ``remote_url`` is refused instead,
because its values carry no checksum (a damaged value would load as KV).

Each chunk is one value, in the same format as a direct-I/O chunk file
(header naming the key, shape and dtype, CRC32C of header and payload), under
``kvplugin:<LMCache key>`` in a Redis or ``<prefix>/<LMCache key>`` in a bucket;
the key carries the layout fingerprint, so servers of another model, block
size or ISA never read these bytes. Eviction is the store's (Redis:
``maxmemory-policy allkeys-lru``; S3: a lifecycle rule). A store that is down,
hung or restarted turns lookups into misses and stores into skipped stores,
each within ``kvplugin.remote.timeout_s`` (:mod:`vllm_kvplugin.storage.chunk_store`).
"""

from __future__ import annotations


from lmcache.logging import init_logger

from vllm_kvplugin.lmcache.chunk_tier import ChunkTier
from vllm_kvplugin.storage.chunk_store import open_chunk_store
from vllm_kvplugin.storage.redis_store import PASSWORD_ENV, USERNAME_ENV
from vllm_kvplugin.storage.settings import (REMOTE_ENDPOINT_KEY, REMOTE_READ_AHEAD_KEY, REMOTE_THREADS_KEY,
                                            REMOTE_TIMEOUT_KEY, REMOTE_URL_KEY, remote_settings)

logger = init_logger(__name__)

PLUGIN_NAME = "kvplugin_remote"


def plugin_config(extra: dict) -> dict:
    """LMCache config entries that select this tier, from our ``kvplugin.remote.*`` keys."""
    settings = remote_settings(extra)  # refuses a bad value at startup, naming the key
    return {
        "storage_plugins": [PLUGIN_NAME],
        "extra_config": {
            f"storage_plugin.{PLUGIN_NAME}.module_path": __name__,
            f"storage_plugin.{PLUGIN_NAME}.class_name": "RemoteTierBackend",
            REMOTE_URL_KEY: settings.url,
            REMOTE_TIMEOUT_KEY: settings.timeout_s,
            REMOTE_THREADS_KEY: settings.io_threads,
            REMOTE_READ_AHEAD_KEY: settings.read_ahead,
            **({REMOTE_ENDPOINT_KEY: settings.endpoint_url} if settings.endpoint_url else {}),
        },
    }


class RemoteTierBackend(ChunkTier):
    """A Redis (or any RESP server) or an S3 bucket as an LMCache tier of checksummed chunk values."""

    def __init__(self, dst_device="cpu", config=None, metadata=None, local_cpu_backend=None, loop=None):
        settings = remote_settings(config.extra_config or {})
        noun = "chunk object" if settings.url.startswith("s3://") else "chunk value"
        super().__init__(PLUGIN_NAME, noun, settings.io_threads, settings.read_ahead, dst_device, config, metadata,
                         local_cpu_backend, loop)
        self.store = open_chunk_store(settings.url, settings.timeout_s, settings.endpoint_url)
        logger.info("%s: chunks in %s (%s)", PLUGIN_NAME, self.store.url,
                    "reachable" if self.store.ping() else "not reachable yet: misses until it is")
        if self.store.password_in_url:
            logger.warning("%s: a password in %s is written to vLLM's and LMCache's config logs; set %s "
                           "(and %s) in the environment instead", PLUGIN_NAME, REMOTE_URL_KEY, PASSWORD_ENV,
                           USERNAME_ENV)

    def _exists(self, name: str) -> bool:
        return self.store.exists(name)

    def _fetch(self, name: str):
        return self.store.get_chunk(name)

    def _store(self, name: str, header: bytes, payload) -> None:
        self.store.put_chunk(name, header, payload)

    def _discard(self, name: str) -> None:
        self.store.delete(name)

    def close(self) -> None:
        super().close()
        self.store.close()
