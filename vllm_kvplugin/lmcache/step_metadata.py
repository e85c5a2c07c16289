# SPDX-License-Identifier: Apache-2.0
"""The step metadata the engine core sends each worker, as LMCache's own type.

Built in the engine core (scheduler role), unpickled and read in every worker.

It *is* LMCache's ``LMCacheConnectorMetadata`` (same ``requests`` list, same
class hierarchy), plus what the portable connector adds. Being LMCache's type
matters beyond LMCache's own ``isinstance`` assertion: vllm-gaudi's model
runner hands ``start_load_kv`` the prefill attention metadata only when the
step's metadata is an ``LMCacheConnectorMetadata``, and reads its
``requests`` (vllm-gaudi 091bbadd ``hpu_model_runner.py`` ~L2321 and ~L4406).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorMetadata


@dataclass
class PortableConnectorMetadata(LMCacheConnectorMetadata):
    """One step's instructions from the engine core to each worker.

    Attributes:
        requests: LMCache's per-request load and save specs (LMCache's field).
        kept: finished requests whose blocks wait for this worker's save report
            (:mod:`vllm_kvplugin.lmcache.async_save`).
        preempted: requests preempted by this step's schedule.
        handoff: requests whose prompt KV this step completes for another
            instance: their stores must be readable before the step returns
            (:mod:`vllm_kvplugin.lmcache.handoff`).
    """

    kept: frozenset[str] = field(default_factory=frozenset)
    preempted: frozenset[str] = field(default_factory=frozenset)
    handoff: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def extend(cls, lmcache_metadata: LMCacheConnectorMetadata, **notes) -> PortableConnectorMetadata:
        """LMCache's metadata for the step with the connector's ``notes`` added."""
        return cls(requests=lmcache_metadata.requests, **notes)
