# SPDX-License-Identifier: Apache-2.0
"""``vllm-kvplugin doctor`` in a subprocess, as a user runs it: a good setup and broken ones.

Each scenario runs the CLI once (about 10 s: it imports vLLM and LMCache) and
several tests assert on its findings.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from vllm_kvplugin.bench.s3_server import SeaweedS3
from vllm_kvplugin.demo.server import free_port
from vllm_kvplugin.storage.redis_store import redacted

SECRET = "s3cret-pw"


def doctor(tmp_path, extra: dict | None, env: dict | None = None, as_json: bool = True):
    """Run the CLI with ``extra`` as ``kv_connector_extra_config``; (exit code, findings or text)."""
    ktc = {"kv_connector": "LMCachePortableConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra or {}}
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("LMCACHE_", "VLLM_PLUGINS", "PT_HPU")) and k != "PYTHONHASHSEED"}
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_kvplugin.cli", "doctor", "--kv-transfer-config", json.dumps(ktc)]
        + (["--json"] if as_json else []),
        env={**clean, "LMCACHE_TRACK_USAGE": "false", **(env or {})}, cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.stdout, proc.stderr[-3000:]
    return proc.returncode, (json.loads(proc.stdout)["findings"] if as_json else proc.stdout), proc.stderr


def levels(findings, check: str) -> list[str]:
    return [f["level"] for f in findings if f["check"] == check]


def message(findings, check: str) -> str:
    return " | ".join(f["message"] for f in findings if f["check"] == check)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    tier = tmp_path_factory.mktemp("tier")
    rc, findings, _ = doctor(tier, {"kvplugin.directio.path": str(tier), "kvplugin.directio.max_size_gb": 0.01})
    return rc, findings, tier


def test_good_setup_exits_0_with_no_failure(good):
    rc, findings, _ = good
    assert rc == 0
    assert not [f for f in findings if f["level"] == "fail"]


def test_good_setup_finds_entry_points_and_both_connector_names(good):
    _, findings, _ = good
    assert levels(findings, "entry points") == ["ok", "ok"]
    assert "vllm.general_plugins: kvplugin = vllm_kvplugin.plugin:register_connectors" in message(findings, "entry points")
    assert levels(findings, "connectors") == ["ok", "ok"]
    assert "LMCacheHPUConnector -> vllm_kvplugin.connector.LMCacheHPUConnector" in message(findings, "connectors")


def test_good_setup_reports_device_mover_and_a_real_tier_probe(good):
    _, findings, tier = good
    assert "device cpu" in message(findings, "platform")
    assert "KV layout LBHNC" in message(findings, "KV mover") and "plane-major rows" in message(findings, "KV mover")
    assert levels(findings, "direct-I/O tier") == ["ok"]
    tier_msg = message(findings, "direct-I/O tier")
    assert "chunk written and read back with posix-" in tier_msg and str(tier) in tier_msg
    assert "sha256_cbor" in message(findings, "hash")  # the platform entry's default
    assert "stores sync, a prompt's tail as whole blocks, lookups wait up to 120 s" in message(findings, "config")
    assert list(tier.iterdir()) == []  # the probe cleaned up after itself


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("broken")
    (tmp / "a-file").write_text("not a directory")
    extra = {
        "kvplugin.directio.path": str(tmp / "a-file" / "tier"),  # cannot be created
        "lmcache.chunk_size": 100,
        "kvplugin.remote.url": f"redis://kv:{SECRET}@127.0.0.1:{free_port()}",  # nobody listens
    }
    return doctor(tmp, extra, env={"LMCACHE_PRE_CACHING_HASH_ALGORITHM": "builtin"})


def test_broken_setup_exits_1(broken):
    assert broken[0] == 1


def test_bad_chunk_size_is_what_the_connector_would_refuse(broken):
    findings = broken[1]
    assert "fail" in levels(findings, "config")
    assert "chunk_size=100 is not a multiple of vLLM's block_size=128" in message(findings, "config")


def test_builtin_hash_without_seed_fails(broken):
    assert levels(broken[1], "hash") == ["fail"]
    assert "PYTHONHASHSEED" in message(broken[1], "hash")


def test_uncreatable_tier_directory_fails(broken):
    assert levels(broken[1], "direct-I/O tier") == ["fail"]
    assert "cannot be created" in message(broken[1], "direct-I/O tier")


def test_unreachable_redis_fails_without_showing_credentials(broken):
    rc, findings, stderr = broken
    assert levels(findings, "remote tier") == ["warn", "fail"]  # a password in the URL, then unreachable
    assert "set KVPLUGIN_REMOTE_PASSWORD" in message(findings, "remote tier")
    assert "redis://***@127.0.0.1:" in message(findings, "remote tier")
    assert SECRET not in json.dumps(findings) and SECRET not in stderr


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--requirepass", SECRET], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            import redis

            redis.Redis(port=port, password=SECRET, socket_timeout=1).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    yield f"redis://default:{SECRET}@127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_missing_tier_directory_warns_and_reachable_redis_is_ok_on_one_screen(tmp_path, redis_url):
    extra = {"kvplugin.directio.path": str(tmp_path / "not-yet"), "kvplugin.remote.url": redis_url}
    rc, screen, stderr = doctor(tmp_path, extra, as_json=False)
    assert rc == 0, screen
    assert "vllm-kvplugin doctor" in screen and "nothing blocks KV reuse" in screen
    flat = " ".join(screen.replace("│", " ").split())  # table cells wrap over several lines
    assert "does not exist; the tier creates it at startup" in flat
    assert "PING answered" in flat
    assert SECRET not in screen and SECRET not in stderr
    assert not (tmp_path / "not-yet").exists()  # doctor never creates the tier


def test_password_in_the_environment_is_probed_without_a_warning(tmp_path, redis_url):
    url = "redis://" + redis_url.rsplit("@", 1)[1]
    rc, findings, stderr = doctor(tmp_path, {"kvplugin.remote.url": url}, env={"KVPLUGIN_REMOTE_PASSWORD": SECRET})
    assert rc == 0
    assert levels(findings, "remote tier") == ["ok"] and "read back and deleted" in message(findings, "remote tier")
    assert SECRET not in json.dumps(findings) and SECRET not in stderr


@pytest.mark.parametrize("credentials", ["right", "wrong"])
def test_s3_bucket_is_probed_and_no_secret_is_shown(tmp_path, credentials):
    with SeaweedS3(tmp_path / "s3") as s3:
        env = s3.env if credentials == "right" else {**s3.env, "AWS_SECRET_ACCESS_KEY": SECRET}
        extra = {"kvplugin.remote.url": s3.url, "kvplugin.remote.endpoint_url": s3.endpoint_url}
        rc, findings, stderr = doctor(tmp_path, extra, env=env)
    text = json.dumps(findings) + stderr
    assert s3.secret_key not in text and SECRET not in text
    if credentials == "right":
        assert rc == 0 and levels(findings, "remote tier") == ["ok"]
        assert "the bucket answered" in message(findings, "remote tier")
    else:
        assert rc == 1 and levels(findings, "remote tier") == ["fail"]
        assert "SignatureDoesNotMatch" in message(findings, "remote tier") or "403" in message(findings, "remote tier")


def test_lmcache_remote_url_and_local_disk_are_what_the_connector_refuses(tmp_path, redis_url):
    extra = {"lmcache.remote_url": redis_url, "lmcache.local_disk": f"file://{tmp_path}/d/",
             "lmcache.max_local_disk_size": 1}
    rc, findings, stderr = doctor(tmp_path, extra)
    assert rc == 1
    refusal = message(findings, "config")
    assert "kvplugin.remote.url" in refusal and "kvplugin.directio.path" in refusal
    assert SECRET not in json.dumps(findings) and SECRET not in stderr


def test_environment_that_breaks_lmcache_or_plugin_loading_fails(tmp_path):
    rc, findings, _ = doctor(tmp_path, {}, env={"LMCACHE_DEVICE_BACKEND": "cpu", "VLLM_PLUGINS": "someone_else"})
    assert rc == 1
    assert levels(findings, "environment") == ["fail"]
    assert "LMCACHE_DEVICE_BACKEND=cpu" in message(findings, "environment")
    assert levels(findings, "entry points") == ["fail"]
    assert "VLLM_PLUGINS='someone_else'" in message(findings, "entry points")
    assert set(levels(findings, "connectors")) == {"fail"}


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://user:pw@host:6379/0", "redis://***@host:6379/0"),
        ("redis://:pw@host:6379", "redis://***@host:6379"),
        ("redis://host:6379", "redis://host:6379"),
    ],
)
def test_redacted_url_hides_credentials(url, shown):
    assert redacted(url) == shown


def test_screen_prints_messages_verbatim_not_as_rich_markup():
    from vllm_kvplugin.doctor import Findings, render

    found = Findings()
    found.add("direct-I/O tier", "ok", "pip install --pre 'vllm-kvplugin[rocm]'")
    assert "'vllm-kvplugin[rocm]'" in render(found, as_json=False)


@pytest.mark.parametrize("role, extra, level, says", [
    ("kv_producer", {"kvplugin.directio.path": "/shared/kv"}, "ok", "waits until its KV is written to kvplugin_directio (at most 30.0 s"),
    ("kv_producer", {"kvplugin.directio.path": "/shared/kv", "kvplugin.handoff_timeout_s": 5}, "ok", "(at most 5 s"),
    ("kv_consumer", {"kvplugin.remote.url": "redis://127.0.0.1:6379"}, "ok", "loaded_tokens"),
    ("kv_producer", {}, "warn", "kv_producer without a shared tier"),
    ("kv_consumer", {"lmcache.max_local_cpu_size": 1}, "warn", "kv_consumer without a shared tier"),
    ("kv_both", {}, None, None),
])
def test_pd_roles_say_what_the_hand_off_does_and_warn_without_a_shared_tier(role, extra, level, says):
    """In process: the config check alone (the CLI runs it too)."""
    import json

    from vllm_kvplugin.doctor import Findings
    from vllm_kvplugin.doctor.config import check_config

    found = Findings()
    check_config(found, json.dumps({"kv_connector": "LMCachePortableConnector", "kv_role": role,
                                    "kv_connector_extra_config": extra}), 32, "cpu")
    pd = [f for f in found if f.check == "pd"]
    if level is None:
        assert pd == []
    else:
        assert [(f.level, says in f.message) for f in pd] == [(level, True)], pd


@pytest.mark.parametrize("engine, used", [(None, "posix-odirect"), ("posix", "posix-odirect"), ("nixl", "nixl-posix")])
def test_the_direct_io_finding_names_the_configured_engine(tmp_path, engine, used):
    """In process: the tier probe alone, with the engine from ``kvplugin.directio.engine``."""
    from vllm_kvplugin.doctor import Findings
    from vllm_kvplugin.doctor.tiers import check_tiers
    from vllm_kvplugin.lmcache.settings import check_extra_config

    if engine == "nixl":
        pytest.importorskip("nixl", reason="nixl is not installed (pip install 'vllm-kvplugin[nixl]')")
    extra = {"kvplugin.directio.path": str(tmp_path), "kvplugin.directio.max_size_gb": 0.01}
    extra |= {"kvplugin.directio.engine": engine} if engine else {}
    found = Findings()
    check_tiers(found, check_extra_config(extra, 32), extra)
    tier = [f for f in found if f.check == "direct-I/O tier"]
    assert [f.level for f in tier] == ["ok"] and f"read back with {used} (" in tier[0].message
    assert list(tmp_path.iterdir()) == []
