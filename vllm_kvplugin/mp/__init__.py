# SPDX-License-Identifier: Apache-2.0
"""LMCache's multiprocess (MP) mode: a separately run ``lmcache server`` holds the cache.

* :mod:`.connector` — ``LMCachePortableConnector`` in MP mode (vLLM's engine
  core and workers): LMCache's ``LMCacheMPConnector`` plus a server check that
  fails in seconds, a transfer mode that fits the server, strict roles and
  our metrics.
* :mod:`.server_probe` — what a running server answers (reachable, which
  transfer modes), for the connector and ``doctor``.
* :mod:`.l2_adapter` — the direct-I/O chunk-file tier as the server's L2
  adapter (``lmcache server`` process).
* :mod:`.server` — the ``lmcache server`` command line ``vllm-kvplugin server`` runs.
"""
