# SPDX-License-Identifier: Apache-2.0
"""The direct-I/O tier when its storage goes away, fills up or turns read-only, inside a real LMCacheEngine.

Never a wrong token, never an exception into the engine: a load that cannot be
served is a miss (the KV buffers stay untouched, vLLM recomputes), a store
that cannot be written is skipped and counted, nothing half-written is ever
visible, and the tier serves normally again once the storage is back.

Full and read-only filesystems are real ones (a tmpfs and a loop-mounted
ext4), mounted where the tests may (they run as root here); elsewhere they
skip and the injected-``OSError`` tests in ``test_directio_tier.py`` remain.
"""

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tier_helpers import (
    CHUNK, DST_TABLE, HEAD, HEADS, LAYERS, SRC_TABLE, TOKENS, assert_loaded, backend, chunk_files, kv, settle, slots,
)

from vllm_kvplugin.storage.directory import SUFFIX
from vllm_kvplugin.storage.format import HEADER_SIZE, ChunkHeader, decode_header, encode_header
from vllm_kvplugin.storage.io import PosixIO

PER_FILE = HEADER_SIZE + LAYERS * 2 * CHUNK * HEADS * HEAD * 2  # one bf16 chunk: 20 KiB


def sequence(i):
    return torch.arange(96) + 1000 * (i + 1)  # 3 whole chunks, distinct per i


def store(engine, tokens, seed):
    """Store and wait for the writer threads (a skipped chunk never becomes a hit)."""
    src = kv(seed=seed)
    engine.store(tokens, kvcaches=src, slot_mapping=slots(SRC_TABLE, len(tokens)))
    settle(engine, tokens, 0)
    return src


def load(engine, tokens):
    dst = kv()
    hits = int(engine.retrieve(tokens, kvcaches=dst, slot_mapping=slots(DST_TABLE, len(tokens))).sum())
    return hits, dst


def modes(root):
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.fixture
def tier_log():
    """Warnings of the tier (LMCache's loggers do not propagate, so caplog would not see them)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logs = [logging.getLogger(f"vllm_kvplugin.lmcache.{m}") for m in ("directio_backend", "chunk_tier")]
    for log in logs:
        log.addHandler(handler)
    yield records
    for log in logs:
        log.removeHandler(handler)


# -- the whole directory removed while serving ----------------------------------


def test_removed_directory_turns_loads_into_misses_then_serves_again(engines, tmp_path, tier_log):
    root = tmp_path / "tier"
    engine = engines(root)
    store(engine, TOKENS, seed=1)
    assert len(backend(engine).directory._index) == 3

    shutil.rmtree(root)  # an operator's rm -rf, or another node wiping a shared directory
    hits, dst = load(engine, TOKENS)
    assert hits == 0 and all(int(t.view(torch.int16).abs().sum()) == 0 for t in dst)  # KV untouched
    assert not backend(engine).directory._index and backend(engine).directory.used_bytes == 0
    assert engine.lookup(TOKENS) == 0
    assert any("was removed; forgot its 3 chunks" in r.getMessage() for r in tier_log)

    src = store(engine, TOKENS, seed=2)  # the tree is recreated, 0700 throughout
    assert len(chunk_files(root)) == 3
    assert all(mode == (0o600 if name.endswith(SUFFIX) else 0o700) for name, mode in modes(root).items())
    hits, dst = load(engine, TOKENS)
    assert hits == 96
    assert_loaded(src, dst)


def test_removed_directory_is_recreated_by_the_next_store_and_old_entries_forgotten(engines, tmp_path, tier_log):
    root = tmp_path / "tier"
    engine = engines(root)
    store(engine, sequence(0), seed=1)
    shutil.rmtree(root)
    src = store(engine, sequence(1), seed=2)  # before any load noticed
    assert engine.lookup(sequence(0)) == 0  # no stale hit for the chunks that went with the directory
    assert len(backend(engine).directory._index) == 3 and backend(engine).skipped_stores == 0
    assert any("recreated it and forgot 3 chunks" in r.getMessage() for r in tier_log)
    hits, dst = load(engine, sequence(1))
    assert hits == 96
    assert_loaded(src, dst)


# -- a real filesystem that fills up or turns read-only ---------------------------


def _run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture(params=["tmpfs", "ext4"])
def small_fs(request, tmp_path):
    """A freshly mounted small filesystem (2 MiB tmpfs, or a 4 MiB ext4 image on a loop device)."""
    where = tmp_path / "mnt"
    where.mkdir()
    if request.param == "tmpfs":
        done = _run("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where))
    else:
        image = tmp_path / "fs.img"
        with open(image, "wb") as f:
            f.truncate(4 << 20)
        done = _run("mkfs.ext4", "-q", "-F", str(image))
        if done.returncode == 0:
            done = _run("mount", "-o", "loop", str(image), str(where))
    if done.returncode:
        pytest.skip(f"cannot mount a {request.param} here ({done.stderr.strip()}); "
                    "test_directio_tier's injected-OSError tests cover this")
    yield where
    _run("umount", "-l", str(where))


def fill_leaving(directory, free_bytes):
    """A filler file that leaves about ``free_bytes`` free on ``directory``'s filesystem."""
    stat = os.statvfs(directory)
    size = stat.f_bfree * stat.f_frsize - free_bytes  # f_bfree: root may use the reserved blocks
    filler = directory / "filler"
    with open(filler, "wb") as f:
        while size > 0:  # the filler's own metadata needs blocks too: shrink until it fits
            try:
                os.posix_fallocate(f.fileno(), 0, size)
                break
            except OSError:
                f.truncate(0)
                size -= 16 << 10
    return filler


