"""The command-line tools run: `python -m aclip_kernels.info` (the op suite's own test is
tests/test_bench_ops.py)."""
import subprocess
import sys


def test_info_reports_versions_backends_and_devices():
    out = subprocess.run([sys.executable, "-m", "aclip_kernels.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch " in out.stdout and "device cpu" in out.stdout and "compiled library:" in out.stdout
