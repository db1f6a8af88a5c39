"""Data-parallel training: each rank's shard of an epoch, and torchrun with 2 CPU processes (gloo) end to end."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from fakes import ROOT, TINY
from generate import generate_images, load_models
from train import LOG_EVERY, STAGES, epoch_order

# every stage, 30 batches of 4 per rank and epoch, so that the diffusion stage passes a stop check (LOG_EVERY)
ARGS = ["--dataset", "toyfaces", *TINY, "--batch_size", "4", "--classifier_epochs", "1", "--oracle_epochs", "1",
        "--diffusion_epochs", "2", "--max_steps_per_epoch", "30", "--subset_fraction", "0.02", "--checkpoint_every",
        "5", "--precision", "fp32"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out, *extra) -> list:
    """train.py under torchrun: 2 CPU processes on one node (gloo), on a port that is free now."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), os.path.join(ROOT, "train.py"), *ARGS,
            "--output_dir", str(out), *map(str, extra)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One uninterrupted torchrun run, with epoch checkpoints and sample grids."""
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run(torchrun(out, "--save_every", 1, "--sample_every", 1), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.parametrize("n, world", [(50, 2), (103, 4), (7, 3), (10, 1)])
def test_epoch_order_gives_each_rank_a_disjoint_equal_shard(n, world):
    """The ranks' shards of one epoch: equal sizes, disjoint, together every index but the tail that does not
    divide evenly; the same again for the same arguments (a resumed run), another order in another epoch or
    stage."""
    shards = [epoch_order(n, 3, "diffusion", 2, rank, world) for rank in range(world)]
    assert all(s.dtype == torch.long and len(s) == n // world for s in shards)
    union = torch.cat(shards)
    assert len(set(union.tolist())) == len(union) == n - n % world and 0 <= union.min() and union.max() < n
    for rank, s in enumerate(shards):
        assert torch.equal(s, epoch_order(n, 3, "diffusion", 2, rank, world))           # after a resume
    assert not torch.equal(union, torch.cat([epoch_order(n, 3, "diffusion", 3, r, world) for r in range(world)]))
    assert not torch.equal(union, torch.cat([epoch_order(n, 3, STAGES[0], 2, r, world) for r in range(world)]))
    assert not torch.equal(union, torch.cat([epoch_order(n, 4, "diffusion", 2, r, world) for r in range(world)]))


def test_torchrun_two_cpu_processes(ddp_run):
    out, proc = ddp_run
    assert "x 2 processes" in proc.stdout
    assert proc.stdout.count("GuidedEmotion training on") == 1              # rank 0 alone prints
    ckpt = torch.load(out / "diffusion_final.pth", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])   # plain, unwrapped weights
    assert ckpt["args"]["batch_size"] == 4 and "optimizer" not in ckpt
    rng = torch.load(out / "last.pth", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])    # each rank its own t, eps, flips
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if "epoch" in r]                         # written once (rank 0), not per rank
    assert [(r["stage"], r["step"]) for r in epochs] == [("classifier", 30), ("oracle", 30), ("diffusion", 30),
                                                         ("diffusion", 60)]
    assert (out / "diffusion_epoch_1.pth").is_file() and (out / "samples" / "diffusion_epoch_2.png").is_file()
    # the checkpoints drive generate.py like a single-process run's
    m = load_models(str(out / "diffusion_final.pth"), str(out / "classifier_best.pth"), str(out / "oracle_best.pth"),
                    torch.device("cpu"))
    x = generate_images(m, 1, 5.0, n=2, steps=4)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all() and m.guide_grads["images"] == 2 * 4


def test_torchrun_sigterm_then_resume_equals_an_uninterrupted_run(ddp_run, tmp_path):
    """Under torchrun too: stopped with SIGTERM, resumed with --resume auto, the same weights as the uninterrupted
    run. The ranks agree to stop (one all-reduce) at the next multiple of train.LOG_EVERY steps or the end of the
    epoch, whichever comes first: step 30 (epoch 1's end) or LOG_EVERY (inside epoch 2)."""
    assert 30 < LOG_EVERY < 60
    out = tmp_path / "stopped"
    p = subprocess.Popen(torchrun(out, "--sample_every", 0), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    t0 = time.time()
    while diffusion_step(out) < 5:
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < 120
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)                       # torchrun passes it on to both ranks
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode != 0 and "stopped by signal" in stdout
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["step"] in (30, LOG_EVERY)
    assert (state["stage"], state["epoch"], state["batch"]) == ("diffusion", 1, state["step"] - 30)
    assert len(state["rng"]) == 2 and not (out / "diffusion_final.pth").exists()

    resumed = subprocess.run(torchrun(out, "--resume", "auto"), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming diffusion at epoch 2, batch {state['step'] - 30}" in resumed.stdout
    for name, parts in (("diffusion_final.pth", ("model", "ema")), ("classifier_best.pth", ("model",))):
        a, b = (torch.load(d / name, weights_only=True) for d in (ddp_run[0], out))
        for part in parts:
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), (name, part, k)


def diffusion_step(out) -> int:
    """The step last.pth was saved at in the diffusion stage, -1 before."""
    try:
        state = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    except Exception:                                   # not there yet
        return -1
    return state["step"] if state["stage"] == "diffusion" else -1
