"""train.py and generate.py end to end through subprocess on 16x16 images, their checkpoints, and every bad input."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
import train
from dataset import attribute_index, load_split, to_float
from fakes import SEED_OUTPUTS, TINY, assert_ok, assert_user_error, run, run_here, snapshot
from generate import EDIT_DEFAULTS, SAMPLE_DEFAULTS, load_models

TILE = 16 * 4 + 2                      # a 16 px image enlarged to 64 px in a grid, plus 2 px padding


def tile(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    """The (16,16,3) image at (row, col) of a grid PNG, back at its own size."""
    return grid[2 + row * TILE:2 + row * TILE + 64:4, 2 + col * TILE:2 + col * TILE + 64:4]


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script, flags", [("train.py", ["--precision", "--num_workers", "--resume"]),
                                           ("generate.py", ["--no_localize", "--preserve", "--guidance_scale"])])
def test_help(script, flags, tmp_path, capsys, monkeypatch):
    proc = run_here(script, "--help", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage:") and all(f in proc.stdout for f in flags)


# ---------------------------------------------------------------------------------------------- train.py


def test_optimizer_step_clips_the_gradient_norm_to_one():
    lin = torch.nn.Linear(4, 3)
    opt = train.make_optimizer(lin.parameters(), 1e-3, 0.0, torch.device("cpu"))
    train.optimizer_step(lin, opt, torch.amp.GradScaler("cpu", enabled=False), 100 * lin(torch.ones(2, 4)).sum())
    norm = torch.cat([p.grad.flatten() for p in lin.parameters()]).norm()       # the gradient the step used
    assert norm == pytest.approx(train.GRAD_CLIP, rel=1e-5)                     # from about 775


def test_train_writes_every_output_and_logs_each_stage(toy_run):
    out, proc = toy_run
    for f in SEED_OUTPUTS + ("oracle_best.pth", "diffusion_epoch_1.pth", "diffusion_epoch_2.pth", "last.pth",
                             "train_log.jsonl", "samples/diffusion_epoch_1.png", "samples/diffusion_epoch_2.png"):
        assert (out / f).is_file(), f
    log = read_log(out)
    assert [r["stage"] for r in log if "epoch" in r] == ["classifier", "classifier", "oracle", "diffusion", "diffusion"]
    assert all(r["images_per_s"] > 0 and math.isfinite(r["loss"]) for r in log if "epoch" in r)
    for r in (r for r in log if r["stage"] == "classifier" and "epoch" in r):
        assert set(r["valid_acc"]) == {"0", "25", "50", "75"}         # t = 0, T/4, T/2, 3T/4 of T = 100
        assert r["valid_noisy_mean"] == pytest.approx(sum(r["valid_acc"].values()) / 4, abs=1e-4)
    final = [r for r in log if r.get("final")]
    assert [r["stage"] for r in final] == ["classifier", "oracle"]
    assert set(final[0]["test_acc"]) == {"0", "25", "50", "75"} and len(final[0]["test_acc"]["50"]) == 5
    assert "classifier test accuracy" in proc.stdout and "diffusion_final.pth" in proc.stdout
    d = torch.load(out / "diffusion_final.pth", weights_only=True)
    assert d["args"]["num_workers"] == min(8, os.cpu_count() or 1)     # the default: decode on up to 8 processes
    # the EMA moved away from the zero-initialised output layer and lags the trained weights
    assert d["ema"]["conv_out.weight"].abs().sum() > 0
    assert not torch.equal(d["ema"]["conv_out.weight"], d["model"]["conv_out.weight"])


def test_checkpoints_hold_what_generate_needs_and_no_optimizer(toy_run):
    out, _ = toy_run
    meta = {"format", "format_version", "kind", "config", "model", "dataset", "attribute", "attribute_index",
            "attr_names", "image_size", "args", "epoch"}
    files = {"diffusion_epoch_1.pth": ("diffusion", {"ema", "diffusion", "step"}),
             "diffusion_epoch_2.pth": ("diffusion", {"ema", "diffusion", "step"}),
             "diffusion_final.pth": ("diffusion", {"ema", "diffusion", "step"}),
             "classifier_best.pth": ("classifier", {"diffusion", "valid_acc", "test_acc"}),
             "oracle_best.pth": ("oracle", {"test_acc"})}
    ckpts = {}
    for name, (kind, extra) in files.items():
        c = ckpts[name] = torch.load(out / name, weights_only=True)       # plain tensors and builtins only
        assert c["kind"] == kind and c["format_version"] == 3, name
        assert set(c) == meta | extra, (name, set(c) ^ (meta | extra))   # no optimizer, nothing unexpected
        assert c["dataset"] == "toyfaces" and c["attribute"] == "Smiling" and c["image_size"] == 16
        assert c["args"]["output_dir"] == str(out)
    d = ckpts["diffusion_final.pth"]
    assert d["epoch"] == 2 and d["step"] == 8 and ckpts["diffusion_epoch_1.pth"]["step"] == 4
    assert d["diffusion"]["timesteps"] == 100 and ckpts["classifier_best.pth"]["diffusion"] == d["diffusion"]
    assert set(d["ema"]) == set(d["model"]) and tuple(d["config"]["channel_mult"]) == (1, 2)
    assert not torch.equal(ckpts["diffusion_epoch_1.pth"]["model"]["conv_out.weight"], d["model"]["conv_out.weight"])
    assert ckpts["oracle_best.pth"]["config"]["width"] == 8                     # classifier_channels // 2
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["kind"] == "train_state" and last["stage"] == "diffusion" and last["step"] == 8
    assert "state" in last["optimizer"] and len(last["optimizer"]["state"]) > 0 and "scaler" in last
    assert set(last["modules"]) == {"model", "ema"}
    # generate.py rebuilds all three networks from the files alone (the diffusion model from its EMA weights)
    for diffusion_file in ("diffusion_final.pth", "diffusion_epoch_1.pth"):
        m = load_models(str(out / diffusion_file), str(out / "classifier_best.pth"), str(out / "oracle_best.pth"),
                        torch.device("cpu"))
        for net, state in ((m.net, ckpts[diffusion_file]["ema"]), (m.guide, ckpts["classifier_best.pth"]["model"]),
                           (m.oracle, ckpts["oracle_best.pth"]["model"])):
            assert net.state_dict().keys() == state.keys()
            assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
        assert m.diffusion.num_timesteps == 100 and m.attribute == "Smiling" and m.target_index == 0
        x = torch.zeros(2, 3, 16, 16)
        assert m.net(x, torch.zeros(2, dtype=torch.long)).shape == (2, 3, 16, 16)
        assert m.guide(x, torch.zeros(2, dtype=torch.long)).shape == (2, 5) and m.oracle(x).shape == (2, 5)


def test_guide_file_is_the_epoch_best_on_noisy_validation_images(toy_run, tmp_path, capsys, monkeypatch):
    """classifier_best.pth is the epoch with the highest valid_noisy_mean: the steered attribute's accuracy
    averaged over t = 0, T/4, T/2, 3T/4. Scripted accuracies make that epoch differ from the best on clean
    images, from the last epoch and from the best on every attribute."""
    out, _ = toy_run                                   # the real run: the file's epoch is its log's best
    log = [r for r in read_log(out) if r["stage"] == "classifier" and "epoch" in r]
    best = max(log, key=lambda r: r["valid_noisy_mean"])                     # max keeps the first of equals
    assert torch.load(out / "classifier_best.pth", weights_only=True)["epoch"] == best["epoch"]

    k = attribute_index("toyfaces", "Eyeglasses")                             # 1: not the first output
    steered = [(0.9, 0.5, 0.5, 0.5), (0.6, 0.8, 0.8, 0.8), (0.95, 0.6, 0.6, 0.6)]   # noisy means .6, .75, .6875
    others = [1.0, 0.5, 0.2]                                                  # every other attribute, every t
    real, calls = train.guide_accuracy, []

    def scripted(run_, net, diffusion, split):
        if split.split != "valid":
            return real(run_, net, diffusion, split)
        epoch, acc = len(calls), {}
        calls.append(epoch)
        for i, t in enumerate(train.eval_timesteps(diffusion.num_timesteps)):
            acc[t] = torch.full((5,), others[epoch])
            acc[t][k] = steered[epoch][i]
        return acc

    monkeypatch.setattr(train, "guide_accuracy", scripted)
    proc = run_here("train.py", "--dataset", "toyfaces", "--attribute", "Eyeglasses", *TINY, "--classifier_epochs", 3,
                    "--oracle_epochs", 0, "--diffusion_epochs", 0, "--max_steps_per_epoch", 1, "--num_workers", 0,
                    "--subset_fraction", 0.005, "--output_dir", tmp_path, cwd=tmp_path, capsys=capsys,
                    monkeypatch=monkeypatch)
    assert_ok(proc)
    log = [r for r in read_log(tmp_path) if "epoch" in r]
    assert [r["valid_noisy_mean"] for r in log] == [0.6, 0.75, 0.6875]
    assert [r.get("saved") for r in log] == ["classifier_best.pth", "classifier_best.pth", None]
    c = torch.load(tmp_path / "classifier_best.pth", weights_only=True)
    assert c["epoch"] == 2 and list(c["valid_acc"].values()) == list(steered[1])
    assert c["attribute"] == "Eyeglasses" and c["attribute_index"] == k
    assert c["config"]["num_outputs"] == 5 and c["config"]["target_index"] == k   # every attribute, one steered
    assert c["model"]["head.weight"].shape[0] == 5 and set(c["test_acc"][0]) == set(c["attr_names"])


def test_ema_update_is_the_warmed_up_lerp():
    """ema <- d ema + (1 - d) theta with d = min(decay, (1 + step) / (10 + step)); buffers are copied."""
    torch.manual_seed(0)
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.normal_()
        model.running_mean.normal_()
    for step, decay in ((0, 0.9999), (10 ** 6, 0.9999), (10 ** 6, 0.9)):
        before = ema.weight.detach().clone()
        train.update_ema(ema, model, decay, step)
        d = min(decay, (1 + step) / (10 + step))                       # 0.1 at step 0
        assert torch.allclose(ema.weight, d * before + (1 - d) * model.weight, atol=1e-7), step
        assert torch.equal(ema.running_mean, model.running_mean)


def test_train_on_fake_celeba(celeba_run):
    data, out, proc = celeba_run
    assert "celeba train: 36 images in split, using 36 (100%)" in proc.stdout
    d = torch.load(out / "diffusion_final.pth", weights_only=True)
    assert d["dataset"] == "celeba" and len(d["attr_names"]) == 40
    c = torch.load(out / "classifier_best.pth", weights_only=True)
    assert c["config"]["num_outputs"] == 40 and c["config"]["target_index"] == attribute_index("celeba", "Smiling")
    assert len(torch.load(out / "oracle_best.pth", weights_only=True)["test_acc"]) == 40


# ---------------------------------------------------------------------------------------------- generate.py


def copy_run(out, work):
    work.mkdir(exist_ok=True)
    for f in SEED_OUTPUTS + ("oracle_best.pth",):
        shutil.copy(out / f, work / f)
    return work


def test_generate_samples_with_the_mode_defaults(toy_run, tmp_path):
    """No scale, sampler or steps given: SAMPLE_DEFAULTS, with the checkpoints found by their default names."""
    work = copy_run(toy_run[0], tmp_path / "gen")
    proc = run("generate.py", "--num_samples", 4, "--device", "cpu", cwd=work)
    assert_ok(proc)
    scales, steps = SAMPLE_DEFAULTS["guidance_scale"], min(SAMPLE_DEFAULTS["steps"], 100)
    report = json.loads((work / "generated_samples.json").read_text())
    assert report["mode"] == "sampling" and report["target_label"] == 1 and report["scales"] == scales
    assert report["sampler"] == SAMPLE_DEFAULTS["sampler"] and report["steps"] == steps
    assert report["unet_calls_per_image"] == steps                        # one UNet call per step
    assert report["guide_grads_per_image"] == steps * sum(s > 0 for s in scales) / len(scales)
    assert report["oracle"].endswith("oracle_best.pth") and len(report["samples"]) == 4 * len(scales)
    pngs = sorted(os.listdir(work / "generated_samples"))
    assert pngs == sorted(r["file"] for r in report["samples"]) and len(pngs) == 4 * len(scales)
    for key, s in report["summary"].items():
        assert 0 <= s["oracle_target_rate"] <= 1 and 0 <= s["guide_target_rate"] <= 1, key
    grid = np.asarray(Image.open(work / "generated_samples.png"))
    if len(scales) == 1:                                                 # 4 samples: 2 x 2
        assert grid.shape == (2 * TILE + 2, 2 * TILE + 2, 3)
        assert np.array_equal(tile(grid, 1, 0), np.asarray(Image.open(work / "generated_samples" / pngs[2])))
    assert "not an independent judge" in proc.stdout and "oracle (independent)" in proc.stdout


def test_generate_toward_0_reports_p_of_absent(toy_run, tmp_path):
    """Toward 0 each sample's p_target is 1 - p(present), by the oracle on the written image, and the rate counts
    p_target > 0.5."""
    work = copy_run(toy_run[0], tmp_path / "gen")
    assert_ok(run("generate.py", "--target_label", 0, "--num_samples", 4, "--steps", 5, "--device", "cpu", cwd=work))
    report = json.loads((work / "generated_samples.json").read_text())
    m = load_models(str(work / "diffusion_final.pth"), None, str(work / "oracle_best.pth"), torch.device("cpu"))
    for r in report["samples"]:
        x = to_float(torch.from_numpy(np.array(Image.open(work / "generated_samples" / r["file"]))).permute(2, 0, 1))
        p_present = torch.sigmoid(m.oracle(x[None]))[0, m.target_index].item()
        assert r["oracle_p_target"] == pytest.approx(1 - p_present, abs=0.02)          # the PNG is rounded to uint8
    (summary,) = report["summary"].values()
    assert summary["oracle_target_rate"] == np.mean([r["oracle_p_target"] > 0.5 for r in report["samples"]])


def test_generate_no_guidance_needs_no_classifier_and_a_rerun_removes_only_its_stale_files(toy_run, tmp_path):
    out, _ = toy_run
    shutil.copy(out / "diffusion_final.pth", tmp_path / "diffusion_final.pth")
    proc = run("generate.py", "--no_guidance", "--num_samples", 4, "--device", "cpu", "--steps", 5, cwd=tmp_path)
    assert_ok(proc)
    report = json.loads((tmp_path / "generated_samples.json").read_text())
    assert list(report["summary"]) == ["unguided"] and report["guide"] is None and report["oracle"] is None
    assert report["unet_calls_per_image"] == 5 and report["guide_grads_per_image"] == 0
    assert len(os.listdir(tmp_path / "generated_samples")) == 4
    # a second, smaller run with the same --output removes the first's extra images, and nothing else
    (tmp_path / "generated_samples" / "notes.txt").write_text("the user's own file")
    (tmp_path / "generated_samples" / "sample_0099.png").write_bytes(b"the user's, not listed in the .json")
    (tmp_path / "keep.txt").write_text("outside the sample folder")
    report["samples"] += [{"file": "../keep.txt"}, {"file": str(tmp_path / "keep.txt")}]   # a .json edited by hand
    (tmp_path / "generated_samples.json").write_text(json.dumps(report))
    proc = run("generate.py", "--no_guidance", "--num_samples", 2, "--device", "cpu", "--steps", 5, cwd=tmp_path)
    assert_ok(proc)
    assert "removed 2 per-sample image(s) that an earlier run wrote" in proc.stdout
    assert sorted(os.listdir(tmp_path / "generated_samples")) == ["notes.txt", "sample_0000.png", "sample_0001.png",
                                                                  "sample_0099.png"]
    assert sorted(os.listdir(tmp_path)) == ["diffusion_final.pth", "generated_samples", "generated_samples.json",
                                            "generated_samples.png", "keep.txt"]            # only names, in the folder
    # the same stem in another format would take over that run's folder and .json: refused, nothing touched
    before = snapshot(tmp_path)
    proc = run("generate.py", "--no_guidance", "--device", "cpu", "--output", "generated_samples.jpg", cwd=tmp_path)
    assert_user_error(proc, "take over the sample folder and .json of an earlier run's 'generated_samples.png'")
    assert snapshot(tmp_path) == before
    (tmp_path / "face.png").write_bytes((tmp_path / "generated_samples" / "sample_0000.png").read_bytes())
    proc = run("generate.py", "--classifier_model", out / "classifier_best.pth", "--device", "cpu", "--steps", 5,
               "--input", "face.png", "--output", "face.jpg", cwd=tmp_path)   # an input of the same stem is no output
    assert_ok(proc)
    assert os.listdir(tmp_path / "face") == ["0000_face.png"]


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
    assert set(report["summary"]) == {"unguided", "scale_5"} and report["sampler"] == "ddpm"
    assert report["unet_calls_per_image"] == 8 and report["guide_grads_per_image"] == 4    # scale 0 takes none
    # guidance reaches the sampler from the command line: scale 5's samples are not scale 0's, from the same noise
    for i in range(3):
        s0, s5 = (np.asarray(Image.open(tmp_path / "a" / f"s{s}_sample_{i:04d}.png")).astype(int) for s in (0, 5))
        assert np.abs(s5 - s0).mean() > 0, i


def test_counterfactuals_with_the_mode_defaults(toy_run, tmp_path):
    """Only the paths and --from_dataset: EDIT_DEFAULTS's ladder, one counterfactual per input, each taking the
    first scale at which the guide calls it flipped; panels original | counterfactual | difference."""
    out, _ = toy_run
    n = 3
    proc = run("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
               out / "classifier_best.pth", "--from_dataset", n, "--device", "cpu", "--output", tmp_path / "cf.png")
    assert_ok(proc)
    report = json.loads((tmp_path / "cf.json").read_text())
    scales, steps = EDIT_DEFAULTS["guidance_scale"], min(EDIT_DEFAULTS["steps"], 100)
    assert report["mode"] == "counterfactual" and report["scales"] == scales and report["steps"] == steps
    assert report["sampler"] == EDIT_DEFAULTS["sampler"] and report["oracle"].endswith("oracle_best.pth")
    s = report["summary"]["counterfactuals"]
    assert s["n"] == n and sum(s["scale_used"].values()) == n and 0 <= s["mask_area"] <= 1
    assert {"flip_rate_oracle", "flip_rate_guide", "mnac", "l1_mean"} <= set(s)
    records = report["samples"]
    assert [r["file"] for r in records] == [f"{i:04d}_{r['name']}.png" for i, r in enumerate(records)]
    assert sorted(os.listdir(tmp_path / "cf")) == [r["file"] for r in records]
    tried = []                                          # how many rungs of the ladder each image went up
    for r in records:
        assert r["scale"] in scales
        if r["scale"] != scales[-1]:                   # it stopped early: the guide called it flipped
            assert r["guide_p_target"] >= 0.5, r
        tried.append(scales.index(r["scale"]) + 1)
    # per rung: a guided run and its localised repaint (and, for DDPM, an unguided run) of the images left; with
    # DDIM the inversion and one unguided run of every image
    calls = math.ceil(steps * (round(EDIT_DEFAULTS["strength"] * 100)) / 100)
    once = {"ddpm": 0, "ddim": 2 * n}.get(report["sampler"], n)
    unguided = sum(tried) if report["sampler"] == "ddpm" else 0
    assert report["unet_calls_per_image"] == pytest.approx(calls * (2 * sum(tried) + unguided + once) / n)
    assert report["guide_grads_per_image"] == pytest.approx(calls * 2 * sum(tried) / n)
    # the grid: one row per input, 3 columns; the first is the input itself, the second the file written
    grid = np.asarray(Image.open(tmp_path / "cf.png"))
    assert grid.shape == (n * TILE + 2, 3 * TILE + 2, 3)
    a = report["args"]
    test = load_split("toyfaces", "test", 16, subset_fraction=0.02, seed=0, verbose=False)
    for i, r in enumerate(records):
        original = test.images[test.names.index(r["name"])].permute(1, 2, 0).numpy()
        assert test.attrs[test.names.index(r["name"]), 0] == 0 and a["target_label"] == 1   # not yet smiling
        assert np.array_equal(tile(grid, i, 0), original)
        assert np.array_equal(tile(grid, i, 1), np.asarray(Image.open(tmp_path / "cf" / r["file"])))
        heat = tile(grid, i, 2).astype(int)                       # black -> red -> yellow -> white: R >= G >= B
        assert (heat[..., 0] >= heat[..., 1]).all() and (heat[..., 1] >= heat[..., 2]).all()
    assert "flip rate (oracle, independent)" in proc.stdout and "MNAC" in proc.stdout


def test_counterfactuals_of_an_input_folder(toy_run, tmp_path):
    """--input takes a folder's images (not its other files), in name order, and writes {i:04d}_{name}.png."""
    out, _ = toy_run
    faces = tmp_path / "faces"
    faces.mkdir()
    test = load_split("toyfaces", "test", 16, subset_fraction=0.02, seed=0, verbose=False)
    for i, name in enumerate(("b_face", "a_face", "c_face")):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(faces / f"{name}.png")
    (faces / "notes.txt").write_text("not an image")
    proc = run("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
               out / "classifier_best.pth", "--input", faces, "--steps", 10, "--device", "cpu",
               "--output", tmp_path / "cf.png")
    assert_ok(proc)
    report = json.loads((tmp_path / "cf.json").read_text())
    assert [r["name"] for r in report["samples"]] == ["a_face", "b_face", "c_face"]
    assert sorted(os.listdir(tmp_path / "cf")) == ["0000_a_face.png", "0001_b_face.png", "0002_c_face.png"]
    grid = np.asarray(Image.open(tmp_path / "cf.png"))
    for i, name in enumerate(("a_face", "b_face", "c_face")):
        assert np.array_equal(tile(grid, i, 0), np.asarray(Image.open(faces / f"{name}.png")))   # read back exactly
        cf = Image.open(tmp_path / "cf" / f"{i:04d}_{name}.png")
        assert cf.size == (16, 16) and np.array_equal(tile(grid, i, 1), np.asarray(cf))
    assert sorted(os.listdir(faces)) == ["a_face.png", "b_face.png", "c_face.png", "notes.txt"]   # inputs untouched


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, fragments", [
    (["--dataset", "celeba", "--data_root", "{tmp}/nowhere"], ["CelebA not found", "Kaggle"]),
    (["--attribute", "Smilin"], ["unknown attribute", "Smiling"]),
    (["--image_size", "20", "--channel_mult", "1,2,2,2"], ["multiple of 8"]),
    (["--image_size", "4", "--channel_mult", "1,2"], ["--image_size 4 is too small"]),
    (["--batch_size", "0"], ["--batch_size must be > 0"]),
    (["--diffusion_epochs", "-1"], ["--diffusion_epochs must be >= 0"]),
    (["--num_workers", "-1"], ["--num_workers must be >= 0"]),
    (["--max_steps_per_epoch", "0"], ["--max_steps_per_epoch must be > 0"]),
    (["--timesteps", "0"], ["--timesteps must be > 0"]),
    (["--subset_fraction", "1.5"], ["--subset_fraction"]),
    (["--ema_decay", "1"], ["--ema_decay must be in [0, 1)"]),
    (["--dropout", "1"], ["dropout must be in [0, 1)", "--dropout"]),
    (["--output_dir", "{tmp}/afile/sub"], ["cannot write", "afile"]),
    (["--channel_mult", "1,x"], ["--channel_mult"]),
    (["--dataset", "mnist"], ["--dataset"]),
    (["--download"], ["--download is for CelebA", "drop --download"]),
    (["--data_root", "{tmp}/celeba"], ["--data_root is for CelebA", "drop --data_root"]),
    (["--precision", "fp8"], ["--precision", "invalid choice"]),
    (["--channel_mult", ""], ["channel_mult needs one or more width multipliers"]),
    (["--channel_mult", "1,0"], ["each >= 1"]),
    (["--device", "foo"], ["--device 'foo' is not a device name"]),
    (["--device", "meta"], ["cpu, cuda, cuda:N or mps"]),
    (["--lr", "nan"], ["--lr must be > 0, got nan"]),
    (["--lr", "inf"], ["--lr must be > 0, got inf"]),
    (["--attn_resolutions", "-8"], ["attn_resolutions -8 is not a feature-map side", "16, 8", "--attn_resolutions"]),
    (["--attn_resolutions", "8,12"], ["attn_resolutions 12"]),
    (["--seed", "4294967296"], ["--seed must be an integer in [0, 4294862566]"]),
    (["--seed", "-1"], ["--seed must be an integer in [0, 4294862566]"]),
    (["--resume", "auto"], ["--resume auto: no last.pth", "without --resume"]),
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
    copy_run(out, tmp_path)
    (tmp_path / "generated_samples.png").write_bytes(b"earlier output")
    (tmp_path / "junk.pth").write_bytes(bytes(range(256)) * 2)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pth")
    ckpt = torch.load(out / "classifier_best.pth", weights_only=True)
    ckpt["image_size"], ckpt["config"]["image_size"] = 32, 32
    torch.save(ckpt, tmp_path / "classifier_32.pth")
    ckpt = torch.load(out / "classifier_best.pth", weights_only=True)
    ckpt["diffusion"]["timesteps"] = 1000
    torch.save(ckpt, tmp_path / "classifier_T1000.pth")
    truncated = (out / "diffusion_final.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(truncated[:len(truncated) // 2])
    (tmp_path / "afile").write_text("x")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    (tmp_path / "faces").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "faces" / "a.png")
    (tmp_path / "empty").mkdir()
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
    (["--sampler", "euler"], ["--sampler", "invalid choice"]),
    (["--precision", "fp8"], ["--precision", "invalid choice"]),
    (["--guidance_scale", "-1"], ["--guidance_scale must be >= 0"]),
    (["--guidance_scale", "3", "nan"], ["--guidance_scale must be >= 0, got nan"]),
    (["--guidance_scale", "inf"], ["--guidance_scale must be >= 0, got inf"]),
    (["--guidance_scale", "3", "--no_guidance"], ["--guidance_scale", "--no_guidance turns off", "drop it"]),
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
    (["--classifier_model", "classifier_T1000.pth"], ["1000-step schedule", "uses 100"]),
    (["--oracle_model", "classifier_best.pth"], ["expected a oracle"]),
    (["--oracle_model", "missing.pth"], ["--oracle_model", "missing.pth", "not found"]),
    (["--output", "afile/out.png"], ["cannot write", "afile"]),
    (["--output", "grid.gif"], ["--output"]),
    (["--strength", "1.5", "--input", "garbage.png"], ["--strength must be in [0, 1]"]),
    (["--strength", "-0.1", "--from_dataset", "4"], ["--strength must be in [0, 1]"]),
    (["--strength", "nan", "--from_dataset", "4"], ["--strength must be in [0, 1]"]),
    (["--from_dataset", "0"], ["--from_dataset must be > 0"]),
    (["--preserve", "-1", "--from_dataset", "4"], ["--preserve must be >= 0"]),
    (["--input", "garbage.png"], ["garbage.png"]),
    (["--input", "empty"], ["--input folder 'empty' holds no images"]),
    (["--input", "faces", "--from_dataset", "4"], ["--input and --from_dataset both given"]),
    (["--no_invert", "--from_dataset", "4", "--sampler", "ddpm"], ["--no_invert turns off the DDIM inversion", "drop it"]),
    (["--no_invert"], ["--no_invert turns off the DDIM inversion", "drop it"]),
    (["--no_localize"], ["--no_localize works on --input/--from_dataset", "drop it"]),
    (["--preserve", "0.5"], ["--preserve works on --input/--from_dataset", "drop it"]),
    (["--mask_threshold", "0.1"], ["--mask_threshold shapes the localisation mask", "drop it"]),
    (["--mask_threshold", "0.1", "--from_dataset", "4", "--no_localize"], ["--mask_threshold shapes the localisation"]),
    (["--mask_threshold", "1.5", "--from_dataset", "4"], ["--mask_threshold must be in [0, 1)"]),
    (["--no_guidance", "--from_dataset", "4"], ["--no_guidance with --input/--from_dataset", "drop --no_guidance"]),
    (["--input", "nothere.png"], ["nothere.png", "does not exist"]),
    (["--input", "garbage.png", "--output", "garbage.png"], ["would write over or into", "garbage.png"]),
    (["--input", "faces", "--output", "faces/cf.png"], ["would write over or into", "'faces'"]),
    (["--input", "faces", "--output", "faces.png"], ["would write over or into", "'faces'"]),   # its sample folder
    (["--classifier_model", "celeba_classifier.pth"], ["trained on celeba", "toyfaces", "same dataset"]),
    (["--device", "foo"], ["--device 'foo' is not a device name"]),
    (["--seed", str(10 ** 15)], ["--seed must be an integer in [0, 4294862566]"]),
    (["--strength", "0.3"], ["--strength works on --input/--from_dataset", "drop it"]),
    (["--guidance_scale", "30", "10", "30"], ["--guidance_scale 30 10 30 repeats a scale"]),
    (["--guidance_scale", "0", "-0"], ["repeats a scale"]),
    (["--from_dataset", "4", "--precision", "bf16"], ["--precision sets the autocast dtype", "fp32", "--no_invert"]),
    (["--from_dataset", "4", "--data_root", "nowhere"], ["--data_root is where CelebA is read", "toyfaces"]),
    (["--num_samples", "4", "--from_dataset", "4"], ["--num_samples sets the number of samples from noise"]),
    (["--from_dataset", "4", "--diffusion_model", "celeba_diffusion.pth", "--classifier_model",
      "celeba_classifier.pth", "--oracle_model", "celeba_oracle.pth", "--data_root", "nowhere"], ["CelebA not found"]),
])
def test_generate_bad_input(gen_dir, extra, fragments, capsys, monkeypatch):
    before = snapshot(gen_dir)
    proc = run_here("generate.py", "--device", "cpu", "--steps", 5, *extra, cwd=gen_dir, capsys=capsys,
                    monkeypatch=monkeypatch)
    assert_user_error(proc, *fragments)
    assert snapshot(gen_dir) == before


def test_bad_input_through_the_real_command_line(gen_dir):
    """The same contract through a real interpreter: exit 2, one line, no traceback, nothing touched."""
    before = snapshot(gen_dir)
    assert_user_error(run("generate.py", "--device", "cpu", "--diffusion_model", "junk.pth", cwd=gen_dir), "corrupt")
    assert_user_error(run("train.py", "--dataset", "toyfaces", "--attribute", "Smilling", "--output_dir", gen_dir),
                      "did you mean 'Smiling'")
    assert snapshot(gen_dir) == before


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, True, torch.bfloat16), (False, True, None),
                                                        (False, False, None)])
def test_auto_precision_on_a_cpu_is_bf16_only_with_amx(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    assert common.amp_dtype(cpu, "auto") is expected
    assert common.amp_dtype(cpu, "bf16") is torch.bfloat16 and common.amp_dtype(cpu, "fp32") is None
