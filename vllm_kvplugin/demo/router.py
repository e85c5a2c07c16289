# SPDX-License-Identifier: Apache-2.0
"""vLLM's PD router (``vllm-router``, vllm-project's Rust router from PyPI) on loopback.

Runs in the process that drives a demo, a test or a benchmark; the router is a
child process in front of one prefill (``kv_producer``) and one decode
(``kv_consumer``) ``vllm serve``. It sends each request to the prefill server
with ``max_tokens=1`` and ``kv_transfer_params: {do_remote_decode: true}``,
then the original request, with the ``kv_transfer_params`` the prefill reply
carried, to the decode server, and answers with the decode server's reply
(REFERENCE §18).

What it shows: ``usage.prompt_tokens_details.cached_tokens`` in its replies is
the *prefill* server's figure (the router reconciles the decode reply's usage
with it), which is 0 for a ``kv_producer`` that never loads. The decode
server's hit is in the reply's ``kv_transfer_params.kvplugin.loaded_tokens``
and in its ``vllm:kvplugin_hit_tokens`` counter.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from vllm_kvplugin.demo.server import OpenAIChild, free_port


def router_binary() -> str:
    """The ``vllm-router`` installed beside this Python (the test extra), else on ``PATH``."""
    beside = Path(sys.executable).with_name("vllm-router")
    found = str(beside) if beside.exists() else shutil.which("vllm-router")
    if found is None:
        raise FileNotFoundError("vllm-router is not installed: pip install 'vllm-router==0.1.17'")
    return found


class PDRouter(OpenAIChild):
    """A running ``vllm-router --vllm-pd-disaggregation`` in front of one prefill and one decode server."""

    name = "vllm-router"
    ready_timeout_s = 60.0
    stop_timeout_s = 10.0

    def __init__(self, prefill_url: str, decode_url: str, model: str, log_path: Path, kv_connector: str | None = None):
        port = free_port()
        command = [router_binary(), "--vllm-pd-disaggregation", "--prefill", prefill_url, "--decode", decode_url,
                   "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
                   "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        super().__init__(command + (["--kv-connector", kv_connector] if kv_connector else []), model, port, log_path)
