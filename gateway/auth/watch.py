"""Has a file changed on disk?  A stat signature, polled.

Polling one ``stat`` a second costs nothing, follows symlinks (Kubernetes swaps a
ConfigMap's ``..data`` link: the inode changes) and sees an editor's
write-and-rename as well as an in-place write (mtime, size).
"""

from __future__ import annotations

import os

Signature = tuple[int, int, int, int] | None


def signature(path: str) -> Signature:
    """(device, inode, size, mtime in ns), or None when the file cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
