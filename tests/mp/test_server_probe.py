# SPDX-License-Identifier: Apache-2.0
"""MP-mode settings and the server probe, without a server (tests/e2e/test_mp_mode.py has real ones)."""

import time

import pytest

from vllm_kvplugin.demo.server import free_port
from vllm_kvplugin.mp.server_probe import (
    ENGINE_DRIVEN, LMCACHE_DRIVEN, ServerAnswer, ServerUnavailable, ask, choose_transfer_mode, is_local)
from vllm_kvplugin.mp.settings import check_mp_config, eager_prefetch, is_mp_config, server_urls

BOTH = frozenset({ENGINE_DRIVEN, LMCACHE_DRIVEN})
LOCAL, REMOTE = "tcp://127.0.0.1:5555", "tcp://10.0.0.7:5555"


@pytest.mark.parametrize("url, modes, device, chosen", [
    (LOCAL, BOTH, "cpu", ENGINE_DRIVEN),  # vllm-kvplugin server: LMCache's default for CPU
    (LOCAL, BOTH, "hpu", ENGINE_DRIVEN),
    (LOCAL, BOTH, "cuda", LMCACHE_DRIVEN),
    (LOCAL, {LMCACHE_DRIVEN}, "cpu", LMCACHE_DRIVEN),  # a stock server: the CPU SHM path
    (LOCAL, {ENGINE_DRIVEN}, "cuda", ENGINE_DRIVEN),
    (REMOTE, BOTH, "cpu", ENGINE_DRIVEN),
])
def test_a_mode_both_sides_serve_is_chosen(url, modes, device, chosen):
    assert choose_transfer_mode(ServerAnswer(url, frozenset(modes)), device, None) == chosen
    assert choose_transfer_mode(ServerAnswer(url, frozenset(modes)), device, "auto") == chosen


@pytest.mark.parametrize("url, modes, device", [
    (LOCAL, {LMCACHE_DRIVEN}, "hpu"),  # Gaudi cannot hand the server device memory
    (REMOTE, {LMCACHE_DRIVEN}, "cpu"),  # shared memory does not cross hosts
    (LOCAL, set(), "cpu"),
])
def test_no_common_mode_names_the_server_flag(url, modes, device):
    with pytest.raises(ServerUnavailable, match="--supported-transfer-mode auto"):
        choose_transfer_mode(ServerAnswer(url, frozenset(modes)), device, None)


def test_a_requested_mode_the_server_lacks_is_refused():
    with pytest.raises(ServerUnavailable, match="mp_transfer_mode=engine_driven"):
        choose_transfer_mode(ServerAnswer(LOCAL, frozenset({LMCACHE_DRIVEN})), "cpu", ENGINE_DRIVEN)
    assert choose_transfer_mode(ServerAnswer(LOCAL, BOTH), "cpu", LMCACHE_DRIVEN) == LMCACHE_DRIVEN


def test_locality():
    assert is_local("127.0.0.1:5555") and is_local("tcp://localhost:1") and is_local("ipc:///tmp/lmc")
    assert not is_local(REMOTE) and not is_local("tcp://lmcache.internal:5555")


def test_no_server_is_an_error_in_seconds_naming_the_fix():
    url = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ServerUnavailable, match="vllm-kvplugin server"):
        ask(url, 1.0)
    assert time.monotonic() - start < 5


def test_mp_keys_select_mp_mode_and_in_process_keys_are_refused():
    assert is_mp_config({"lmcache.mp.port": 5555}) and not is_mp_config({"lmcache.chunk_size": 256})
    assert not is_mp_config(None)
    assert check_mp_config({"lmcache.mp.port": 1, "kvplugin.mp.probe_timeout_s": 2}) == 2.0
    for key in ("kvplugin.directio.path", "lmcache.chunk_size", "lmcache.local_cpu"):
        with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*lmcache server"):
            check_mp_config({"lmcache.mp.port": 1, key: "x"})
    with pytest.raises(ValueError, match="probe_timeout_s"):
        check_mp_config({"lmcache.mp.port": 1, "kvplugin.mp.probe_timeout_s": 0})


def test_server_urls_follow_lmcache_precedence():
    assert server_urls({"lmcache.mp.port": 6000}) == ["tcp://localhost:6000"]
    assert server_urls({"lmcache.mp.host": "tcp://10.0.0.1", "lmcache.mp.port": 7}) == ["tcp://10.0.0.1:7"]
    assert server_urls({"lmcache.mp.server_urls": "tcp://a:1, tcp://b:2", "lmcache.mp.port": 9}) == [
        "tcp://a:1", "tcp://b:2"]
    assert server_urls({"lmcache.mp.server_urls": ["tcp://a:1"]}) == ["tcp://a:1"]


def test_lookups_start_on_arrival_unless_the_user_says_no_and_never_for_a_producer():
    import inspect

    from lmcache.integration.vllm.lmcache_mp_connector import LMCacheMPConnector

    assert eager_prefetch({"lmcache.mp.port": 1}, loads=True)
    assert not eager_prefetch({"lmcache.mp.port": 1}, loads=False)
    for off in (False, "false", "0", "off"):
        assert not eager_prefetch({"lmcache.mp.eager_prefetch": off}, loads=True)
    assert eager_prefetch({"lmcache.mp.eager_prefetch": "true"}, loads=True)
    # the connector sets the attribute LMCache's on_new_request reads (lmcache 0.5.6)
    assert "self._eager_prefetch" in inspect.getsource(LMCacheMPConnector.on_new_request)


def test_doctor_reports_a_missing_server_as_a_fail(monkeypatch):
    import json

    from vllm_kvplugin import doctor

    kv = {"kv_connector": "LMCachePortableConnector", "kv_role": "kv_both",
          "kv_connector_extra_config": {"lmcache.mp.port": free_port(), "kvplugin.mp.probe_timeout_s": 1}}
    findings = doctor.diagnose(json.dumps(kv))
    server = [f for f in findings if f.check.startswith("lmcache server")]
    assert [f.level for f in server] == ["fail"]
    assert "no LMCache server answered" in server[0].message
    assert any(f.check == "config" and "multiprocess" in f.message for f in findings)
    assert doctor.exit_code(findings) == 1
