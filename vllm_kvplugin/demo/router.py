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

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_kvplugin.demo.server import completion_reply, free_port


def router_binary() -> str:
    """The ``vllm-router`` installed beside this Python (the test extra), else on ``PATH``."""
    beside = Path(sys.executable).with_name("vllm-router")
    found = str(beside) if beside.exists() else shutil.which("vllm-router")
    if found is None:
        raise FileNotFoundError("vllm-router is not installed: pip install 'vllm-router==0.1.17'")
    return found


class PDRouter:
    """A running ``vllm-router --vllm-pd-disaggregation``; ``stop()`` it (or use it as a context manager)."""

    def __init__(self, prefill_url: str, decode_url: str, model: str, log_path: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model = model
        self._log = open(log_path, "w")
        self.log_path = log_path
        self._proc = subprocess.Popen(
            [router_binary(), "--vllm-pd-disaggregation", "--prefill", prefill_url, "--decode", decode_url,
             "--host", "127.0.0.1", "--port", str(self.port), "--policy", "round_robin",
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def __enter__(self) -> PDRouter:
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"vllm-router exited with {self._proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"vllm-router not ready after {timeout}s")

    def reply(self, prompt: str, max_tokens: int = 8) -> dict:
        """One greedy, non-streamed completion through prefill then decode; the decode server's reply."""
        return completion_reply(self.base_url, self.model, prompt, max_tokens)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._log.close()
