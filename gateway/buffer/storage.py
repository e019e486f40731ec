"""Every file operation of the spool goes through one ``Storage``: the seam for crash tests.

Production uses ``OsStorage`` (plain ``os`` calls).  Tests swap in a double that
keeps written-but-unsynced bytes and directory changes apart and throws them
away on a simulated power cut (tests/support/crashfs.py), so a missing
``fdatasync`` or directory fsync is visible to a test, which ``kill -9`` (the
page cache survives it) can never show.

Durability contract the spool relies on, and the double enforces:
- bytes appended to a file survive a power cut only after ``fdatasync`` of it;
- a created, renamed or unlinked name survives only after ``fsync_dir`` of its
  directory;
- anything else may be lost, or survive in part (a torn tail).
"""

from __future__ import annotations

import os
from typing import Protocol


class Storage(Protocol):
    def makedirs(self, path: str) -> None: ...

    def listdir(self, path: str) -> list[str]: ...

    def read_file(self, path: str) -> bytes:
        """The whole file; FileNotFoundError when there is none."""

    def create(self, path: str, exclusive: bool) -> int:
        """Open for appending, created empty (``exclusive``: fail if it exists)."""

    def open_read(self, path: str) -> int:
        """FileNotFoundError when there is none."""

    def pread(self, fd: int, size: int, offset: int) -> bytes: ...

    def append(self, fd: int, data: bytes) -> None:
        """Write all of ``data`` at the end of the file."""

    def fdatasync(self, fd: int) -> None: ...

    def truncate(self, fd: int, size: int) -> None: ...

    def close(self, fd: int) -> None: ...

    def fsync_dir(self, path: str) -> None: ...

    def rename(self, src: str, dst: str) -> None:
        """Atomic replace of ``dst``."""

    def unlink(self, path: str) -> None: ...


class OsStorage:
    """The real file system."""

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def create(self, path: str, exclusive: bool) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_EXCL if exclusive else os.O_TRUNC)
        return os.open(path, flags, 0o644)

    def open_read(self, path: str) -> int:
        return os.open(path, os.O_RDONLY)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def append(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)


OS = OsStorage()
