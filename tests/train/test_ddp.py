"""Reference training loop under DDP: torchrun with 2 gloo processes on CPU takes the same steps
as one process on the same global batch (gradient-carrying all-gather, per-rank labels)."""
import json
import os
import socket
import subprocess
import sys

from aclip_kernels.train import TrainConfig, train

ARGS = dict(method="aclip", model="ACLIP-Test", steps=2, batch_size=8, classes=4, samples_per_class=8,
            workers=0, threads=1, ssl_dim=16, ssl_hidden=32, log_every=1, device="cpu")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(metrics_path):
    return [r["loss"] for r in map(json.loads, open(metrics_path)) if "loss" in r]


def test_two_gloo_processes_equal_one_process(tmp_path):
    single = train(TrainConfig(**ARGS, evaluate=False, progress=False, quiet=True, ckpt_every=0,
                               output_dir=str(tmp_path / "single")))["losses"]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "aclip_kernels.train",
           "--output-dir", str(out), "--no-eval", "--no-progress"]
    for k, v in ARGS.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = _losses(out / "metrics.jsonl")
    assert len(ddp) == 2
    for a, b in zip(ddp, single):                            # step 1, and step 2 after the update
        assert abs(a - b) < 1e-5, (ddp, single)
    assert "mean step time" in proc.stdout
