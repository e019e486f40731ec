"""The rules ConfigMap hot-reloads: Kubernetes updates a mounted ConfigMap by a symlink swap
(kubelet's AtomicWriter), never by writing the files the gateway reads. The watcher must
see that swap, on a real directory laid out as kubelet lays it out."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
from pathlib import Path

import pytest

from gateway.auth import watch
from gateway.routing import Router, RulesReloader, load_rules
from tests.unit.test_routing_reload import BROKEN, V1, V2, _topic

pytestmark = pytest.mark.unit

_stamps = itertools.count()


class ConfigMapVolume:
    """A directory updated the way kubelet updates a ConfigMap or Secret volume:

    <dir>/..<stamp>/<key>   the data, one directory per version
    <dir>/..data            symlink to the current ..<stamp>
    <dir>/<key>             symlink to ..data/<key>

    An update writes a new ..<stamp>, points ..data_tmp at it, renames ..data_tmp over
    ..data (the atomic step), then removes the old ..<stamp>.
    """

    def __init__(self, directory: Path, data: dict[str, str]) -> None:
        self.dir = directory
        self.dir.mkdir()
        self.update(data)

    def update(self, data: dict[str, str]) -> None:
        stamp = f"..2026_12_06_00_00_00.{next(_stamps):09d}"
        version = self.dir / stamp
        version.mkdir()
        for key, text in data.items():
            (version / key).write_text(text)
        old = os.readlink(self.dir / "..data") if (self.dir / "..data").is_symlink() else None
        os.symlink(stamp, self.dir / "..data_tmp")
        os.rename(self.dir / "..data_tmp", self.dir / "..data")
        for key in data:
            if not (self.dir / key).is_symlink():
                os.symlink(f"..data/{key}", self.dir / key)
        for entry in self.dir.iterdir():  # keys no longer in the ConfigMap
            if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in data:
                entry.unlink()
        if old is not None:
            shutil.rmtree(self.dir / old)


async def swap_until_seen(volume: ConfigMapVolume, data: dict[str, str],
                          event: asyncio.Event, timeout: float = 30.0) -> None:
    """The watcher starts in its own time: swap again until it has seen a swap."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not event.is_set():
        assert asyncio.get_running_loop().time() < deadline, "symlink swap never seen"
        await asyncio.to_thread(volume.update, data)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), 1.0)


async def test_rules_watcher_sees_a_configmap_symlink_swap(tmp_path: Path) -> None:
    volume = ConfigMapVolume(tmp_path / "rules", {"10-r.yaml": V1})
    router = Router(load_rules(volume.dir))
    assert _topic(router) == "v1"
    seen = {"rules_loaded": asyncio.Event(), "rules_reload_failed": asyncio.Event()}
    reloader = RulesReloader(volume.dir, router, lambda e, _: seen[e].set(), debounce_ms=50)
    task = asyncio.create_task(reloader.run())
    try:
        await swap_until_seen(volume, {"10-r.yaml": V2}, seen["rules_loaded"])
        assert _topic(router) == "v2"
        # A bad ConfigMap edit is refused and the rules in force stay.
        await swap_until_seen(volume, {"10-r.yaml": BROKEN}, seen["rules_reload_failed"])
        assert _topic(router) == "v2"
        # A key renamed in the ConfigMap: the old file goes, the new one is read.
        seen["rules_loaded"].clear()
        await swap_until_seen(volume, {"20-r.yaml": V1}, seen["rules_loaded"])
        assert _topic(router) == "v1"
        assert [p.name for p in (volume.dir).iterdir() if not p.name.startswith("..")] \
            == ["20-r.yaml"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_secret_file_watch_sees_a_symlink_swap(tmp_path: Path) -> None:
    """The password file and TLS files are polled by stat signature (gateway.auth.watch):
    a swap with the same size and even the same bytes is still a change (a new inode)."""
    volume = ConfigMapVolume(tmp_path / "auth", {"passwd": "alice:x\n"})
    path = str(volume.dir / "passwd")
    before = watch.signature(path)
    assert before is not None
    volume.update({"passwd": "alice:x\n"})
    after = watch.signature(path)
    assert after is not None and after != before
