# SPDX-License-Identifier: Apache-2.0
"""Every configuration the connector refuses at startup, with the exact message an operator sees.

``check_extra_config`` runs what ``prepare_config`` runs in the engine core and
each worker (``kv_connector_extra_config`` applied to LMCache's config, then the
checks), on a fresh config. LMCache 0.5.6 itself only logs an unknown key or a
value its converter rejects and carries on with the default; these are refused.
"""

from types import SimpleNamespace

import pytest

from vllm_kvplugin.lmcache.settings import check_extra_config, check_model_supported

TIER = {"kvplugin.directio.path": "/srv/kv"}
UNSUPPORTED = "LMCache config unsupported by vllm-kvplugin: "

REFUSED = [
    # the direct-I/O tier's own keys
    ({"kvplugin.directio.pth": "/x"},
     "unknown kv_connector_extra_config key(s) ['kvplugin.directio.pth']; valid keys: "
     "kvplugin.directio.path: directory of the direct-I/O tier (enables it); "
     "kvplugin.directio.max_size_gb: size budget of that directory, GB (default 10); "
     "kvplugin.directio.io_threads: writer threads (default 2); "
     "kvplugin.directio.read_ahead: chunks one lookup or load reads at once (default 4); "
     "kvplugin.directio.engine: I/O engine of its files: auto (default: hipFile for chunks on device, else "
     "O_DIRECT), posix, nixl or hipfile; one that cannot run falls back to O_DIRECT, logged; "
     "kvplugin.remote.url: redis://[user:password@]host:port[/db] or s3://bucket[/prefix] of the shared "
     "remote tier (enables it); "
     "kvplugin.remote.endpoint_url: the S3 endpoint, http(s)://host:port, of a store other than AWS "
     "(credentials and region from boto3's environment: AWS_ACCESS_KEY_ID, ...); "
     "kvplugin.remote.timeout_s: bound on any one call to that server, s (default 1; 5 for s3://); "
     "kvplugin.remote.io_threads: its writer threads (default 2); "
     "kvplugin.remote.read_ahead: chunks one lookup or load reads from it at once (default 4); "
     "kvplugin.save_mode: async (store behind the forward pass) or sync (inside it); "
     "default async on CUDA/ROCm, sync on CPU and HPU; "
     "kvplugin.handoff_timeout_s: bound on how long a prefill step waits for its handed-off KV to be "
     "written, s (default 30); "
     "kvplugin.huge_pages: true: back vLLM-CPU's KV cache with 2 MiB pages at startup (MADV_COLLAPSE; "
     "faster moves of small or strided blocks, ~0.3 s per GiB of KV cache at startup, more on VMs); default false"),
    ({"kvplugin.save_mode": "later"}, "kvplugin.save_mode must be one of sync, async, got 'later'"),
    ({"kvplugin.handoff_timeout_s": "0"}, "kvplugin.handoff_timeout_s must be a positive number of seconds, got '0'"),
    ({"kvplugin.directio.path": ""}, "kvplugin.directio.path must name a directory, got ''"),
    ({"kvplugin.directio.path": 5}, "kvplugin.directio.path must name a directory, got 5"),
    # the remote tier's own keys (a bad URL is never echoed: it may carry a password)
    ({"kvplugin.remote.url": "http://u:pw@h:1"},
     "kvplugin.remote.url must be a redis://, rediss://, unix://, s3:// URL"),
    ({"kvplugin.remote.url": "s3://AKIA:s3cret@bucket"},
     "kvplugin.remote.url must not carry S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
     "environment (or any source boto3 reads)"),
    ({"kvplugin.remote.url": "s3://h:9000/bucket"},
     "kvplugin.remote.url must be s3://<bucket>[/<prefix>] (the endpoint goes in kvplugin.remote.endpoint_url)"),
    ({"kvplugin.remote.url": "s3:///prefix"},
     "kvplugin.remote.url must be s3://<bucket>[/<prefix>] (the endpoint goes in kvplugin.remote.endpoint_url)"),
    ({"kvplugin.remote.url": "s3://bucket", "kvplugin.remote.endpoint_url": "s3.example:9000"},
     "kvplugin.remote.endpoint_url must be an http:// or https:// URL without credentials"),
    ({"kvplugin.remote.url": "s3://bucket", "kvplugin.remote.endpoint_url": "http://ak:sk@s3.example:9000"},
     "kvplugin.remote.endpoint_url must be an http:// or https:// URL without credentials"),
    ({"kvplugin.remote.url": "redis://h:1", "kvplugin.remote.endpoint_url": "http://s3.example:9000"},
     "kvplugin.remote.endpoint_url is for an s3:// kvplugin.remote.url only"),
    ({"kvplugin.remote.url": "redis://h:1", "kvplugin.remote.timeout_s": 0},
     "kvplugin.remote.timeout_s must be a positive number, got 0"),
    ({"kvplugin.directio.max_size_gb": 1}, "kvplugin.directio.path must name a directory, got None"),
    ({**TIER, "kvplugin.directio.max_size_gb": "lots"},
     "kvplugin.directio.max_size_gb must be a positive number, got 'lots'"),
    ({**TIER, "kvplugin.directio.max_size_gb": -1}, "kvplugin.directio.max_size_gb must be a positive number, got -1"),
    ({**TIER, "kvplugin.directio.max_size_gb": 0}, "kvplugin.directio.max_size_gb must be a positive number, got 0"),
    ({**TIER, "kvplugin.directio.max_size_gb": float("inf")},
     "kvplugin.directio.max_size_gb must be a positive number, got inf"),
    ({**TIER, "kvplugin.directio.max_size_gb": True},
     "kvplugin.directio.max_size_gb must be a positive number, got True"),
    ({**TIER, "kvplugin.directio.io_threads": 0}, "kvplugin.directio.io_threads must be a positive integer, got 0"),
    ({**TIER, "kvplugin.directio.io_threads": 2.5}, "kvplugin.directio.io_threads must be a positive integer, got 2.5"),
    ({**TIER, "kvplugin.directio.io_threads": "two"},
     "kvplugin.directio.io_threads must be a positive integer, got 'two'"),
    ({**TIER, "kvplugin.directio.engine": "gds"},
     "kvplugin.directio.engine must be one of auto, posix, nixl, hipfile, got 'gds'"),
    # LMCache keys LMCache itself would only log
    ({"lmcache.chunk_size": "x"}, "lmcache.chunk_size='x' is not a valid int for LMCache"),
    ({"lmcache.max_local_cpu_size": "lots"}, "lmcache.max_local_cpu_size='lots' is not a valid float for LMCache"),
    ({"lmcache.extra_config": "{bad"}, "lmcache.extra_config='{bad' is not a valid Optional[dict] for LMCache"),
    ({"lmcache.save_unfull_chunk": "yes"}, "lmcache.save_unfull_chunk must be true or false, got 'yes'"),
    ({"kvplugin.huge_pages": "on"}, "kvplugin.huge_pages must be true or false, got 'on'"),
    # settings under which whole-block transfer would be wrong
    ({"lmcache.chunk_size": 100},
     UNSUPPORTED + "chunk_size=100 is not a multiple of vLLM's block_size=32: "
     "set lmcache.chunk_size to a multiple of 32"),
    ({"lmcache.chunk_size": 0}, UNSUPPORTED + "chunk_size=0: set lmcache.chunk_size to a positive multiple of 32"),
    ({"lmcache.chunk_size": -32}, UNSUPPORTED + "chunk_size=-32: set lmcache.chunk_size to a positive multiple of 32"),
    ({"lmcache.use_layerwise": "true"},
     UNSUPPORTED + "use_layerwise=True is not supported by the portable connector yet"),
    ({"lmcache.enable_blending": 1}, UNSUPPORTED + "enable_blending=True (CacheBlend) needs LMCache's CUDA kernels"),
    ({"lmcache.chunk_size": 100, "lmcache.use_layerwise": True},
     UNSUPPORTED + "chunk_size=100 is not a multiple of vLLM's block_size=32: set lmcache.chunk_size to a multiple "
     "of 32; use_layerwise=True is not supported by the portable connector yet"),
]


