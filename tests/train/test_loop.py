"""Reference training loop: every method runs, resume is exact, checkpoints are atomic, a
non-finite loss stops cleanly, SIGTERM checkpoints. Tiny config (ACLIP-Test, 16 px, batch 8)."""
import dataclasses
import json
import math
import os
import re
import signal

import pytest
import torch

from aclip_kernels.train import CHECKPOINT, NonFiniteLoss, Stopped, TrainConfig, loop, metrics, train
from aclip_kernels.train import checkpoint as ckpt
from aclip_kernels.train import losses
from aclip_kernels.train.__main__ import parse_args, summary
from aclip_kernels.train.errors import CheckpointError


def tiny(tmp_path, **kw):
    base = dict(method="aclip", model="ACLIP-Test", steps=4, batch_size=8, classes=4, samples_per_class=8,
                val_per_class=2, workers=0, threads=1, evaluate=False, progress=False, quiet=True,
                ckpt_every=0, ssl_dim=16, ssl_hidden=32, log_every=1, output_dir=str(tmp_path))
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["clip", "flip", "aclip", "aclip-eff", "slip"])
def test_each_method_runs_two_steps(tmp_path, method):
    r = train(tiny(tmp_path, method=method, steps=2, evaluate=method == "aclip",
                   save_masks=method in ("aclip", "flip")))
    assert r["status"] == "done" and r["step"] == 2 and len(r["losses"]) == 2
    assert all(math.isfinite(x) for x in r["losses"])
    assert os.path.exists(os.path.join(tmp_path, CHECKPOINT))
    assert os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))
    if method == "aclip":
        m = r["metrics"]
        assert m["zeroshot_chance"] == 0.25 and 0 <= m["zeroshot_top1"] <= 1 and "i2t_r@5" in m
        assert os.path.getsize(r["mask_png"]) > 1000
        assert 0 <= m["object_patches_kept"] <= 1
        assert "zero-shot top-1" in summary(tiny(tmp_path), r, 1.0)


def test_resume_continues_the_same_trajectory(tmp_path):
    full = train(tiny(tmp_path / "full", method="aclip", steps=4, workers=0))
    part = train(tiny(tmp_path / "part", method="aclip", steps=4, stop_after=2))
    assert part["status"] == "stopped" and part["step"] == 2
    assert part["losses"] == full["losses"][:2]
    rest = train(tiny(tmp_path / "part", method="aclip", steps=4, resume=True))
    assert rest["step"] == 4
    assert rest["losses"] == full["losses"][2:]               # bit-identical continuation
    with pytest.raises(ValueError, match="method='aclip'"):
        train(tiny(tmp_path / "part", method="clip", steps=4, resume=True))


def test_resume_flip_restores_rng(tmp_path):
    full = train(tiny(tmp_path / "full", method="flip", steps=3))
    train(tiny(tmp_path / "part", method="flip", steps=3, stop_after=1))
    rest = train(tiny(tmp_path / "part", method="flip", steps=3, resume=True))
    assert rest["losses"] == full["losses"][1:]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    ckpt.save_atomic({"step": 1}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]                    # no temp file left behind


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = losses.clip_loss, []

    def poisoned(*a):
        calls.append(1)
        out = real(*a)
        return out * float("nan") if len(calls) > 3 else out   # steps 1-3 fine (clip: 1 call each)
    monkeypatch.setattr(losses, "clip_loss", poisoned)
    cfg = tiny(tmp_path, method="clip", steps=6, ckpt_every=2)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss nan at step 4.*step 2\)"):
        train(cfg)
    state = ckpt.load(os.path.join(tmp_path, CHECKPOINT))
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path, monkeypatch):
    real, calls = losses.clip_loss, []

    def signalling(*a):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)
    monkeypatch.setattr(losses, "clip_loss", signalling)
    r = train(tiny(tmp_path, method="clip", steps=10))
    assert r["status"] == "stopped" and r["step"] == 2
    state = ckpt.load(os.path.join(tmp_path, CHECKPOINT))
    assert state["step"] == 2 and state["reason"] == "sigterm" and state["data_position"] == 2
    assert signal.getsignal(signal.SIGTERM) is not None


def test_cli_parses_the_flags(tmp_path):
    data = tmp_path / "x.csv"
    data.write_text("filepath\ttitle\n")
    cfg = parse_args(["--method", "aclip-eff", "--model", "ViT-B-16", "--data", str(data), "--steps", "7",
                      "--batch-size", "16", "--output-dir", "d", "--resume", "--save-masks"])
    assert (cfg.method, cfg.model, cfg.data, cfg.steps, cfg.batch_size, cfg.resume, cfg.save_masks) == \
        ("aclip-eff", "ViT-B-16", str(data), 7, 16, True, True)


def test_user_data_csv_and_webdataset_train_and_evaluate(tmp_path):
    import io
    import tarfile
    from PIL import Image
    from aclip_kernels.train.embedded import EmbeddedDataset
    ds = EmbeddedDataset("train", image_size=20, num_classes=3, samples_per_class=4)
    lines = ["filepath\ttitle"]
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i in range(len(ds)):
            img, cap, _ = ds[i]
            Image.fromarray(img).save(tmp_path / f"{i}.png")
            lines.append(f"{i}.png\t{cap}")
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", cap.encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    lines.append("missing.png\ta missing image")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    csv_run = train(tiny(tmp_path / "csv", method="clip", steps=2, data=str(tmp_path / "data.csv"),
                         val_data=str(tmp_path / "data.csv"), evaluate=True))
    assert csv_run["metrics"]["val_samples"] == 12 and "t2i_r@1" in csv_run["metrics"]
    assert "zeroshot_top1" not in csv_run["metrics"]           # no class labels in a CSV
    wds_run = train(tiny(tmp_path / "wds", method="aclip", steps=2, data=str(tmp_path / "shard-000.tar"),
                         val_data=str(tmp_path / "shard-000.tar"), evaluate=True))
    assert all(math.isfinite(x) for x in wds_run["losses"]) and wds_run["metrics"]["val_samples"] == 12


