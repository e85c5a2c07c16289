# SPDX-License-Identifier: Apache-2.0
"""Doctor checks of LMCache MP servers: reachable, which transfer modes, and which one this host's workers use.

Runs in the user's shell process (``vllm-kvplugin doctor`` with ``lmcache.mp.*``
keys), with the connector's own probe (:mod:`vllm_kvplugin.mp.server_probe`),
so what doctor says is what the workers will do at startup.
"""

from __future__ import annotations

from vllm_kvplugin.mp.server_probe import ServerUnavailable, ask, choose_transfer_mode
from vllm_kvplugin.mp.settings import MP_PREFIX, check_mp_config, server_urls


def check_servers(found, extra: dict, device: str | None) -> None:
    try:
        timeout = check_mp_config(extra)
    except ValueError:
        timeout = 5.0  # already reported by the config check; still probe the servers
    tensor_device = {"rocm": "cuda"}.get(device or "cpu", device or "cpu")
    requested = extra.get(MP_PREFIX + "mp_transfer_mode")
    for url in server_urls(extra):
        check = f"lmcache server {url}"
        try:
            answer = ask(url, timeout)
        except ServerUnavailable as e:
            found.add(check, "fail", str(e))
            continue
        try:
            mode = choose_transfer_mode(answer, tensor_device, requested)
        except ServerUnavailable as e:
            found.add(check, "fail", str(e))
        else:
            found.add(check, "ok", f"answers; serves {' and '.join(sorted(answer.transfer_modes))} transfers; "
                      f"{device or 'cpu'} workers will register with {mode}")
