"""Faults: kill and resume, Ctrl-C, overwrite refusal, NaN, malicious and damaged checkpoints, failed writes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from common import UserError, atomic_save, load_checkpoint
from fakes import ROOT, TINY, assert_ok, assert_user_error, run, run_here, snapshot

# diffusion only, to keep each run short (batches of 4: fp16 autocast is slow on a CPU); 2 epochs x 6 steps,
# last.pth every 2 steps
QUICK = ["--dataset", "toyfaces", *TINY, "--batch_size", 4, "--classifier_epochs", 0, "--oracle_epochs", 0, "--diffusion_epochs", 2,
         "--max_steps_per_epoch", 6, "--subset_fraction", 0.005, "--checkpoint_every", 2, "--sample_every", 0,
         "--dropout", 0.1, "--precision", "fp32", "--num_workers", 0]


def popen(out, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, QUICK), "--output_dir",
                             str(out), *map(str, extra)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def last_step(out):
    try:
        return torch.load(os.path.join(out, "last.pth"), weights_only=True)["step"]
    except Exception:
        return -1


def wait_for_step(proc, out, step, timeout=120):
    t0 = time.time()
    while last_step(out) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def weights(path):
    ckpt = torch.load(path, weights_only=True)
    return {**{"model." + k: v for k, v in ckpt["model"].items()}, **{"ema." + k: v for k, v in ckpt["ema"].items()}}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, precision):
    """Killed mid-epoch and resumed from last.pth: bit-identical weights. Under fp16 the GradScaler's state
    (its scale and growth tracker) is in last.pth and is restored with the rest."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run("train.py", *QUICK, "--precision", precision, "--save_every", 1, "--output_dir", straight)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"fp32": "on cpu, fp32;", "fp16": "on cpu, float16;"}[precision] in proc.stdout

    p = popen(killed, "--precision", precision, "--save_every", 1, "--checkpoint_every", 1)
    wait_for_step(p, killed, 2)                                   # epoch 1 has steps 0-5: this is mid-epoch
    p.send_signal(signal.SIGKILL)
    p.wait()
    state = torch.load(killed / "last.pth", weights_only=True)
    assert state["stage"] == "diffusion" and state["epoch"] == 0 and 0 < state["batch"] < 6
    assert "state" in state["optimizer"] and not (killed / "diffusion_final.pth").exists()
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    else:
        assert state["scaler"] == {}                              # no scaler without fp16

    resumed = run("train.py", "--resume", "auto", "--output_dir", killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming diffusion at epoch 1, batch {state['batch']}" in resumed.stdout
    assert not (killed / "samples").exists()                      # the run's own --sample_every 0, kept
    assert "CUDA is not available" not in resumed.stdout          # and its own --device cpu
    a, b = weights(straight / "diffusion_final.pth"), weights(killed / "diffusion_final.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k                         # bit-identical
    assert torch.load(killed / "diffusion_final.pth", weights_only=True)["epoch"] == 2
    losses = [[json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
              for out in (straight, killed)]
    assert losses[0] == losses[1] and len(losses[0]) == 2     # epoch 1's loss counts the batches before the kill
    scalers = [torch.load(out / "last.pth", weights_only=True)["scaler"] for out in (straight, killed)]
    assert scalers[0] == scalers[1]                               # the scaler continued, not restarted
    # it trained: epoch 2 moved the weights on from epoch 1
    epoch1 = weights(straight / "diffusion_epoch_1.pth")
    assert not torch.equal(epoch1["model.conv_out.weight"], a["model.conv_out.weight"])


def test_sigint_saves_resumable_state_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    p = popen(out, "--diffusion_epochs", 50, "--checkpoint_every", 1)
    wait_for_step(p, out, 2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "continue with: python train.py --resume auto" in stdout
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["step"] >= 2 and state["kind"] == "train_state" and set(state["rng"][0]) == {"torch"}          # what training draws from
    # the resumed run continues past the saved step (and can be stopped again)
    p2 = popen(out, "--diffusion_epochs", 50, "--resume", "auto")        # QUICK's other flags are the run's own
    wait_for_step(p2, out, state["step"] + 1)
    p2.send_signal(signal.SIGTERM)
    p2.communicate(timeout=120)
    assert p2.returncode == 128 + signal.SIGTERM
    assert last_step(out) > state["step"]


def here(script, *args, tmp_path, capsys, monkeypatch):
    """A script's main() in this process: for runs that need no signals, without an interpreter's start-up."""
    return run_here(script, *args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)


def test_refuses_to_overwrite_an_earlier_run(tmp_path, capsys, monkeypatch):
    out, ctx = tmp_path / "run", dict(tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    out.mkdir()
    (out / "diffusion_final.pth").write_bytes(b"precious")
    (out / "last.pth").write_bytes(b"the earlier run's state")
    (out / "train_log.jsonl").write_text('{"stage": "earlier"}\n')
    before = snapshot(tmp_path)
    proc = here("train.py", *QUICK, "--output_dir", out, **ctx)
    assert_user_error(proc, "already holds diffusion_final.pth, last.pth", "--resume auto", "--overwrite")
    proc = here("train.py", *QUICK, "--output_dir", out, "--overwrite", "--dataset", "celeba", "--data_root",
                tmp_path / "nowhere", **ctx)                              # bad input: --overwrite removes nothing
    assert_user_error(proc, "CelebA not found")
    proc = here("train.py", *QUICK, "--output_dir", out, "--overwrite", "--batch_size", 101, **ctx)
    assert_user_error(proc, "100 training images are fewer than one batch of 101")     # found after loading,
    assert snapshot(tmp_path).items() >= before.items()                                 # the cache new, all kept
    proc = here("train.py", *QUICK, "--diffusion_epochs", 1, "--max_steps_per_epoch", 1, "--output_dir", out,
                "--overwrite", **ctx)
    assert_ok(proc)
    assert "removed the earlier run's last.pth and train_log.jsonl" in proc.stdout
    assert "earlier" not in (out / "train_log.jsonl").read_text()          # a fresh log, not the old one continued
    assert (out / "diffusion_final.pth").read_bytes() != b"precious"
    assert torch.load(out / "last.pth", weights_only=True)["step"] == 1


def test_resume_refuses_a_flag_that_differs_from_the_run(tmp_path, capsys, monkeypatch):
    out, ctx = tmp_path / "run", dict(tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_ok(here("train.py", *QUICK, "--diffusion_epochs", 1, "--max_steps_per_epoch", 2, "--output_dir", out, **ctx))
    lr = torch.load(out / "last.pth", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(2e-4 * 2 / 5)                  # --lr's default warmed up linearly: step 2 of 5
    before = snapshot(out)
    proc = here("train.py", "--resume", "auto", "--output_dir", out, "--attribute", "Young", **ctx)
    assert_user_error(proc, "--attribute Young differs from the resumed run's Smiling", "drop --attribute")
    proc = here("train.py", "--resume", "auto", "--output_dir", out, "--diffusion_epochs", 3, **ctx)
    assert_user_error(proc, "--diffusion_epochs 3 differs from the resumed run's 1")
    proc = here("train.py", "--resume", "auto", "--output_dir", out, "--batch_size", 8, **ctx)
    assert_user_error(proc, "--batch_size 8 differs from the resumed run's 4")
    proc = here("train.py", "--resume", out / "last.pth", "--output_dir", tmp_path / "elsewhere", **ctx)
    assert_user_error(proc, "continues the run in its own folder", "drop --output_dir")
    monkeypatch.setenv("WORLD_SIZE", "2")                      # torchrun's, for a run written by one process
    assert_user_error(here("train.py", "--resume", "auto", "--output_dir", out, **ctx), "written by 1 process(es), "
                      "this run has 2; resume with 1")
    monkeypatch.delenv("WORLD_SIZE")
    assert snapshot(out) == before and not (tmp_path / "elsewhere").exists()
    # a path without --output_dir continues in the run's folder, not in the working directory
    assert_ok(here("train.py", "--resume", out / "last.pth", **ctx))
    assert sorted(os.listdir(tmp_path)) == ["run"]
    # the run's own values, and where and how the process runs, are accepted: a run resumed on a machine whose
    # --precision gives fp16 (a T4) starts a fresh gradient scaler
    proc = here("train.py", *QUICK, "--diffusion_epochs", 1, "--max_steps_per_epoch", 2, "--checkpoint_every", 5,
                "--save_every", 3, "--num_workers", 1, "--precision", "fp16", "--resume", "auto", "--output_dir", out,
                **ctx)
    assert_ok(proc)
    assert "resuming diffusion at epoch 2, batch 0, step 2" in proc.stdout and "float16" in proc.stdout


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    quick = [str(a) for a in QUICK]
    quick[quick.index("--classifier_epochs") + 1] = "1"
    proc = here("train.py", *quick, "--lr", "1e30", "--output_dir", out, tmp_path=tmp_path, capsys=capsys,
                monkeypatch=monkeypatch)                                    # the classifier is fine, diffusion is not
    assert_user_error(proc, "diffusion: the loss became NaN/Inf at step", "last good checkpoint is kept")
    good = torch.load(out / "last.pth", weights_only=True)
    assert good["stage"] == "classifier"                          # the classifier stage's final state is kept
    assert (out / "classifier_best.pth").is_file() and not (out / "diffusion_final.pth").exists()
    assert all(torch.isfinite(v).all() for v in good["modules"]["model"].values() if v.is_floating_point())


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, capsys, monkeypatch):
    marker, ctx = tmp_path / "pwned", dict(tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "guidedemotion", "format_version": 3, "kind": "diffusion", "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refused by the safe loader"):
        load_checkpoint(str(tmp_path / "evil.pth"), "diffusion")
    proc = here("generate.py", "--diffusion_model", tmp_path / "evil.pth", "--device", "cpu", **ctx)
    assert_user_error(proc, "refused by the safe loader", "GLOBAL")
    proc = here("train.py", "--resume", tmp_path / "evil.pth", "--output_dir", tmp_path, **ctx)
    assert_user_error(proc, "refused by the safe loader")
    assert not marker.exists()


def test_damaged_and_old_checkpoints(tmp_path, capsys, monkeypatch):
    ctx = dict(tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    good = {"format": "guidedemotion", "format_version": 3, "kind": "train_state", "w": torch.ones(1000)}
    torch.save(good, tmp_path / "last.pth")
    data = (tmp_path / "last.pth").read_bytes()
    (tmp_path / "last.pth").write_bytes(data[:len(data) // 3])                   # truncated on disk
    assert_user_error(here("train.py", "--resume", "auto", "--output_dir", tmp_path, **ctx), "last.pth",
                      "corrupt or truncated")
    torch.save({**good, "format_version": 1}, tmp_path / "old.pth")              # written before the redesign
    with pytest.raises(UserError, match="format version 1, this code reads version 3; retrain"):
        load_checkpoint(str(tmp_path / "old.pth"))
    assert_user_error(here("generate.py", "--diffusion_model", "old.pth", "--device", "cpu", **ctx), "old.pth",
                      "format version 1", "retrain")
    assert sorted(os.listdir(tmp_path)) == ["last.pth", "old.pth"]


def test_random_bytes_are_always_a_clean_corrupt_error(tmp_path):
    rng = torch.Generator().manual_seed(0)
    for i in range(40):                      # the unpickler fails in many different ways on garbage
        data = torch.randint(0, 256, (int(torch.randint(1, 600, (1,), generator=rng)),), generator=rng)
        path = tmp_path / f"junk{i}.pth"
        path.write_bytes(bytes(data.to(torch.uint8).tolist()))
        with pytest.raises(UserError, match="corrupt|not a GuidedEmotion|refused"):
            load_checkpoint(str(path), "diffusion")


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "diffusion_final.pth"
    atomic_save({"v": torch.tensor([1.0])}, str(path))
    before = path.read_bytes()
    (tmp_path / "plain").write_text("x")                          # the mode that open() gives under this umask
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    os.remove(tmp_path / "plain")

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.torch, "save", disk_full)
    with pytest.raises(UserError, match="could not write .*No space left on device.*free disk space"):
        atomic_save({"v": torch.tensor([2.0])}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["diffusion_final.pth"]              # no temp file left behind
    monkeypatch.undo()
    longest = tmp_path / ("n" * 251 + ".png")                            # 255 bytes, the most a name may have
    atomic_save("a name the file system takes", str(longest))           # its temporary file's name fits too
    assert longest.read_text() == "a name the file system takes"


def test_unwritable_output_is_caught_before_training(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    proc = here("train.py", *QUICK, "--output_dir", tmp_path / "afile" / "run", tmp_path=tmp_path, capsys=capsys,
                monkeypatch=monkeypatch)
    assert_user_error(proc, "cannot write to output folder")
    assert proc.stdout == "" and snapshot(tmp_path) == before
