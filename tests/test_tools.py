"""The command-line tools run: `python -m aclip_kernels.info` and the op benchmark scripts
(tiny sizes, one round: this checks that they work, not how fast anything is)."""
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_info_reports_versions_backends_and_devices():
    out = subprocess.run([sys.executable, "-m", "aclip_kernels.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch " in out.stdout and "device cpu" in out.stdout and "compiled library:" in out.stdout


@pytest.mark.parametrize("script,args,stem", [
    ("bench_mask.py", ["--images", "2", "--rounds", "1", "--inner", "1", "--name", "m"], "m"),
    ("bench_mask.py", ["--images", "2", "--rounds", "1", "--inner", "1", "--backward", "--name", "b"], "b"),
    ("bench_cls_attention.py", ["--batch", "2", "--rounds", "1", "--inner", "1"], "cls_attention_cpu_fp32_b2"),
])
def test_benchmark_scripts_write_json_and_markdown(tmp_path, monkeypatch, script, args, stem):
    monkeypatch.setattr(sys, "argv", [script, *args, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
    assert done.value.code == 0
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert result["environment"]["torch"] and (tmp_path / f"{stem}.md").read_text().count("|") > 10
