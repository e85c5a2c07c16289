# SPDX-License-Identifier: Apache-2.0
"""The direct-I/O L2 adapter through LMCache's own adapter interface, as the MP server drives it.

Real LMCache objects (``ObjectKey``, ``TensorMemoryObj``, ``Bitmap``, event
fds), real files; the adapter is loaded the way ``lmcache server`` loads a
``plugin`` adapter. The end-to-end story with real servers and engines is
tests/e2e/test_mp_mode.py.
"""

import json
import os

import pytest
import torch

from tests.mp.l2_helpers import keys, load, lookup, memory_obj, store
from vllm_kvplugin.mp.l2_adapter import DirectIOL2Adapter, DirectIOL2AdapterConfig
from vllm_kvplugin.mp.server import l2_adapter_json


def new_adapter(path, **params):
    return DirectIOL2Adapter(DirectIOL2AdapterConfig.from_dict({"path": str(path), **params}))


@pytest.mark.parametrize("shape", [(4, 256, 128), (2, 3, 64, 2, 48), (1, 28, 256, 1024)])
def test_stored_chunks_survive_a_restart_byte_exact(tmp_path, shape):
    payloads = [torch.randn(shape).to(torch.bfloat16) for _ in range(3)]
    ks = keys(3)
    first = new_adapter(tmp_path)
    result = store(first, ks, [memory_obj(shape, fill=p) for p in payloads])
    assert result.is_successful() and result.bytes_transferred() == 3 * payloads[0].numel() * 2
    first.close()

    restarted = new_adapter(tmp_path)  # a restarted server: the directory is indexed, no stat per key
    assert lookup(restarted, ks + keys(1, model="other")) == [True, True, True, False]
    targets = [memory_obj(shape) for _ in ks]
    assert load(restarted, ks, targets) == [True, True, True]
    for target, payload in zip(targets, payloads):
        assert torch.equal(target.raw_data.view(torch.bfloat16).view(shape), payload)
    restarted.submit_unlock(ks)
    assert restarted.report_status()["files"] == 3


def test_the_two_transfer_modes_labels_of_one_chunk_load_each_other(tmp_path):
    """lmcache_driven labels a chunk (1, L, T, H), engine_driven (L, T, H): same key, same bytes."""
    adapter = new_adapter(tmp_path)
    payload = torch.randn(4 * 64 * 32).to(torch.bfloat16)
    store(adapter, keys(1), [memory_obj((1, 4, 64, 32), fill=payload)])
    target = memory_obj((4, 64, 32))
    assert load(adapter, keys(1), [target]) == [True]
    assert torch.equal(target.raw_data.view(torch.bfloat16), payload)
    other_layout = memory_obj((4, 32, 64))  # same size, different shape: never taken for it
    assert load(adapter, keys(1), [other_layout]) == [False]


@pytest.mark.parametrize("damage", ["truncate", "payload", "header", "foreign"])
def test_a_damaged_file_is_a_miss_and_is_dropped(tmp_path, damage):
    adapter = new_adapter(tmp_path)
    store(adapter, keys(2), [memory_obj((2, 64, 32), fill=torch.randn(4096)) for _ in range(2)])
    victim = adapter.directory.lookup("org/model@00000000@0@" + (bytes([0]) * 32).hex() + "@")
    size = os.path.getsize(victim)
    if damage == "truncate":
        os.truncate(victim, size - 4096)
    elif damage == "foreign":  # another key's (valid) file under this key's name
        other = adapter.directory.lookup("org/model@00000000@0@" + (bytes([1]) * 32).hex() + "@")
        os.replace(other, victim)
    else:
        with open(victim, "r+b") as f:
            f.seek(4096 + 100 if damage == "payload" else 40)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x01]))
    assert lookup(adapter, keys(1)) == [True]  # lookups trust the index; loads verify
    assert load(adapter, keys(1), [memory_obj((2, 64, 32))]) == [False]
    assert not os.path.exists(victim)
    assert adapter.report_status()["rejected_files"] == 1
    adapter.submit_unlock(keys(1))


def test_locked_chunks_are_not_evicted_until_unlocked(tmp_path):
    shape = (4, 64, 256)  # 128 KiB per chunk + a 4 KiB header
    adapter = new_adapter(tmp_path, max_size_gb=3 * (128 + 4) * 1024 / 1e9)
    store(adapter, keys(3), [memory_obj(shape) for _ in range(3)])
    assert lookup(adapter, keys(1)) == [True]  # locked: the server will load it next
    store(adapter, keys(5)[3:], [memory_obj(shape) for _ in range(2)])  # two more: two evictions
    present = lookup(adapter, keys(5))
    assert present[0], "a locked chunk was evicted"
    assert sum(present) == 3
    adapter.submit_unlock(keys(5))


def test_a_full_disk_is_a_failed_store_not_an_exception(tmp_path):
    adapter = new_adapter(tmp_path)
    adapter.io.write = lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    result = store(adapter, keys(1), [memory_obj((2, 64, 32))])
    assert not result.is_successful()
    assert lookup(adapter, keys(1)) == [False]
    assert adapter.directory.used_bytes == 0


def test_the_nixl_engine_serves_the_same_files(tmp_path):
    pytest.importorskip("nixl", reason="nixl is not installed (pip install 'vllm-kvplugin[nixl]')")
    shape, payload = (4, 64, 32), torch.randn(4 * 64 * 32).to(torch.bfloat16)
    first = new_adapter(tmp_path, engine="nixl")
    assert first.io.name == "nixl-posix"
    assert store(first, keys(1), [memory_obj(shape, fill=payload)]).is_successful()
    first.close()
    for engine in ("posix", "nixl"):  # the files are the same format whichever engine wrote them
        again = new_adapter(tmp_path, engine=engine)
        target = memory_obj(shape)
        assert lookup(again, keys(1)) == [True] and load(again, keys(1), [target]) == [True]
        assert torch.equal(target.raw_data.view(torch.bfloat16), payload.view(-1))
        again.submit_unlock(keys(1))
        again.close()


def test_bad_adapter_params_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="max_size_gb"):
        DirectIOL2AdapterConfig.from_dict({"path": str(tmp_path), "max_size_gb": -1})
    with pytest.raises(ValueError, match="unknown adapter_params"):
        DirectIOL2AdapterConfig.from_dict({"path": str(tmp_path), "base_path": "x"})
    with pytest.raises(ValueError, match="path"):
        DirectIOL2AdapterConfig.from_dict({})
    with pytest.raises(ValueError, match=r"kvplugin\.directio\.engine must be one of"):
        DirectIOL2AdapterConfig.from_dict({"path": str(tmp_path), "engine": "gds"})


def test_lmcache_loads_it_as_a_plugin_adapter(tmp_path):
    """The ``--l2-adapter`` JSON ``vllm-kvplugin server`` writes, through LMCache's own plugin loader."""
    from lmcache.v1.distributed.l2_adapters.factory import create_l2_adapter_from_registry
    from lmcache.v1.distributed.l2_adapters.plugin_l2_adapter import PluginL2AdapterConfig

    config = PluginL2AdapterConfig.from_dict(json.loads(l2_adapter_json(str(tmp_path), 0.5, 2)))
    adapter = create_l2_adapter_from_registry(config)
    assert isinstance(adapter, DirectIOL2Adapter)
    assert adapter.directory.capacity_bytes == 500_000_000
    adapter.close()
