"""train.py and generate.py end to end through subprocess on 16x16 images, and every bad input."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fakes import SEED_OUTPUTS, TINY, assert_ok, assert_user_error, run, run_here, snapshot
from generate import load_diffusion
from train import update_ema

# ---------------------------------------------------------------------------------------------- train.py


def test_train_writes_the_seed_outputs_and_self_describing_checkpoints(toy_run):
    out, proc = toy_run
    for f in SEED_OUTPUTS + ("oracle_best.pth", "diffusion_epoch_1.pth", "diffusion_epoch_2.pth", "last.pth",
                             "train_log.jsonl", "samples/diffusion_epoch_2.png"):
        assert (out / f).is_file(), f
    d = torch.load(out / "diffusion_final.pth", weights_only=True)
    assert d["kind"] == "diffusion" and d["dataset"] == "toyfaces" and d["attribute"] == "Smiling"
    assert d["config"]["image_size"] == 16 and d["diffusion"]["timesteps"] == 100
    assert set(d["ema"]) == set(d["model"]) and "state" in d["optimizer"]
    assert d["epoch"] == 2 and d["step"] == 8 and d["args"]["diffusion_epochs"] == 2
    c = torch.load(out / "classifier_best.pth", weights_only=True)
    assert c["kind"] == "classifier" and c["diffusion"]["timesteps"] == 100 and "state" in c["optimizer"]
    assert c["step"] == 4 * c["epoch"]
    assert set(c["valid_acc"]) == {"valid_acc_t0", "valid_acc_t25", "valid_acc_t50", "valid_acc_t75"}
    o = torch.load(out / "oracle_best.pth", weights_only=True)
    assert o["kind"] == "oracle" and o["attr_names"][0] == "Smiling" and len(o["test_acc"]) == 5
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in log if "epoch" in r]
    assert stages == ["classifier", "classifier", "oracle", "diffusion", "diffusion"]
    assert all(r["images_per_s"] > 0 and r["seconds"] >= 0 for r in log if "epoch" in r)
    final = [r for r in log if r.get("final")]
    assert {"test_acc_t0", "test_acc_t50"} <= set(final[0]) and "test_acc" in final[1]
    assert "classifier test accuracy" in proc.stdout and "diffusion_final.pth" in proc.stdout
    # the EMA moved away from the zero-initialised output layer, lags the trained weights, and is what generate uses
    assert d["ema"]["conv_out.weight"].abs().sum() > 0
    assert not torch.equal(d["ema"]["conv_out.weight"], d["model"]["conv_out.weight"])
    net = load_diffusion(str(out / "diffusion_final.pth"), torch.device("cpu"))[0]
    assert all(torch.equal(v, d["ema"][k]) for k, v in net.state_dict().items())


def test_ema_update_is_the_warmed_up_lerp():
    """ema <- d ema + (1 - d) theta with d = min(decay, (1 + step) / (10 + step)); buffers are copied."""
    torch.manual_seed(0)
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.normal_()
        model.running_mean.normal_()
    for step, decay in ((0, 0.9995), (10 ** 6, 0.9995), (10 ** 6, 0.9)):
        before = ema.weight.detach().clone()
        update_ema(ema, model, decay, step)
        d = min(decay, (1 + step) / (10 + step))                       # 0.1 at step 0
        assert torch.allclose(ema.weight, d * before + (1 - d) * model.weight, atol=1e-7), step
        assert torch.equal(ema.running_mean, model.running_mean)


def test_train_on_fake_celeba(celeba_run):
    data, out, proc = celeba_run
    assert "celeba train: 36 images in split, using 36 (100%)" in proc.stdout
    d = torch.load(out / "diffusion_final.pth", weights_only=True)
    assert d["dataset"] == "celeba" and len(d["attr_names"]) == 40
    assert len(torch.load(out / "oracle_best.pth", weights_only=True)["test_acc"]) == 40


# ---------------------------------------------------------------------------------------------- generate.py


def test_generate_with_the_seed_defaults(toy_run, tmp_path):
    out, _ = toy_run
    work = tmp_path / "gen"
    work.mkdir()
    for f in SEED_OUTPUTS + ("oracle_best.pth",):
        shutil.copy(out / f, work / f)
    proc = run("generate.py", "--target_label", 1, "--guidance_scale", 3.0, "--num_samples", 16, "--device", "cpu",
               "--steps", 10, cwd=work)
    assert_ok(proc)
    assert (work / "generated_samples.png").is_file()
    pngs = sorted(os.listdir(work / "generated_samples"))
    assert len(pngs) == 16 and pngs[0] == "sample_0000.png"
    assert Image.open(work / "generated_samples" / pngs[0]).size == (16, 16)
    report = json.loads((work / "generated_samples.json").read_text())
    assert report["mode"] == "sampling" and report["target_label"] == 1 and report["steps"] == 10
    s = report["summary"]["scale_3"]
    assert 0 <= s["oracle_target_rate"] <= 1 and 0 <= s["guide_target_rate"] <= 1
    assert len(report["samples"]) == 16 and 0 <= report["samples"][0]["guide_p_target"] <= 1
    assert "not an independent judge" in proc.stdout and "oracle (independent)" in proc.stdout


def test_generate_no_guidance_needs_no_classifier(toy_run, tmp_path):
    out, _ = toy_run
    shutil.copy(out / "diffusion_final.pth", tmp_path / "diffusion_final.pth")
    proc = run("generate.py", "--no_guidance", "--num_samples", 4, "--device", "cpu", "--steps", 5, cwd=tmp_path)
    assert_ok(proc)
    report = json.loads((tmp_path / "generated_samples.json").read_text())
    assert list(report["summary"]) == ["unguided"] and report["guide"] is None
    assert len(os.listdir(tmp_path / "generated_samples")) == 4
    # a second, smaller run with the same --output leaves no images of the first behind
    (tmp_path / "generated_samples" / "notes.txt").write_text("the user's own file")
    proc = run("generate.py", "--no_guidance", "--num_samples", 2, "--device", "cpu", "--steps", 5, cwd=tmp_path)
    assert_ok(proc)
    assert "removed 2 per-sample image(s) that an earlier run wrote" in proc.stdout
    assert sorted(os.listdir(tmp_path / "generated_samples")) == ["notes.txt", "sample_0000.png", "sample_0001.png"]


def test_generate_ddpm_several_scales_and_reproducible(toy_run, tmp_path):
    out, _ = toy_run
    args = ["--diffusion_model", out / "diffusion_final.pth", "--classifier_model", out / "classifier_best.pth",
            "--sampler", "ddpm", "--steps", 8, "--num_samples", 3, "--guidance_scale", 0, 5, "--device", "cpu",
            "--batch_size", 2]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert_ok(run("generate.py", *args, "--output", a))
    assert_ok(run("generate.py", *args, "--output", b))
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))
    assert len(os.listdir(tmp_path / "a")) == 6 and (tmp_path / "a" / "s5_sample_0002.png").is_file()
    assert a.read_bytes() == b.read_bytes()                             # same seed, same pictures
    report = json.loads((tmp_path / "a.json").read_text())
    assert set(report["summary"]) == {"scale_0", "scale_5"} and report["sampler"] == "ddpm"
    # guidance reaches the sampler from the command line: scale 5's samples are not scale 0's
    for i in range(3):
        s0, s5 = (np.asarray(Image.open(tmp_path / "a" / f"s{s}_sample_{i:04d}.png")).astype(int) for s in (0, 5))
        assert np.abs(s5 - s0).mean() > 0, i


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, fragments", [
    (["--dataset", "celeba", "--data_root", "{tmp}/nowhere"], ["CelebA not found", "Kaggle"]),
    (["--attribute", "Smilin"], ["unknown attribute", "Smiling"]),
    (["--image_size", "20", "--channel_mult", "1,2,2,2"], ["multiple of 8"]),
    (["--image_size", "4", "--channel_mult", "1,2"], ["--image_size 4 is too small"]),
    (["--batch_size", "0"], ["--batch_size must be > 0"]),
    (["--diffusion_epochs", "-1"], ["--diffusion_epochs must be >= 0"]),
    (["--timesteps", "0"], ["--timesteps must be > 0"]),
    (["--subset_fraction", "1.5"], ["--subset_fraction"]),
    (["--output_dir", "{tmp}/afile/sub"], ["cannot write", "afile"]),
    (["--channel_mult", "1,x"], ["--channel_mult"]),
    (["--dataset", "mnist"], ["--dataset"]),
    (["--channel_mult", ""], ["channel_mult needs one or more width multipliers"]),
    (["--channel_mult", "1,0"], ["each >= 1"]),
    (["--device", "foo"], ["--device 'foo' is not a device name"]),
    (["--device", "meta"], ["cpu, cuda, cuda:N or mps"]),
    (["--lr", "nan"], ["--lr must be > 0, got nan"]),
    (["--grad_clip", "inf"], ["--grad_clip must be > 0, got inf"]),
    (["--weight_decay", "inf"], ["--weight_decay must be >= 0, got inf"]),
    (["--attn_resolutions", "-8"], ["--attn_resolutions -8 is not a feature-map side", "16, 8"]),
    (["--attn_resolutions", "8,12"], ["--attn_resolutions 12"]),
    (["--seed", "4294967296"], ["--seed must be an integer in [0, 4294862566]"]),
    (["--seed", "-1"], ["--seed must be an integer in [0, 4294862566]"]),
])
def test_train_bad_input(tmp_path, extra, fragments, capsys, monkeypatch):
    (tmp_path / "afile").write_text("not a folder")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    before = snapshot(tmp_path)
    args = ["--dataset", "toyfaces", *TINY, "--output_dir", tmp_path / "out"]
    proc = run_here("train.py", *args, *extra, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_user_error(proc, *fragments)
    assert snapshot(tmp_path) == before


@pytest.fixture()
def gen_dir(toy_run, celeba_run, tmp_path):
    """A folder with the seed's checkpoint names and an earlier output that must survive bad input."""
    out, _ = toy_run
    for f in SEED_OUTPUTS + ("oracle_best.pth",):
        shutil.copy(out / f, tmp_path / f)
    (tmp_path / "generated_samples.png").write_bytes(b"earlier output")
    (tmp_path / "junk.pth").write_bytes(bytes(range(256)) * 2)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pth")
    ckpt = torch.load(out / "classifier_best.pth", weights_only=True)
    ckpt["image_size"], ckpt["config"]["image_size"] = 32, 32
    torch.save(ckpt, tmp_path / "classifier_32.pth")
    truncated = (out / "diffusion_final.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(truncated[:len(truncated) // 2])
    (tmp_path / "afile").write_text("x")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    (tmp_path / "faces").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "faces" / "a.png")
    (tmp_path / "generated_samples").mkdir()                          # an earlier run's per-sample images
    Image.new("RGB", (16, 16)).save(tmp_path / "generated_samples" / "sample_0000.png")
    (tmp_path / "folder.png").mkdir()
    _, c_out, _ = celeba_run
    shutil.copy(c_out / "diffusion_final.pth", tmp_path / "celeba_diffusion.pth")
    shutil.copy(c_out / "classifier_best.pth", tmp_path / "celeba_classifier.pth")
    shutil.copy(c_out / "oracle_best.pth", tmp_path / "celeba_oracle.pth")
    return tmp_path


