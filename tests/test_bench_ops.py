"""The op suite (benchmarks/ops) runs under pytest-benchmark and writes what it promises, its
renderer reads one run or two, and the GPU clock and target verdicts compute what they say (tiny
sizes, one round: this checks that the harness works, not how fast anything is)."""
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aclip_kernels import benchmarking
from aclip_kernels.testing import child_environment

ROOT = Path(__file__).resolve().parents[1]


def test_op_suite_groups_every_method_and_records_bandwidth(tmp_path):
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "ops.json"
    run = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks" / "ops"), "--benchmark-only", "-q",
                          "-p", "no:cacheprovider", "--bench-devices=cpu", "--bench-rounds=1", "--bench-images=2",
                          f"--benchmark-json={out}"], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                         env=child_environment(drop=("TRITON_INTERPRET",)))   # no interpreted triton
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine_info"]["aclip_kernels"]["cpu"]["torch"] == torch.__version__
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], set()).add(b["params"]["method"])
        extra = b["extra_info"]
        assert extra["device"] == "cpu" and extra["cache_flushed"] and b["stats"]["rounds"] == 1
        assert extra["bytes_moved"] > 0 and extra["GB_per_s"] > 0 and extra["share_of_copy"] > 0
        assert "share_of_peak_hbm" not in extra                    # no data-sheet peak for a CPU
    backends = {f"aclip_kernels.{b}" for b in ("cpu", "torch")}
    assert groups["attentive_mask fwd | ViT-B/16@224, 2 images | fp32 | cpu"] == backends | {
        "published_aclip", "timm_argsort_gather", "open_clip_PatchDropout", "index_select_floor"}
    assert "attentive_mask fwd+bwd | ViT-B/16@224, 2 images | fp32 | cpu" in groups
    assert groups["cls_attention fwd | ViT-B/16@224, 2 images | fp32 | cpu"] == backends | {
        "sdpa_layer", "explicit_attention"}
    assert groups["random_mask fwd | ViT-B/16@224, 2 images | fp32 | cpu"] == backends | {
        "timm_argsort_gather", "open_clip_PatchDropout", "index_select_floor"}

    render = runpy.run_path(str(ROOT / "benchmarks" / "render.py"))
    assert render["main"]([str(out), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "ops.md").read_text()
    assert table.count("| method | median ms |") == len(groups) and "% of copy" in table
    assert (tmp_path / "ops.png").stat().st_size > 10_000
    assert render["main"]([str(out), str(out), "--labels", "old", "new", "--out", str(tmp_path), "--name", "c"]) == 0
    assert "| method | old median ms | new median ms | head / base |" in (tmp_path / "c.md").read_text()
    assert "| 1.00x |" in (tmp_path / "c.md").read_text() and (tmp_path / "c.png").stat().st_size > 10_000
    assert "(baselines, floor) changed by 1.00x (median)" in (tmp_path / "c.md").read_text()


class FakeEvent:
    """A CUDA event on a fake clock: records the time it was recorded at and whether it was waited for."""
    now = 0.0

    def __init__(self, enable_timing):
        assert enable_timing
        self.waited = False

    def record(self):
        self.at = FakeEvent.now

    def synchronize(self):
        self.waited = True

    def elapsed_time(self, end):
        return (end.at - self.at) * 1e3      # milliseconds, as torch.cuda.Event


def test_cuda_event_clock_measures_between_events_and_waits_only_at_the_end(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    clock = benchmarking.CudaEventClock()
    FakeEvent.now = 10.0
    start = clock()
    FakeEvent.now = 10.25
    end = clock()
    assert not start.event.waited and not end.event.waited       # readings do not block the host
    assert end - start == pytest.approx(0.25) and end.event.waited


def test_bandwidth_shares():
    info = benchmarking.bandwidth(2_000_000_000, 0.5, "cpu", copy_rate_gbps=8.0)
    assert info["GB_per_s"] == pytest.approx(4.0) and info["share_of_copy"] == pytest.approx(0.5)
    assert "share_of_peak_hbm" not in info
    assert benchmarking.peak_hbm_tbps("cpu") is None


def test_render_reports_the_gpu_targets_met_or_missed():
    render = runpy.run_path(str(ROOT / "benchmarks" / "render.py"))

    def bench(ms, share=None):
        extra = {"op": "attentive_mask", "passes": "fwd", "device": "cuda"}
        if share is not None:
            extra["share_of_peak_hbm"] = share
        return {"stats": {"median": ms / 1e3}, "extra_info": extra}
    group = {"aclip_kernels.triton": bench(0.100, 0.628), "aclip_kernels.cuda": bench(0.120, 0.674),
             "published_aclip": bench(0.600), "timm_argsort_gather": bench(0.230)}
    verdicts = {t["target"]: (t["measured"], t["met"]) for t in render["targets"](group)}
    assert verdicts["triton: >= 60% of peak HBM bandwidth"] == ("62.8%", True)
    assert verdicts["cuda: >= 70% of peak HBM bandwidth"] == ("67.4%", False)
    assert verdicts["triton: >= 5x faster than published_aclip"] == ("6.00x", True)
    assert verdicts["cuda: >= 2x faster than timm_argsort_gather"] == ("1.92x", False)
    assert verdicts["cuda time <= 1.10x triton's"] == ("1.20x", False)
    for name in group:
        group[name]["extra_info"]["device"] = "cpu"
    assert render["targets"](group) == []                          # the targets are stated for GPUs


@pytest.mark.parametrize("option,message", [("--bench-devices=tpu", "unknown ['tpu']"),
                                            ("--bench-images=0,x", "positive integers")])
def test_op_suite_rejects_bad_options_by_name(option, message):
    run = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks" / "ops"), "--collect-only", "-q",
                          "-p", "no:cacheprovider", option], capture_output=True, text=True, timeout=300,
                         env=child_environment())
    assert run.returncode != 0 and option in run.stderr and message in run.stderr, run.stdout + run.stderr
