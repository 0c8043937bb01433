"""benchmarks/ablation.py runs end to end (1 seed, 2 steps, tiny model) and writes its JSON, table
and plot."""
import importlib.util
import json
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "ablation.py"


def _load():
    spec = importlib.util.spec_from_file_location("ablation", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ablation_runs_end_to_end(tmp_path):
    ablation = _load()
    out = tmp_path / "abl"
    assert ablation.main(["--seeds", "0", "--steps", "2", "--jobs", "1", "--model", "ACLIP-Test",
                          "--batch-size", "8", "--samples-per-class", "4", "--val-per-class", "2",
                          "--measure", "8", "--out", str(out)]) == 0
    result = json.loads((tmp_path / "abl.json").read_text())
    assert result["partial"] is False and len(result["runs"]) == 5
    assert list(result["settings"]) == list(ablation.SETTINGS)
    for key, s in result["settings"].items():
        assert s["seeds"] == [0] and 0 <= s["zeroshot_top1"]["mean"] <= 1 and 0 <= s["i2t_r@1"]["mean"] <= 1
        assert s["step_flops"] > 0 and 0 <= s["object_patches_kept"]["mean"] <= 1
    assert result["settings"]["none-1v"]["object_patches_kept"]["mean"] == 1.0
    assert result["settings"]["random-1v"]["step_flops"] < result["settings"]["none-1v"]["step_flops"]
    assert result["meta"]["command"].startswith("python benchmarks/ablation.py")
    assert "| setting |" in (tmp_path / "abl.md").read_text()
    assert (tmp_path / "abl.png").stat().st_size > 1000
    # re-render and pool (the same file twice: its runs are not duplicated)
    assert ablation.main(["--render-only", "--merge", str(out) + ".json", str(out) + ".json",
                          "--out", str(tmp_path / "pooled"), "--no-plot"]) == 0
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    assert len(pooled["runs"]) == 5 and pooled["settings"]["none-1v"]["seeds"] == [0]
