# SPDX-License-Identifier: Apache-2.0
"""Where chunk files live, which exist, and which to evict: one directory, shared by processes.

Runs in the vLLM worker process (the storage tier). Several workers, on one or
several vLLM instances, may use one directory at once: files appear by atomic
rename, so every process sees whole files; each process keeps its own index
of what it knows, rebuilt from the directory at startup (a restarted engine
is warm), and a key missing from the index is looked up on disk before it
counts as a miss (another process may have written it).

Permissions: directories the tier creates (the root if missing, and the
``xx/`` fan-out subdirectories) are 0700 and files 0600, so other local users
can neither read prompts' KV nor plant chunks. A directory that already
exists keeps its mode: an operator may share one tier between service
accounts through a group-writable directory (the subdirectories the tier
creates inside it are still 0700, owned by the writing process's user).

If the whole directory disappears while serving (an operator's ``rm -rf``, a
shared directory wiped by another node), reads become misses, the index
forgets every entry at once (:meth:`ChunkDirectory.vanished`), and the next
write recreates the tree (:meth:`ChunkDirectory.make_dirs_for`).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from vllm_kvplugin.storage.format import HEADER_SIZE, aligned

SUFFIX = ".kvchunk"


@dataclass
class _Entry:
    path: str
    nbytes: int


class ChunkDirectory:
    """Cache-key → file mapping, with a byte budget kept by evicting the least recently used files.

    Args:
        root: the directory (created 0700 if missing).
        capacity_bytes: the most bytes of chunk files this process lets the
            directory hold; writes beyond it evict the oldest-used files first.
    """

    def __init__(self, root: str, capacity_bytes: int):
        self.root = root
        self.capacity_bytes = capacity_bytes
        os.makedirs(root, mode=0o700, exist_ok=True)  # parents above the root keep the default mode
        self._lock = threading.Lock()
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._pinned: dict[str, int] = {}
        self.used_bytes = 0
        self.evictions = 0  # files this process evicted, ever (the worker's stats report increments)
        self._rescan()

    def path_for(self, key: str) -> str:
        """Keys never become paths: a SHA-256 of the key names the file (no traversal, fixed length)."""
        return self._path(self._digest(key))

    def _path(self, digest: str) -> str:
        return os.path.join(self.root, digest[:2], digest + SUFFIX)

    def file_size(self, payload_len: int) -> int:
        return HEADER_SIZE + aligned(payload_len)

    def _rescan(self) -> None:
        """Index the files already there, oldest access first (restart keeps the cache)."""
        found = []
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                if name.endswith(SUFFIX):
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        continue
                    found.append((st.st_atime, name[: -len(SUFFIX)], path, st.st_size))
        for _, digest, path, size in sorted(found):
            self._index[digest] = _Entry(path, size)
            self.used_bytes += size

    @staticmethod
    def _digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def lookup(self, key: str) -> str | None:
        """The file holding ``key`` if one exists (marks it recently used)."""
        digest = self._digest(key)
        with self._lock:
            entry = self._index.get(digest)
            if entry is not None:
                self._index.move_to_end(digest)
                return entry.path
        path = self._path(digest)
        try:  # written by another process since we last looked
            size = os.stat(path).st_size
        except FileNotFoundError:
            return None
        # Note: files other processes write count against this process's budget only
        # once it has seen them; each process evicts within its own view.
        with self._lock:
            if digest not in self._index:
                self._index[digest] = _Entry(path, size)
                self.used_bytes += size
        return path

    def make_dirs_for(self, path: str) -> int:
        """Create the root and ``path``'s fan-out subdirectory, 0700, where missing (also after an ``rm -rf``).

        Returns how many index entries were dropped because the root itself had to be recreated.
        """
        dropped = 0
        try:
            os.mkdir(self.root, 0o700)
            dropped = self._forget_all()  # a new, empty tree: nothing indexed can be in it
        except FileExistsError:
            pass  # an existing directory keeps its mode (it may be deliberately group-shared)
        except FileNotFoundError:  # the root's parents went too
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            dropped = self._forget_all()
        try:
            os.mkdir(os.path.dirname(path), 0o700)
        except FileExistsError:
            pass
        return dropped

    def vanished(self, key: str) -> int:
        """``key``'s file is gone: forget it, and every entry if the whole root went with it.

        Returns how many index entries were dropped.
        """
        if os.path.isdir(self.root):
            return int(self._forget(self._digest(key)))
        return self._forget_all()

    def _forget_all(self) -> int:
        with self._lock:
            dropped = len(self._index)
            self.used_bytes -= sum(entry.nbytes for entry in self._index.values())  # in-flight claims stay
            self._index.clear()
        return dropped

    def reserve(self, nbytes: int) -> None:
        """Claim ``nbytes`` of the budget for a file about to be written, evicting the least
        recently used unpinned files as needed. Follow with :meth:`commit` or :meth:`release`."""
        victims = []
        with self._lock:
            for digest, entry in list(self._index.items()):
                if self.used_bytes + nbytes <= self.capacity_bytes:
                    break
                if self._pinned.get(digest):
                    continue
                del self._index[digest]
                self.used_bytes -= entry.nbytes
                victims.append(entry.path)
            self.used_bytes += nbytes  # concurrent writers see each other's claims
            self.evictions += len(victims)  # under the lock: writer threads evict concurrently
        for path in victims:
            self._unlink(path)

    def commit(self, key: str, nbytes: int) -> None:
        """The reserved file for ``key`` is in place."""
        digest = self._digest(key)
        with self._lock:
            old = self._index.pop(digest, None)
            if old is not None:  # replaced a file of the same key
                self.used_bytes -= old.nbytes
            self._index[digest] = _Entry(self._path(digest), nbytes)

    def release(self, nbytes: int) -> None:
        """A reserved write did not happen."""
        with self._lock:
            self.used_bytes -= nbytes

    def remove(self, key: str) -> bool:
        """Forget ``key`` and delete its file (a bad file, or an explicit remove)."""
        digest = self._digest(key)
        self._forget(digest)
        return self._unlink(self._path(digest))

    def _forget(self, digest: str) -> bool:
        with self._lock:
            entry = self._index.pop(digest, None)
            if entry is not None:
                self.used_bytes -= entry.nbytes
        return entry is not None

    def pin(self, key: str, delta: int) -> None:
        digest = self._digest(key)
        with self._lock:
            count = self._pinned.get(digest, 0) + delta
            if count > 0:
                self._pinned[digest] = count
            else:
                self._pinned.pop(digest, None)

    def touch(self, path: str) -> None:
        """Record an access in the file's atime, so the next process's rescan keeps the LRU order."""
        try:
            now = time.time()
            os.utime(path, (now, os.stat(path).st_mtime))
        except OSError:
            pass

    @staticmethod
    def _unlink(path: str) -> bool:
        """Best effort: a file already gone, or on a read-only filesystem, is not an error here."""
        try:
            os.unlink(path)
            return True
        except OSError:
            return False
