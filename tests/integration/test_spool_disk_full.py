"""A spool write that really fails (file size limit -> EFBIG) stops acks; nothing unsaved is acked.

The gateway runs with RLIMIT_FSIZE set low and SIGXFSZ ignored, so once a spool
segment reaches the limit the kernel refuses the write, as a full disk would.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests.helpers import ROOT, Broker, wait_port, wait_until, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 256 * 1024


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.timeout(120)
def test_failing_spool_write_stops_acks(tmp_path: Path, broker: Broker, rules_dir: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    ports = write_config(cfg, bootstrap=broker.bootstrap, rules_dir=rules_dir,
                         spool_dir=tmp_path / "spool", spool__mode="write-ahead")
    # Logs go to a pipe: a log file would hit the same size limit.
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_limit_file_size)
    log: list[bytes] = []
    reader = threading.Thread(target=lambda: log.extend(iter(proc.stdout.readline, b"")),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    try:
        wait_port("127.0.0.1", ports["mqtt"], timeout=30, proc=proc)
        verdicts: dict[int, int] = {}
        mids: dict[int, int] = {}
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="disk-full",
                             protocol=paho.MQTTv5)

        def on_publish(_c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
            verdicts[mid] = reason.value

        client.on_publish = on_publish
        client.connect("127.0.0.1", ports["mqtt"])
        client.loop_start()
        payload = b"x" * 1000
        for n in range(600):  # ~600 KB: well past the 256 KB a segment may hold
            info = client.publish("bench/disk-full/seq", b"%06d" % n + payload, qos=1)
            mids[info.mid] = n
            info.wait_for_publish(30)
        deadline = time.monotonic() + 30
        while len(verdicts) < len(mids) and time.monotonic() < deadline:
            time.sleep(0.1)
        client.disconnect()
        client.loop_stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    ok = {mids[m] for m, code in verdicts.items() if code == 0}
    failed = {mids[m] for m, code in verdicts.items() if code >= 0x80}
    text = b"".join(log).decode(errors="replace")
    assert failed, "the size limit never refused a write: " + text[-2000:]
    assert ok, "nothing was acked at all"
    assert "spool_write_failed" in text

    def in_kafka() -> set[int]:
        return {int(m.value()[:6]) for m in broker.read_all("bench") if m.key() == b"disk-full"}

    with contextlib.suppress(AssertionError):  # the assert below says what is missing
        wait_until(lambda: ok <= in_kafka(), 30)
    got = in_kafka()
    assert ok <= got, f"{len(ok - got)} acked messages are not in Kafka"
