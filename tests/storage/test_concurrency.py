# SPDX-License-Identifier: Apache-2.0
"""Several processes writing and reading the same chunk files at once never see a torn chunk."""

import json
import subprocess
import sys

WORKER = r"""
import json, os, sys, time
from vllm_kvplugin.storage.directory import ChunkDirectory
from vllm_kvplugin.storage.format import ChunkHeader, ChunkRejected, crc32c, encode_header
from vllm_kvplugin.storage.io import choose_io

root, role, ident, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
directory, io = ChunkDirectory(root, 10**9), choose_io(root)
keys = [f"key-{i}" for i in range(16)]
stats = {"writes": 0, "reads": 0, "misses": 0, "rejected": 0, "foreign": 0, "engine": io.name}
deadline = time.monotonic() + seconds
i = 0
while time.monotonic() < deadline:
    key = keys[i % len(keys)]
    i += 1
    path = directory.path_for(key)
    if role == "writer":
        payload = bytes([ident]) * (3 * 4096 + 17 * ident)  # each writer's version differs in bytes and length
        header = ChunkHeader(key, "int8", (len(payload),), "fp", len(payload), crc32c(payload))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        io.write(path, encode_header(header), payload)
        stats["writes"] += 1
    else:
        try:
            _, data = io.read(path, key)
        except FileNotFoundError:
            stats["misses"] += 1
            continue
        except ChunkRejected:
            stats["rejected"] += 1
            continue
        stats["reads"] += 1
        first = data[0]
        if bytes(data) != bytes([first]) * (3 * 4096 + 17 * first):
            stats["foreign"] += 1
print(json.dumps(stats))
"""


def test_two_writers_and_two_readers_on_one_directory(tmp_path):
    roles = [("writer", 1), ("writer", 2), ("reader", 0), ("reader", 0)]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), role, str(ident), "4"],
                         stdout=subprocess.PIPE, text=True)
        for role, ident in roles
    ]
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    writers, readers = results[:2], results[2:]
    assert all(w["writes"] > 50 for w in writers)
    assert sum(r["reads"] for r in readers) > 50
    assert all(r["rejected"] == 0 and r["foreign"] == 0 for r in readers), readers  # never torn, never mixed
    assert all(r["engine"] == "posix-odirect" for r in results)
    assert not [p for p in tmp_path.rglob("*.tmp")]  # every temporary file was renamed into place
