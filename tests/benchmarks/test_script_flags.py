"""The benchmark scripts refuse bad flags and files with a usage error (exit 2) that names the flag or
the file, before they time or compile anything."""
import importlib.util
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _main(script: str):
    return runpy.run_path(str(ROOT / "benchmarks" / script))["main"]


@pytest.mark.parametrize("argv, message", [(["--rounds", "0"], "argument --rounds"),
                                           (["--rounds", "x"], "argument --rounds"),
                                           (["--backends", "cuda"], "argument --backends")])
def test_host_overhead_bad_flags(capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        _main("host_overhead.py")(argv)
    assert done.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [(None, "cannot read"), ("not json", "JSONDecodeError"),
                                              ('{"a": 1}', "is not a pytest-benchmark JSON"),
                                              ('{"benchmarks": [{"group": "g"}], "machine_info": {}}',
                                               "is not a pytest-benchmark JSON")])
def test_render_refuses_missing_or_foreign_files(tmp_path, capsys, content, message):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as done:
        _main("render.py")([str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and message in err and str(path) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_compile_facts_refuses_an_unknown_variant():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "aclip_kernels.triton.compile_facts", "--only",
                           "attentive_mask_fwd/float32-b1", "nosuch/variant"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "no variant named nosuch/variant" in done.stderr
    assert "attentive_mask_fwd/float32-b1," in done.stderr  # the known names are listed
