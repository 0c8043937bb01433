"""``python -m aclip_kernels.train`` as a process: a SIGTERM while it loads ends it promptly and
cleanly."""
import os
import signal
import subprocess
import sys
import time

from aclip_kernels.train import CHECKPOINT

TINY = ["--model", "ACLIP-Test", "--method", "clip", "--batch-size", "8", "--steps", "1", "--classes", "4",
        "--samples-per-class", "8", "--ssl-dim", "16", "--ssl-hidden", "32", "--workers", "0", "--threads", "1",
        "--no-eval", "--no-progress"]


def test_sigterm_while_loading_data_stops_cleanly(tmp_path):
    fifo = tmp_path / "data.csv"
    os.mkfifo(fifo)                             # reading it blocks until someone writes: a slow load
    proc = subprocess.Popen([sys.executable, "-m", "aclip_kernels.train", *TINY, "--data", str(fifo),
                             "--output-dir", str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
    writer = None
    try:
        deadline = time.monotonic() + 120
        while writer is None:                   # a non-blocking writer can open once the trainer reads
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
        if writer is not None:
            os.close(writer)
    assert proc.returncode == 0
    assert err.splitlines() == ["stopped: SIGTERM during start-up, before the first step: nothing to save"]
    assert not os.path.exists(tmp_path / "out" / CHECKPOINT)
