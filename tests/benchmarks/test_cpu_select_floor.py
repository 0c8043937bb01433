"""benchmarks/cpu_select_floor.py: refuses bad flags with a message naming the flag, and a one-round run
writes its JSON and markdown into a folder it creates (this checks that it works, not how fast anything is)."""
import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "cpu_select_floor.py")


def _run(monkeypatch, *argv) -> int:
    monkeypatch.setattr(sys, "argv", ["cpu_select_floor.py", *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(SCRIPT, run_name="__main__")
    return done.value.code


@pytest.mark.parametrize("flag, value", [("--images", "x"), ("--images", "0"), ("--images", "2,"),
                                         ("--dtypes", "fp16"), ("--threads", "1,a"), ("--rounds", "0"),
                                         ("--rounds", "1.5"), ("--evict-mib", "-1")])
def test_bad_flags_exit_with_the_flag_named(monkeypatch, capsys, flag, value):
    assert _run(monkeypatch, flag, value) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and repr(value) in err


def test_one_round_writes_json_and_markdown(tmp_path, monkeypatch):
    pytest.importorskip("aclip_kernels._C", reason="needs the compiled cpu backend")
    out = tmp_path / "new" / "floor"
    monkeypatch.setattr(sys, "argv", ["cpu_select_floor.py", "--images", "1", "--dtypes", "fp32", "--threads", "1",
                                      "--rounds", "1", "--evict-mib", "1", "--out", str(out)])
    runpy.run_path(SCRIPT, run_name="__main__")
    record = json.loads(out.with_suffix(".json").read_text())
    (row,) = record["results"]
    assert (row["images"], row["views"], row["dtype"], row["threads"]) == (1, 2, "fp32", 1)
    assert set(row["median_ms"]) == {"attentive_mask", "index_select floor", "attentive_mask D=8"}
    assert all(t > 0 for t in row["median_ms"].values()) and row["fused_vs_floor"] > 0
    assert "index_select floor" in out.with_suffix(".md").read_text()
