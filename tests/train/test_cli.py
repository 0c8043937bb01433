"""``python -m aclip_kernels.train`` on hostile input: a bad flag, data source or checkpoint is one
``error:`` line and exit status 2, never a traceback; a planted pickle does not run; an unusable
tar and a SIGTERM while loading end the process promptly."""
import dataclasses
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from aclip_kernels.train import CHECKPOINT, TrainConfig
from aclip_kernels.train.__main__ import main, parse_args, parser, summary

TINY = ["--model", "ACLIP-Test", "--method", "clip", "--batch-size", "8", "--steps", "1", "--classes", "4",
        "--samples-per-class", "8", "--ssl-dim", "16", "--ssl-hidden", "32", "--workers", "0", "--threads", "1",
        "--no-eval", "--no-progress"]


def one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags", [
    ["--batch-size", "0"], ["--steps", "0"], ["--steps", "-1"], ["--steps", "x"], ["--accum", "0"],
    ["--batch-size", "6", "--accum", "4"], ["--keep", "0"], ["--keep", "1.5"], ["--keep", "nan"], ["--block", "0"],
    ["--lr", "nan"], ["--lr", "-1"], ["--lr", "inf"], ["--workers", "-1"], ["--seed", "-1"], ["--ckpt-every", "-1"],
    ["--betas", "0.9", "1"], ["--data", "missing.csv"], ["--data", "shard-{000..003}.tar"], ["--data", "x.txt"],
    ["--val-data", "missing.tar"], ["--model", "NoSuchModel"], ["--output-dir", "/dev/null/run"]])
def test_bad_flags_are_rejected_at_parse_time(flags, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert e.value.code == 2
    one_error_line(capsys.readouterr().err)


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_user_errors_found_later_are_one_line(tmp_path, capsys):
    marker = str(tmp_path / "planted-pickle-ran")
    (tmp_path / "zip").mkdir()
    torch.save({"model": _Planted(marker)}, tmp_path / "zip" / CHECKPOINT)
    (tmp_path / "raw").mkdir()
    with open(tmp_path / "raw" / CHECKPOINT, "wb") as f:
        pickle.dump({"model": _Planted(marker)}, f, protocol=2)
    (tmp_path / "empty.csv").write_text("")
    ok = ["--output-dir", str(tmp_path / "ok")]
    assert main(TINY + ok) == 0
    capsys.readouterr()
    cases = [(["--resume", "--output-dir", str(tmp_path / "zip")], "cannot load checkpoint .*GLOBAL posix.mkdir"),
             (["--resume", "--output-dir", str(tmp_path / "raw")], "cannot load checkpoint .*GLOBAL posix.mkdir"),
             (["--resume", "--seed", "1"] + ok, "written with seed=0, this run has 1"),
             (["--data", str(tmp_path / "empty.csv")], "is empty"),
             (["--samples-per-class", "1"], "4 samples are fewer than one micro-batch"),
             (["--method", "aclip", "--block", "3"], "--block 3 must divide the 4x4 patch grid")]
    for flags, message in cases:
        assert main(TINY + ["--output-dir", str(tmp_path / "out")] + flags) == 2
        assert re.search(message, one_error_line(capsys.readouterr().err)), flags
    assert not os.path.exists(marker)


def run_cli(*flags, timeout=60):
    return subprocess.run([sys.executable, "-m", "aclip_kernels.train", *TINY, *flags], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("tar", ["missing.tar", "garbage.tar"])
def test_an_unusable_tar_ends_the_run_promptly(tmp_path, tar):
    (tmp_path / "garbage.tar").write_bytes(b"not a tar" * 100)
    done = run_cli("--data", str(tmp_path / tar), "--output-dir", str(tmp_path / "out"))   # hung forever before
    assert done.returncode == 2
    assert tar in one_error_line(done.stderr)


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


def test_every_field_has_a_flag_with_help_and_its_default_shown_once():
    actions = {a.dest: a for a in parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["flag"] is False:
            assert f.name not in actions
            continue
        a = actions[f.name]
        assert a.help and a.default == f.default, f.name
        assert a.help.count("default") <= 1, a.help
        if not isinstance(f.default, bool):
            assert "(default: " in a.help, f.name
        if f.metadata["choices"]:
            assert tuple(a.choices) == tuple(f.metadata["choices"])
    assert set(actions) - {"help"} == {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["flag"] is not False}
    assert parse_args([]) == TrainConfig()


def test_summary_prints_timing_apart_from_the_deterministic_results():
    result = {"status": "done", "step": 2, "losses": [2.0, 1.0], "mean_step_time": 0.5, "skipped": 0,
              "checkpoint": "out/checkpoint.pt", "metrics": {"zeroshot_top1": 0.5, "zeroshot_chance": 0.25,
                                                             "zeroshot_classes": 4}}
    lines = summary(TrainConfig(), result, 12.0).splitlines()
    timing = lines.index("timing (machine-dependent):")
    assert any("zero-shot top-1: 50.0%" in line for line in lines[:timing])
    assert not any("time" in line for line in lines[:timing])
    assert "mean step time: 500.0 ms" in lines[timing + 1] and "wall time: 12 s" in lines[timing + 1]
