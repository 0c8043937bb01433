"""Every hostile-input probe of tests/ops/bad_input_probes.py on every backend that runs here.

Public probes go through the public API on the ``torch``, ``cpu`` and ``triton`` (interpreter)
backends; direct probes call the schema ops of the installed library (``cpu``), of the Triton
backend, and of the emulated CUDA build, bypassing the Python checks. The probes of one backend run
in a child process; a probe that crashes it (a signal, an abort) or hangs fails, and the child is
restarted after it. A bad probe must raise the expected exception naming its argument; a valid one
must return the reference's answer. With ACLIP_ASAN=1 (``test_no_memory_errors_under_asan``) the
direct probes run on the AddressSanitizer builds of the C++ CPU and emulated CUDA kernels.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest

import aclip_kernels as ak

HERE = Path(__file__).resolve().parent
WORKER = HERE / "bad_input_probes.py"
_spec = importlib.util.spec_from_file_location("bad_input_probes", WORKER)
probes = sys.modules["bad_input_probes"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probes)

ASAN = os.environ.get("ACLIP_ASAN") == "1"
TIMEOUT = 300  # seconds for a child to get through the probes that remain


def _worker_results(kind: str, backend: str, library: Optional[Path]) -> Dict[str, dict]:
    """Runs every probe of ``kind`` on ``backend``; a probe during which the child died or hung is
    reported as ``crashed`` / ``hung``, and the next child starts after it."""
    listed = probes.PROBES[kind]
    count = len(listed)
    results: Dict[str, dict] = {}
    start = 0
    while start < count:
        cmd = [sys.executable, str(WORKER), kind, backend, str(start)] + ([str(library)] if library else [])
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=HERE.parents[1])
            stdout, stderr, status = run.stdout, run.stderr, run.returncode
        except subprocess.TimeoutExpired as timeout:
            stdout = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
            stderr, status = "", "timeout"
        last = start - 1
        running = None
        for line in stdout.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
                results[result["name"]] = result
                last, running = result["index"], None
            elif line.startswith("START "):
                running = line[len("START "):]
        if last == count - 1:
            break
        name = running or listed[last + 1].name
        outcome = "hung" if status == "timeout" else "crashed"
        results[name] = dict(outcome=outcome, status=status, stderr=stderr[-3000:])
        start = last + 2
    return results


_CACHE: Dict[tuple, Dict[str, dict]] = {}


def results_for(kind: str, backend: str, library: Optional[Path] = None) -> Dict[str, dict]:
    key = (kind, backend)
    if key not in _CACHE:
        _CACHE[key] = _worker_results(kind, backend, library)
    return _CACHE[key]


def check(result: dict, probe) -> None:
    assert result["outcome"] not in ("crashed", "hung"), f"{probe.name} {result['outcome']}: {result}"
    if probe.expects is None:
        assert result["outcome"] == "returned", f"{probe.name} must be accepted: {result}"
        return
    assert result["outcome"] == "raised", f"{probe.name} was accepted silently"
    assert result["type"] == probe.expects.__name__, result
    for word in probe.names:
        assert word in result["message"], (word, result["message"])


PUBLIC_BACKENDS = ["torch"] + [b for b in ("cpu",) if b in ak.compiled_backends()] + ["triton"]


@pytest.mark.skipif(ASAN, reason="the AddressSanitizer run covers the direct probes")
@pytest.mark.parametrize("probe", probes.PUBLIC, ids=lambda p: p.name)
@pytest.mark.parametrize("backend", PUBLIC_BACKENDS)
def test_public_probe(backend, probe):
    check(results_for("public", backend)[probe.name], probe)


@pytest.fixture(scope="module", params=["native" if ASAN else "cpu", "triton", "cuda-emulated"])
def direct_backend(request):
    """(backend, library to load in the child or None)."""
    backend = request.param
    if backend == "triton" and ASAN:
        pytest.skip("the Triton interpreter has no compiled code to sanitize")
    if backend == "cpu" and "cpu" not in ak.compiled_backends():
        pytest.skip("the compiled library aclip_kernels._C is not built")
    if backend == "native":
        return backend, request.getfixturevalue("native_cpu").library
    if backend == "cuda-emulated":
        return backend, request.getfixturevalue("emulated_cuda").library
    return backend, None


@pytest.mark.parametrize("probe", probes.DIRECT, ids=lambda p: p.name)
def test_direct_probe(direct_backend, probe):
    backend, library = direct_backend
    check(results_for("direct", backend, library)[probe.name], probe)


def test_a_crash_is_reported_as_a_failure():
    """The harness itself: a probe that kills its child is reported as crashed, and the probes
    after it still run in a new child."""
    results = _worker_results("selftest", "torch", None)
    assert [results[name]["outcome"] for name in ("fine", "abort", "after")] == ["returned", "crashed", "returned"]
    assert results["abort"]["status"] == -6  # SIGABRT


@pytest.mark.skipif(ASAN, reason="this is the AddressSanitizer run")
def test_no_memory_errors_under_asan(run_under_asan):
    """The direct probes and the fuzz of valid inputs on the C++ CPU and emulated CUDA kernels built
    with -fsanitize=address."""
    run_under_asan(__file__, HERE / "test_fuzz.py")