@pytest.mark.parametrize("extra, fragments", [
    (["--num_samples", "0"], ["--num_samples must be > 0"]),
    (["--steps", "0"], ["--steps must be > 0"]),
    (["--steps", "101"], ["--steps 101", "100 timesteps"]),
    (["--target_label", "2"], ["--target_label", "invalid choice"]),
    (["--guidance_scale", "-1"], ["--guidance_scale must be >= 0"]),
    (["--guidance_scale", "3", "nan"], ["--guidance_scale must be >= 0, got nan"]),
    (["--guidance_scale", "inf"], ["--guidance_scale must be >= 0, got inf"]),
    (["--input", "generated_samples/sample_0000.png"], ["would write over or into",   # a rerun rewrites that folder
                                                        "generated_samples/sample_0000.png"]),
    (["--output", "folder.png"], ["--output 'folder.png' is a folder; give a file name"]),
    (["--output", "afile.png"], ["needs the sample folder 'afile', but that is a file"]),
    (["--batch_size", "-3"], ["--batch_size must be > 0"]),
    (["--diffusion_model", "missing.pth"], ["missing.pth", "not found"]),
    (["--diffusion_model", "junk.pth"], ["junk.pth", "corrupt"]),
    (["--diffusion_model", "truncated.pth"], ["truncated.pth", "corrupt or truncated"]),
    (["--diffusion_model", "foreign.pth"], ["not a GuidedEmotion checkpoint"]),
    (["--diffusion_model", "classifier_best.pth"], ["classifier checkpoint, expected a diffusion"]),
    (["--classifier_model", "diffusion_final.pth"], ["diffusion checkpoint, expected a classifier"]),
    (["--classifier_model", "classifier_32.pth"], ["32x32", "16x16"]),
    (["--oracle_model", "classifier_best.pth"], ["expected a oracle"]),
    (["--output", "afile/out.png"], ["cannot write", "afile"]),
    (["--output", "grid.gif"], ["--output"]),
    (["--strength", "1.5", "--input", "garbage.png"], ["--strength must be in [0, 1]"]),
    (["--strength", "-0.1", "--from_dataset", "4"], ["--strength must be in [0, 1]"]),
    (["--input", "garbage.png"], ["garbage.png"]),
    (["--invert", "--from_dataset", "4"], ["--invert", "--sampler ddim"]),
    (["--localize"], ["--localize", "--input/--from_dataset"]),
    (["--mask_threshold", "1.5", "--from_dataset", "4"], ["--mask_threshold must be in [0, 1)"]),
    (["--mask_dilation", "-1", "--from_dataset", "4"], ["--mask_dilation must be >= 0"]),
    (["--resample", "0", "--from_dataset", "4", "--localize"], ["--resample must be > 0"]),
    (["--resample", "2", "--from_dataset", "4"], ["--resample", "--localize"]),
    (["--input", "nothere.png"], ["nothere.png", "does not exist"]),
    (["--input", "garbage.png", "--output", "garbage.png"], ["would write over or into", "garbage.png"]),
    (["--input", "faces", "--output", "faces/cf.png"], ["would write over or into", "'faces'"]),
    (["--input", "faces", "--output", "faces.png"], ["would write over or into", "'faces'"]),   # its sample folder
    (["--classifier_model", "celeba_classifier.pth"], ["trained on celeba", "toyfaces", "same dataset"]),
    (["--device", "foo"], ["--device 'foo' is not a device name"]),
    (["--seed", str(10 ** 15)], ["--seed must be an integer in [0, 4294862566]"]),
    (["--strength", "0.3"], ["--strength works on --input/--from_dataset", "drop it"]),
    (["--retry_scales"], ["--retry_scales works on --input/--from_dataset"]),
    (["--num_samples", "4", "--from_dataset", "4"], ["--num_samples sets the number of samples from noise"]),
    (["--mask_threshold", "0.1", "--from_dataset", "4"], ["--mask_threshold works on --localize"]),
    (["--eta", "0.5", "--sampler", "ddpm"], ["--eta is DDIM's noise"]),
    (["--from_dataset", "4", "--diffusion_model", "celeba_diffusion.pth", "--classifier_model",
      "celeba_classifier.pth", "--oracle_model", "celeba_oracle.pth", "--data_root", "nowhere"], ["CelebA not found"]),
])
def test_generate_bad_input(gen_dir, extra, fragments, capsys, monkeypatch):
    before = snapshot(gen_dir)
    proc = run_here("generate.py", "--device", "cpu", "--steps", 5, *extra, cwd=gen_dir, capsys=capsys,
                    monkeypatch=monkeypatch)
    assert_user_error(proc, *fragments)
    assert snapshot(gen_dir) == before


def test_bad_input_through_the_real_command_line(gen_dir, tmp_path):
    """The same contract through a real interpreter: exit 2, one line, no traceback, nothing touched."""
    before = snapshot(gen_dir)
    assert_user_error(run("generate.py", "--device", "cpu", "--diffusion_model", "junk.pth", cwd=gen_dir), "corrupt")
    assert_user_error(run("generate.py", "--device", "cpu", "--target_label", "5", cwd=gen_dir), "--target_label")
    assert_user_error(run("train.py", "--dataset", "toyfaces", "--attribute", "Smilling", "--output_dir", gen_dir),
                      "did you mean 'Smiling'")
    assert snapshot(gen_dir) == before
