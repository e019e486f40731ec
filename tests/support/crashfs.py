"""A crash-simulating ``Storage`` for the spool (after SQLite's crash-test VFS, src/test6.c).

Every file keeps two versions: what the process wrote (the page cache) and what
the last ``fdatasync`` made durable.  Every directory keeps its current names
and the names its last ``fsync_dir`` made durable.  ``power_cut()`` keeps only
the durable state, except that each file may keep a random part of its unsynced
tail (a torn write), possibly zeroed (blocks allocated, data never written).
After the cut every call fails with EIO, as on a dead disk; ``recovered()`` is
the disk as the next boot sees it.

``cut_at=N`` cuts the power inside the N-th storage call (before it takes
effect), so a test can cut at every point of a run.
"""

from __future__ import annotations

import errno
import os
import random
import threading


class Inode:
    __slots__ = ("data", "synced")

    def __init__(self, data: bytes = b"", synced: bytes = b"") -> None:
        self.data = bytearray(data)
        self.synced = bytes(synced)


class CrashFS:
    def __init__(self, seed: int = 0, cut_at: int | None = None) -> None:
        self.rng = random.Random(seed)
        self.cut_at = cut_at
        self.calls = 0
        self.dead = False
        self.lock = threading.RLock()
        self.dirs: dict[str, dict[str, Inode]] = {}
        self.durable_dirs: dict[str, dict[str, Inode]] = {}
        self.fds: dict[int, Inode] = {}
        self._next_fd = 3
        self.synced_calls = {"fdatasync": 0, "fsync_dir": 0}

    # --- the power cut ----------------------------------------------------------

    def _enter(self, op: str) -> None:
        if self.dead:
            raise OSError(errno.EIO, f"{op}: power is off")
        self.calls += 1
        if self.cut_at is not None and self.calls >= self.cut_at:
            self.power_cut()
            raise OSError(errno.EIO, f"{op}: power cut")

    def power_cut(self) -> None:
        with self.lock:
            self.dead = True

    def recovered(self) -> CrashFS:
        """What survives the cut: durable names, durable bytes, maybe a torn tail."""
        with self.lock:
            fs = CrashFS(seed=self.rng.randrange(1 << 30))
            for path, entries in self.durable_dirs.items():
                fs.dirs[path] = {}
                for name, inode in entries.items():
                    data = inode.synced
                    if bytes(inode.data[: len(data)]) == data and len(inode.data) > len(data):
                        tail = bytes(inode.data[len(data):])
                        tail = tail[: self.rng.randint(0, len(tail))]
                        if tail and self.rng.random() < 0.3:
                            tail = bytes(len(tail))
                        data += tail
                    fs.dirs[path][name] = Inode(data, data)
                fs.durable_dirs[path] = dict(fs.dirs[path])
            return fs

    # --- Storage ------------------------------------------------------------------

    def _lookup(self, path: str) -> tuple[dict[str, Inode], str]:
        directory, name = os.path.split(path)
        entries = self.dirs.get(directory)
        if entries is None:
            raise FileNotFoundError(errno.ENOENT, "no such directory", directory)
        return entries, name

    def _inode(self, path: str) -> Inode:
        entries, name = self._lookup(path)
        if name not in entries:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        return entries[name]

    def _fd(self, inode: Inode) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self.fds[fd] = inode
        return fd

    def makedirs(self, path: str) -> None:
        with self.lock:
            self._enter("makedirs")
            self.dirs.setdefault(path, {})
            self.durable_dirs.setdefault(path, {})  # made by the installer, long ago

    def listdir(self, path: str) -> list[str]:
        with self.lock:
            self._enter("listdir")
            entries, _ = self._lookup(os.path.join(path, "x"))
            return list(entries)

    def read_file(self, path: str) -> bytes:
        with self.lock:
            self._enter("read_file")
            return bytes(self._inode(path).data)

    def create(self, path: str, exclusive: bool) -> int:
        with self.lock:
            self._enter("create")
            entries, name = self._lookup(path)
            if name in entries:
                if exclusive:
                    raise FileExistsError(errno.EEXIST, "exists", path)
                del entries[name].data[:]
                return self._fd(entries[name])
            entries[name] = Inode()
            return self._fd(entries[name])

    def open_read(self, path: str) -> int:
        with self.lock:
            self._enter("open_read")
            return self._fd(self._inode(path))

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        with self.lock:
            self._enter("pread")
            return bytes(self.fds[fd].data[offset: offset + size])

    def append(self, fd: int, data: bytes) -> None:
        with self.lock:
            self._enter("append")
            self.fds[fd].data += data

    def fdatasync(self, fd: int) -> None:
        with self.lock:
            self._enter("fdatasync")
            inode = self.fds[fd]
            inode.synced = bytes(inode.data)
            self.synced_calls["fdatasync"] += 1

    def truncate(self, fd: int, size: int) -> None:
        with self.lock:
            self._enter("truncate")
            del self.fds[fd].data[size:]

    def close(self, fd: int) -> None:
        with self.lock:
            self.fds.pop(fd, None)  # a close never fails, not even after the cut

    def fsync_dir(self, path: str) -> None:
        with self.lock:
            self._enter("fsync_dir")
            self.durable_dirs[path] = dict(self.dirs[path])
            self.synced_calls["fsync_dir"] += 1

    def rename(self, src: str, dst: str) -> None:
        with self.lock:
            self._enter("rename")
            inode = self._inode(src)
            entries, name = self._lookup(src)
            del entries[name]
            dentries, dname = self._lookup(dst)
            dentries[dname] = inode

    def unlink(self, path: str) -> None:
        with self.lock:
            self._enter("unlink")
            entries, name = self._lookup(path)
            if name not in entries:
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            del entries[name]
