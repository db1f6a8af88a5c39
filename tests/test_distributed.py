"""torchrun with 2 CPU processes (gloo): trains, saves a plain checkpoint on rank 0, ranks see disjoint data."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch

from fakes import ROOT, TINY
from test_reliability import last_step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), os.path.join(ROOT, "train.py"),
           "--dataset", "toyfaces", *TINY, "--classifier_epochs", "1", "--oracle_epochs", "1",
           "--diffusion_epochs", "2", "--max_steps_per_epoch", "3", "--subset_fraction", "0.02", "--save_every", "1",
           "--sample_every", "1", "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout
    assert proc.stdout.count("GuidedEmotion training on") == 1              # rank 0 alone prints

    ckpt = torch.load(out / "diffusion_final.pth", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])   # plain, unwrapped weights
    assert ckpt["args"]["batch_size"] == 16
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if "epoch" in r]
    assert len(epochs) == 4                                          # written once (rank 0), not per rank
    for r in epochs:
        assert r["rank_samples"] == [3 * 16, 3 * 16] and r["ranks_disjoint"] is True
    # the checkpoint drives generate.py like a single-process one
    gen = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--diffusion_model",
                          str(out / "diffusion_final.pth"), "--classifier_model", str(out / "classifier_best.pth"),
                          "--device", "cpu", "--steps", "4", "--num_samples", "2", "--output", str(tmp_path / "g.png")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr[-2000:]


def test_torchrun_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Under torchrun too: stopped mid-epoch with SIGTERM, resumed with --resume auto, same final weights."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["--dataset", "toyfaces", *TINY, "--classifier_epochs", "0", "--oracle_epochs", "0", "--diffusion_epochs",
            "2", "--max_steps_per_epoch", "6", "--subset_fraction", "0.02", "--sample_every", "0", "--precision", "fp32"]

    def torchrun(out, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), os.path.join(ROOT, "train.py"),
                *args, "--output_dir", str(out), *extra]

    straight = subprocess.run(torchrun(tmp_path / "straight"), env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "stopped"
    p = subprocess.Popen(torchrun(out, "--checkpoint_every", "1"), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while last_step(out) < 3:
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < 120
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)                       # torchrun forwards it to both ranks
    p.communicate(timeout=120)
    assert p.returncode != 0
    state = torch.load(out / "last.pth", weights_only=True)
    assert len(state["rng"]) == 2 and state["step"] < 12 and not (out / "diffusion_final.pth").exists()

    resumed = subprocess.run(torchrun(out, "--resume", "auto"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming diffusion" in resumed.stdout
    a = torch.load(tmp_path / "straight" / "diffusion_final.pth", weights_only=True)
    b = torch.load(out / "diffusion_final.pth", weights_only=True)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
