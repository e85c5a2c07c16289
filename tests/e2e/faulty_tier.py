# SPDX-License-Identifier: Apache-2.0
"""A direct-I/O tier whose loads fail on purpose: fault injection at the storage boundary.

Loaded by LMCache in the vLLM worker process (named in an LMCache YAML config
by the fault tests). Every other ``get_blocking`` call raises, as a storage
backend with a failing device or a bug would; the tests check that vLLM never
sees garbage KV and its requests still complete.
"""

import itertools
import threading

from vllm_kvplugin.lmcache.directio_backend import DirectIOBackend


class FailingLoadsTier(DirectIOBackend):
    """``DirectIOBackend`` whose every second load raises ``RuntimeError``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._calls = itertools.count()
        self._calls_lock = threading.Lock()

    def get_blocking(self, key):
        with self._calls_lock:
            n = next(self._calls)
        if n % 2:
            raise RuntimeError(f"injected load failure #{n}")
        return super().get_blocking(key)
