# SPDX-License-Identifier: Apache-2.0
"""A direct-I/O tier whose writes are slow on purpose: a far or busy store, injected at the storage boundary.

Loaded by LMCache in the vLLM worker process (named in an LMCache YAML config
by the PD router test). Each chunk write waits ``STORE_DELAY_S`` first, longer
than the prefill of a whole test prompt, so a decode instance that looked its
prompt up as soon as the prefill reply arrived would find nothing stored yet.
"""

import time

from vllm_kvplugin.lmcache.directio_backend import DirectIOBackend

STORE_DELAY_S = 0.5


class SlowStoresTier(DirectIOBackend):
    """``DirectIOBackend`` whose every chunk write starts ``STORE_DELAY_S`` late."""

    def _store(self, name, header, payload):
        time.sleep(STORE_DELAY_S)
        return super()._store(name, header, payload)
