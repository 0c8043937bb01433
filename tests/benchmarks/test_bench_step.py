"""benchmarks/bench_step.py runs end to end on the tiny test config and writes its JSON, markdown and
plot (one round, one thread: this checks that it works, not how fast anything is)."""
import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_step_writes_json_markdown_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(sys, "argv", ["bench_step.py", "--model", "ACLIP-Test", "--batch", "4", "--rounds", "1",
                                      "--warmup", "1", "--profile-steps", "1", "--device", "cpu", "--threads", "1",
                                      "--out", str(tmp_path), "--name", "s"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "benchmarks" / "bench_step.py"), run_name="__main__")
    assert done.value.code == 0
    result = json.loads((tmp_path / "s.json").read_text())
    env = result["environment"]
    assert env["torch"] and env["device"].startswith("cpu") and "git_commit" in env
    rows = {r["method"]: r for r in result["results"]}
    assert set(rows) == {"clip", "flip", "aclip", "aclip-eff", "slip"}
    assert rows["clip"]["time_vs_clip"] == 1.0 and rows["clip"]["memory_vs_clip"] == 1.0
    assert all(r["flops"] > 0 and r["memory_bytes"]["total_peak"] > 0 for r in rows.values())
    # the masked methods' online forward does less work than CLIP's, SLIP's more
    assert rows["flip"]["flops"] < rows["clip"]["flops"] < rows["slip"]["flops"]
    assert rows["aclip"]["memory_bytes"]["persistent"]["ema"] > 0 == rows["clip"]["memory_bytes"]["persistent"]["ema"]
    assert any("cls_attention" in n for n in rows["aclip"]["profile"]["masking_ops"])
    assert any("attentive_mask" in n for n in rows["aclip"]["profile"]["masking_ops"])
    assert 0 < rows["aclip"]["masking_share"] < 1 and rows["clip"]["masking_share"] == 0
    assert set(result["targets"]) == {"aclip_time", "aclip_eff_time", "masking_share", "aclip_memory"}
    assert (tmp_path / "s.md").read_text().count("|") > 30 and (tmp_path / "s.png").stat().st_size > 1000