@pytest.mark.parametrize("extra, message", REFUSED, ids=[str(extra) for extra, _ in REFUSED])
def test_refused_with_exact_message(extra, message):
    with pytest.raises(ValueError) as err:
        check_extra_config(extra, 32)
    assert str(err.value) == message


@pytest.mark.parametrize("key, hint", [("lmcache.chunk_sise", " (did you mean lmcache.chunk_size?)"),
                                       ("lmcache.frobnicate", "")])
def test_unknown_lmcache_key_names_itself_and_every_valid_key(key, hint):
    from lmcache.v1.config import _CONFIG_DEFINITIONS

    with pytest.raises(ValueError) as err:
        check_extra_config({key: 256}, 32)
    prefix = f"unknown LMCache setting {key!r}{hint}; LMCache 0.5.6 knows: "
    assert str(err.value) == prefix + ", ".join(sorted(_CONFIG_DEFINITIONS))


def test_a_bad_remote_url_is_refused_without_echoing_it(monkeypatch):
    """No string fails LMCache's conversion today; should one, a URL's credentials stay out of the message."""
    monkeypatch.setattr("vllm_kvplugin.lmcache.settings.validate_and_set_config_value", lambda *a, **k: False)
    with pytest.raises(ValueError) as err:
        check_extra_config({"lmcache.remote_url": "redis://u:s3cret@h:6379"}, 32)
    assert str(err.value) == "lmcache.remote_url is not a valid Optional[str] for LMCache"