def test_checkpoints_hold_only_tensors_and_plain_containers(tmp_path):
    train(tiny(tmp_path, method="aclip", steps=1))
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert "scaler" not in state and isinstance(state["config"], dict)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        ckpt.load(str(tmp_path / "empty.pt"))


def test_a_checkpoint_with_the_old_grad_scaler_entry_resumes(tmp_path):
    # checkpoints written before the always-disabled GradScaler was removed carry its state_dict
    full = train(tiny(tmp_path / "full", method="clip", steps=2))
    train(tiny(tmp_path / "part", method="clip", steps=2, stop_after=1))
    path = str(tmp_path / "part" / CHECKPOINT)
    state = ckpt.load(path)
    state["scaler"] = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    ckpt.save_atomic(state, path)
    rest = train(tiny(tmp_path / "part", method="clip", steps=2, resume=True))
    assert rest["losses"] == full["losses"][1:]
    assert "scaler" not in torch.load(path, weights_only=True)


def test_resume_logs_each_step_once_and_removes_stale_temporary_files(tmp_path):
    cfg = tiny(tmp_path, method="clip", steps=2)
    train(cfg)
    step2 = (tmp_path / CHECKPOINT).read_bytes()
    train(dataclasses.replace(cfg, steps=4, stop_after=1, resume=True))      # logs step 3, checkpoints it
    (tmp_path / CHECKPOINT).write_bytes(step2)         # as if killed while writing the step 3 checkpoint
    (tmp_path / ".tmp-checkpoint.pt1a2b3c").write_bytes(b"partial")
    train(dataclasses.replace(cfg, steps=4, resume=True))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r.get("final", False)) for r in records] == [(1, False), (2, False), (3, False),
                                                                     (4, False), (4, True)]
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT, "metrics.jsonl"]


def test_metrics_truncate(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1}, {"step": 2}, {"final": True, "step": 2}, {"step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')     # a half-written line
    metrics.truncate(str(path), 3)
    assert [json.loads(line) for line in open(path)] == lines
    metrics.truncate(str(path), 2)
    assert [json.loads(line) for line in open(path)] == lines[:2]
    metrics.truncate(str(path), 0)
    assert path.read_text() == ""


def test_divergence_names_a_checkpoint_that_resumes(tmp_path):
    # lr 1e30 from the first step: step 1's update diverges, so its checkpoint is never written
    with pytest.raises(NonFiniteLoss, match="at step 2 .*no checkpoint was written"):
        train(tiny(tmp_path / "a", method="clip", steps=6, lr=1e30, ckpt_every=1))
    assert not os.path.exists(tmp_path / "a" / CHECKPOINT)
    # a warmup over 1e27 steps: the lr grows by 1e3 a step, the weights blow up a few steps in
    cfg = tiny(tmp_path / "b", method="clip", steps=8, lr=1e30, warmup=10 ** 27, ckpt_every=1)
    with pytest.raises(NonFiniteLoss) as e:
        train(cfg)
    failed, kept = map(int, re.search(r"at step (\d+) .*\(step (\d+)\)", str(e.value)).groups())
    assert kept == failed - 2                   # step failed - 1 was the diverging update: not kept
    assert ckpt.load(os.path.join(cfg.output_dir, CHECKPOINT))["step"] == kept     # finite, or load raises
    with pytest.raises(NonFiniteLoss, match=f"at step {failed} "):                # not at once: as far again
        train(dataclasses.replace(cfg, resume=True))


def test_a_periodic_checkpoint_resumes_the_same_trajectory(tmp_path, monkeypatch):
    full = train(tiny(tmp_path / "full", method="flip", steps=4))          # flip: the forward draws RNG
    real, calls = losses.clip_loss, []

    def poisoned(*a):
        calls.append(1)
        return real(*a) * float("nan") if len(calls) == 4 else real(*a)
    monkeypatch.setattr(losses, "clip_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"at step 4 .*\(step 2\)"):
        train(tiny(tmp_path / "part", method="flip", steps=4, ckpt_every=2))
    monkeypatch.undo()
    rest = train(tiny(tmp_path / "part", method="flip", steps=4, resume=True))
    assert rest["losses"] == full["losses"][2:]


def test_non_finite_weights_or_optimiser_state_are_never_saved(tmp_path, monkeypatch):
    def corrupting(state, step):
        out = real(state, step)
        if step == 1:                           # the last of 2 steps: its loss is never computed
            next(iter(state.optimizer.state.values()))["exp_avg"].fill_(float("inf"))
        return out
    real = loop.apply_update
    monkeypatch.setattr(loop, "apply_update", corrupting)
    with pytest.raises(NonFiniteLoss, match=r"non-finite weights or optimiser state at step 2 .*not saved.*step 1\)"):
        train(tiny(tmp_path, method="clip", steps=2, ckpt_every=1))
    assert ckpt.load(os.path.join(tmp_path, CHECKPOINT))["step"] == 1


def test_sigterm_during_start_up_stops_at_once(tmp_path, monkeypatch):
    def signalling(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the start-up")
    monkeypatch.setattr(loop, "make_train_loader", signalling)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped, match="SIGTERM during start-up"):
        train(tiny(tmp_path, method="clip"))
    assert signal.getsignal(signal.SIGTERM) is before
    assert not os.path.exists(tmp_path / CHECKPOINT)
