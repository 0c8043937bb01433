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


def test_bench_mask_reports_the_gpu_targets_met_or_missed():
    bench = runpy.run_path(str(ROOT / "benchmarks" / "bench_mask.py"))
    rows = [("attentive_mask[triton]", 0.100, 2700.0), ("attentive_mask[cuda]", 0.120, 2900.0),
            ("published A-CLIP pipeline", 0.600, 1.0), ("timm-style argsort+gather", 0.230, 1.0)]
    result = {"pass": "fwd", "results": [{"method": m, "median_ms": t, "GB_per_s": g} for m, t, g in rows]}
    verdicts = {t["target"]: (t["measured"], t["met"]) for t in bench["targets"](result, 4.3)}
    assert verdicts["triton: >= 60% of 4.3 TB/s HBM"] == ("62.8%", True)
    assert verdicts["cuda: >= 70% of 4.3 TB/s HBM"] == ("67.4%", False)
    assert verdicts["triton: >= 5x faster than published A-CLIP pipeline"] == ("6.00x", True)
    assert verdicts["triton: >= 2x faster than timm-style argsort+gather"] == ("2.30x", True)
    assert verdicts["cuda: >= 2x faster than timm-style argsort+gather"] == ("1.92x", False)
    assert verdicts["cuda time <= 1.10x triton's"] == ("1.20x", False)
    assert not any("HBM" in t["target"] for t in bench["targets"](result, None))   # unknown GPU: no share
    assert bench["targets"](dict(result, **{"pass": "fwd+bwd"}), 4.3) == []