def test_the_tail_is_stored_unless_save_unfull_chunk_is_set(monkeypatch, tmp_path):
    """LMCache's default drops every partial chunk; the connector keeps it (as whole blocks, block_tail)
    unless the user set the key in kv_connector_extra_config, LMCache's variable or its config file."""
    monkeypatch.delenv("LMCACHE_SAVE_UNFULL_CHUNK", raising=False)
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    assert check_extra_config({}, 32).save_unfull_chunk is True
    assert check_extra_config({"lmcache.save_unfull_chunk": "false"}, 32).save_unfull_chunk is False
    monkeypatch.setenv("LMCACHE_SAVE_UNFULL_CHUNK", "False")
    assert check_extra_config({}, 32).save_unfull_chunk is False
    monkeypatch.delenv("LMCACHE_SAVE_UNFULL_CHUNK")
    config_file = tmp_path / "lmcache.yaml"
    config_file.write_text("chunk_size: 128\nsave_unfull_chunk: false\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(config_file))
    assert check_extra_config({}, 32).save_unfull_chunk is False
    config_file.write_text("chunk_size: 128\n")
    assert check_extra_config({}, 32).save_unfull_chunk is True


def test_lookups_may_take_as_long_as_a_long_prompt_takes_to_read_unless_the_user_bounds_them(monkeypatch):
    """LMCache's 3 s lookup timeout is shorter than reading a 128K-token prompt's KV from disk or Redis."""
    from vllm_kvplugin.lmcache.settings import LOOKUP_TIMEOUT_MS

    monkeypatch.delenv("LMCACHE_LOOKUP_TIMEOUT_MS", raising=False)
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    assert check_extra_config({}, 32).lookup_timeout_ms == LOOKUP_TIMEOUT_MS >= 60_000
    assert check_extra_config({"lmcache.lookup_timeout_ms": "5000"}, 32).lookup_timeout_ms == 5000
    monkeypatch.setenv("LMCACHE_LOOKUP_TIMEOUT_MS", "7000")
    assert check_extra_config({}, 32).lookup_timeout_ms == 7000


def test_well_typed_strings_are_accepted_and_converted():
    config = check_extra_config({**TIER, "kvplugin.directio.max_size_gb": "20", "kvplugin.directio.io_threads": "4",
                                 "lmcache.chunk_size": "64", "lmcache.save_unfull_chunk": "False"}, 32)
    assert config.chunk_size == 64 and config.save_unfull_chunk is False
    assert config.extra_config["kvplugin.directio.max_size_gb"] == 20.0
    assert config.extra_config["kvplugin.directio.io_threads"] == 4


def model_setup(pp=1, mla=False, device="cpu", sleep=False):
    return SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=pp),
                           model_config=SimpleNamespace(use_mla=mla, enable_sleep_mode=sleep),
                           device_config=SimpleNamespace(device=device))


MODEL = "model setup unsupported by vllm-kvplugin: "
PP = ("pipeline_parallel_size=2: pipeline parallelism is not supported (untested: vLLM-CPU 0.32 fails on the first "
      "request with it, connector or not); use tensor_parallel_size instead")
MLA = ("MLA models (DeepSeek-V2/V3 style) on vLLM-CPU: its MLA prefill over reused context gives different tokens "
       "than a full prefill (vLLM disables prefix caching for MLA on CPU for this reason); serve this model without "
       "the KV connector")
SLEEP = ("enable_sleep_mode: sleep and wake re-create the KV cache under the connector, which LMCache's adapter "
         "does not re-register (vLLM 0.33's unregister/restore_kv_caches); turn sleep mode off")


@pytest.mark.parametrize("setup, message", [
    (model_setup(pp=2), MODEL + PP),
    (model_setup(mla=True), MODEL + MLA),
    (model_setup(pp=2, mla=True), MODEL + PP + "; " + MLA),
    (model_setup(sleep=True), MODEL + SLEEP),
], ids=["pipeline-parallel", "mla-on-cpu", "both", "sleep-mode"])
def test_model_setups_refused_with_exact_message(setup, message):
    with pytest.raises(ValueError) as err:
        check_model_supported(setup)
    assert str(err.value) == message


def test_mla_off_cpu_and_plain_setups_pass():
    check_model_supported(model_setup(mla=True, device="cuda"))
    check_model_supported(model_setup())