def assert_only_whole_chunks(root):
    """No temporary file, and every chunk file complete and verifying."""
    names = [p for p in root.rglob("*") if p.is_file() and p.name != "filler"]
    assert all(p.name.endswith(SUFFIX) for p in names), names
    io = PosixIO(direct=False)
    for path in names:
        key = decode_header(path.read_bytes()[:HEADER_SIZE]).key
        assert path.stat().st_size == PER_FILE and io.read(str(path), key)
    return len(names)


def test_full_disk_skips_stores_keeps_earlier_hits_and_leaves_nothing_half_written(
        engines, small_fs, tier_log):
    root = small_fs / "tier"
    engine = engines(root)  # a 0.5 GB budget: the filesystem fills long before it
    first = store(engine, sequence(0), seed=0)
    filler = fill_leaving(small_fs, 4 * PER_FILE)
    for i in range(1, 6):  # 15 more chunks into room for at most 4
        store(engine, sequence(i), seed=i)

    tier = backend(engine)
    files = assert_only_whole_chunks(root)
    assert tier.skipped_stores >= 11 and files + tier.skipped_stores == 18
    assert len(tier.directory._index) == files
    skipped = [r.getMessage() for r in tier_log if "could not store a chunk" in r.getMessage()]
    # One line per kind of error, then at most one a minute (a slow machine may see a second).
    assert 1 <= len(skipped) <= 3 and "ENOSPC" in skipped[0]
    hits, dst = load(engine, sequence(0))
    assert hits == 96
    assert_loaded(first, dst)

    filler.unlink()  # space is back: stores work again
    again = store(engine, sequence(9), seed=9)
    hits, dst = load(engine, sequence(9))
    assert hits == 96
    assert_loaded(again, dst)


def test_read_only_filesystem_skips_stores_and_still_serves_loads(engines, small_fs, tier_log):
    root = small_fs / "tier"
    engine = engines(root)
    first = store(engine, sequence(0), seed=0)
    if _run("mount", "-o", "remount,ro", str(small_fs)).returncode:
        pytest.skip("cannot remount read-only here")
    try:
        store(engine, sequence(1), seed=1)
        assert backend(engine).skipped_stores == 3 and engine.lookup(sequence(1)) == 0
        assert any("EROFS" in r.getMessage() for r in tier_log)
        hits, dst = load(engine, sequence(0))
        assert hits == 96
        assert_loaded(first, dst)
    finally:
        _run("mount", "-o", "remount,rw", str(small_fs))
    again = store(engine, sequence(1), seed=1)
    hits, dst = load(engine, sequence(1))
    assert hits == 96
    assert_loaded(again, dst)
    assert assert_only_whole_chunks(root) == 6



# -- a crafted file in the directory ----------------------------------------------


@pytest.mark.parametrize("shape", [(2**64 - 1, 2, 32, 2, 32), (2, 2, 1 << 40, 2, 32), (8, 2, 32, 2, 32)],
                         ids=["negative-dim", "huge-dim", "more-than-the-payload"])
def test_a_shape_that_does_not_match_the_payload_is_a_miss_and_never_allocated(
        engines, tmp_path, monkeypatch, shape):
    engine = engines(tmp_path)
    store(engine, TOKENS, seed=1)
    _, _, key = next(iter(engine.token_database.process_tokens(TOKENS)))  # the first chunk of TOKENS
    first = Path(backend(engine).directory.path_for(key.to_string()))
    raw = first.read_bytes()
    header = decode_header(raw[:HEADER_SIZE])
    lie = ChunkHeader(header.key, header.dtype, shape, header.fingerprint, header.payload_len, header.payload_crc,
                      header.memory_format)
    first.write_bytes(encode_header(lie) + raw[HEADER_SIZE:])  # valid checksums, a lying shape

    tier = backend(engine)
    allocations = []
    allocate = tier.local_cpu_backend.allocate
    monkeypatch.setattr(tier.local_cpu_backend, "allocate", lambda *a, **k: allocations.append(a) or allocate(*a, **k))
    hits, dst = load(engine, TOKENS)
    assert hits == 0 and not first.exists()
    assert len(allocations) == 2 and all(tuple(a[0]) == header.shape for a in allocations)  # the intact chunks only
    assert all(int(t.view(torch.int16).abs().sum()) == 0 for t in dst)
