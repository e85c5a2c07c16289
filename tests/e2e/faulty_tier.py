# SPDX-License-Identifier: Apache-2.0
"""A direct-I/O tier whose loads fail on purpose: fault injection at the storage boundary.

Loaded by LMCache in the vLLM worker process (named in an LMCache YAML config
by the fault tests). Every other chunk load raises (one at a time through
``get_blocking``, or as a batch through ``batched_get_blocking``, which raises
if any of its chunks would), as a storage backend with a failing device or a
bug would; the tests check that vLLM never sees garbage KV and its requests
still complete.
"""

import itertools
import threading

from vllm_kvplugin.lmcache.directio_backend import DirectIOBackend


class FailingLoadsTier(DirectIOBackend):
    """``DirectIOBackend`` whose every second chunk load raises ``RuntimeError``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._calls = itertools.count()
        self._calls_lock = threading.Lock()

    def _count_a_load(self) -> None:
        with self._calls_lock:
            n = next(self._calls)
        if n % 2:
            raise RuntimeError(f"injected load failure #{n}")

    def get_blocking(self, key):
        self._count_a_load()
        return super().get_blocking(key)

    def batched_get_blocking(self, keys):
        for _ in keys:
            self._count_a_load()
        return super().batched_get_blocking(keys)
