"""Counterfactual mode of generate.py: panels, files, JSON, strength 0, the metrics, the oracle checkpoint."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from classifier import Oracle
from common import autocast, load_checkpoint
from dataset import attribute_names, load_split, to_float
from diffusion_model import DiffusionConfig, GaussianDiffusion
from generate import DEFAULT_PRESERVE, counterfactual_metrics, edit_mask, encode, load_oracle
from fakes import TINY, assert_ok, assert_user_error, run
from train import oracle_accuracy


def test_counterfactuals_from_the_test_split(toy_run, tmp_path):
    out, _ = toy_run
    proc = run("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
               out / "classifier_best.pth", "--from_dataset", 5, "--target_label", 1, "--guidance_scale", 1, 8,
               "--retry_scales", "--strength", 0.4, "--steps", 20, "--device", "cpu", "--output", tmp_path / "cf.png")
    assert_ok(proc)
    report = json.loads((tmp_path / "cf.json").read_text())
    assert report["mode"] == "counterfactual" and report["strength"] == 0.4 and report["oracle"].endswith("oracle_best.pth")
    assert set(report["summary"]) == {"scale_1", "scale_8", "retry"}
    for s in report["summary"].values():
        assert {"flip_rate_oracle", "flip_rate_guide", "mnac", "l1_mean", "l1_std", "changed_per_attribute"} <= set(s)
        assert set(s["changed_per_attribute"]) == {"Eyeglasses", "Bangs", "Mouth_Slightly_Open", "Goatee"}
        assert 0 <= s["flip_rate_oracle"] <= 1 and 0 <= s["mnac"] <= 4 and s["l1_mean"] > 0
    assert sum(report["summary"]["retry"]["scale_used"].values()) == 5
    for rec in report["samples"]:        # the guide, never the oracle, picks the scale: the first one it calls flipped
        flipped = [s for s in (1, 8) if rec[f"s={s}"]["guide_p_target"] > 0.5]
        assert rec["retry"]["scale"] == (flipped[0] if flipped else 8)
    sample = report["samples"][0]
    assert {"guide_p_target_before", "oracle_p_target_before", "s=1", "s=8", "retry"} <= set(sample)
    assert sample["s=8"]["file"] == f"0000_{sample['name']}_s8.png"
    files = sorted(os.listdir(tmp_path / "cf"))
    assert len(files) == 15 and all(f.endswith(".png") for f in files)
    # the panel grid: 5 rows (one per image) x (original + 3 columns x (counterfactual, heat map)) tiles
    grid = Image.open(tmp_path / "cf.png")
    tile = 16 * 4 + 2                                          # 16 px enlarged to 64, 2 px padding
    assert grid.size == (7 * tile + 2, 5 * tile + 2)
    assert "flip rate (oracle, independent)" in proc.stdout and "MNAC" in proc.stdout


def test_strength_zero_returns_the_input(toy_run, tmp_path):
    out, _ = toy_run
    faces = tmp_path / "faces"
    faces.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(faces / f"face{i}.png")
    proc = run("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
               out / "classifier_best.pth", "--input", faces, "--strength", 0, "--device", "cpu",
               "--output", tmp_path / "same.png")
    assert_ok(proc)
    for i in range(3):
        original = np.asarray(Image.open(faces / f"face{i}.png"))
        counterfactual = np.asarray(Image.open(tmp_path / "same" / f"000{i}_face{i}_s3.png"))
        assert np.array_equal(original, counterfactual)
    report = json.loads((tmp_path / "same.json").read_text())
    assert report["summary"]["scale_3"]["l1_mean"] == 0 and report["summary"]["scale_3"]["mnac"] == 0


def test_inverted_counterfactuals_without_guidance_reconstruct(toy_run, tmp_path):
    """Unguided, a DDIM-inverted x_t0 decodes back near its input; the q_sample one (fresh noise) does not:
    at 20 steps the inversion's error is a few 1e-5 of the pixel range, re-noising's near a fifth."""
    out, _ = toy_run
    l1 = {}
    for name, extra in (("inv", ["--invert"]), ("noised", [])):
        proc = run("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
                   out / "classifier_best.pth", "--from_dataset", 3, "--sampler", "ddim", "--steps", 20, *extra,
                   "--guidance_scale", 0, "--strength", 0.5, "--device", "cpu", "--output", tmp_path / f"{name}.png")
        assert_ok(proc)
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["args"]["invert"] is (name == "inv") and len(os.listdir(tmp_path / name)) == 3
        l1[name] = report["summary"]["scale_0"]["l1_mean"]
    assert l1["inv"] < 1e-3 and l1["noised"] > 0.05, l1       # measured: 4.5e-5 and 0.18


def test_localized_counterfactuals_keep_the_input_outside_the_mask(toy_run, tmp_path):
    out, _ = toy_run
    proc = run("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
               out / "classifier_best.pth", "--from_dataset", 4, "--target_label", 0, "--guidance_scale", 100,
               "--localize", "--mask_threshold", 0.002, "--mask_dilation", 0, "--strength", 0.5, "--steps", 20,
               "--resample", 2, "--device", "cpu", "--output", tmp_path / "loc.png")
    assert_ok(proc)
    report = json.loads((tmp_path / "loc.json").read_text())
    s = report["summary"]["scale_100"]
    assert 0 < s["mask_area"] < 1 and "mask" in proc.stdout
    inputs = tmp_path / "inputs"
    proc = run("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
               out / "classifier_best.pth", "--from_dataset", 4, "--target_label", 0, "--strength", 0,
               "--device", "cpu", "--output", inputs.with_suffix(".png"))      # strength 0 writes the inputs
    assert_ok(proc)
    kept = []
    for rec, rec0 in zip(report["samples"], json.loads(inputs.with_suffix(".json").read_text())["samples"]):
        x = np.asarray(Image.open(tmp_path / "loc" / rec["s=100"]["file"])).astype(int)
        x0 = np.asarray(Image.open(inputs / rec0["s=3"]["file"])).astype(int)
        same = (np.abs(x - x0).max(-1) == 0).mean()                      # share of pixels left exactly as they were
        assert same >= 1 - rec["s=100"]["mask_area"] - 1e-4          # mask_area is rounded to 4 digits
        kept.append(same)
    assert min(kept) < 1                                                 # and something did change


def test_from_dataset_picks_inputs_by_the_steered_attribute(toy_run, tmp_path):
    """The diffusion model is unconditional, so a guide for another attribute may steer it: --from_dataset
    then takes test images whose label of the guide's attribute (not the diffusion run's) is off target."""
    out, _ = toy_run
    guide = torch.load(out / "classifier_best.pth", weights_only=True)
    assert guide["attribute"] != "Eyeglasses"
    names = attribute_names("toyfaces")
    guide["attribute"], guide["attribute_index"] = "Eyeglasses", names.index("Eyeglasses")
    torch.save(guide, tmp_path / "eyeglasses_guide.pth")
    proc = run("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
               tmp_path / "eyeglasses_guide.pth", "--oracle_model", out / "oracle_best.pth", "--from_dataset", 6,
               "--target_label", 1, "--strength", 0, "--device", "cpu", "--output", tmp_path / "cf.png")
    assert_ok(proc)
    report = json.loads((tmp_path / "cf.json").read_text())
    assert report["attribute"] == "Eyeglasses" and len(report["samples"]) == 6
    d_ckpt = load_checkpoint(str(out / "diffusion_final.pth"))
    split = load_split("toyfaces", "test", d_ckpt["image_size"], subset_fraction=d_ckpt["args"]["subset_fraction"],
                       seed=d_ckpt["args"]["seed"], verbose=False)
    label = {os.path.splitext(n)[0]: split.attrs[i] for i, n in enumerate(split.names)}
    chosen = [label[rec["name"]] for rec in report["samples"]]
    assert all(a[names.index("Eyeglasses")] == 0 for a in chosen)                 # off target for the guide
    assert any(a[d_ckpt["attribute_index"]] == 1 for a in chosen)    # not picked by the diffusion run's attribute


def test_encode_is_q_sample_at_t_start():
    """SDEdit's start: x_t0 = sqrt(abar_t0) x_0 + sqrt(1 - abar_t0) eps (DDPM Eq. 4), eps ~ N(0, I) fresh for each
    batch but fixed by --seed; t0 = -1 (strength 0) is the input itself."""
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))
    x0 = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_t = encode(None, d, x0, 49, seed=3, batch_size=4)
    abar = d.alphas_cumprod[49].double()
    eps = (x_t.double() - abar.sqrt() * x0.double()) / (1 - abar).sqrt()
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05       # 6144 draws: 4 sigma
    assert not torch.allclose(eps[:4], eps[4:], atol=0.1)                            # each batch its own noise
    assert torch.equal(encode(None, d, x0, 49, seed=3, batch_size=4), x_t)
    assert not torch.equal(encode(None, d, x0, 49, seed=4, batch_size=4), x_t)
    assert torch.equal(encode(None, d, x0, -1), x0)


def test_edit_mask_closed_form():
    x_u = torch.zeros(1, 3, 9, 9)
    x_g = x_u.clone()
    x_g[0, :, 4, 4] = 2.0                     # one pixel changed by 1.0 on the [0, 1] scale
    m = edit_mask(x_g, x_u, threshold=0.1, dilation=0)
    # the 3x3 mean is 1/9 on the pixel's 3x3 neighbourhood (> 0.1) and 0 elsewhere
    assert m.shape == (1, 1, 9, 9) and m[0, 0, 3:6, 3:6].eq(1).all() and m.sum() == 9
    assert edit_mask(x_g, x_u, threshold=0.2, dilation=0).sum() == 0     # 1/9 < 0.2
    assert edit_mask(x_g, x_u, threshold=0.1, dilation=1)[0, 0, 2:7, 2:7].eq(1).all()
    assert edit_mask(x_g, x_u, threshold=0.1, dilation=1).sum() == 25


def test_metrics_on_hand_built_cases():
    x = torch.zeros(4, 3, 2, 2)
    x_cf = x.clone()
    x_cf[0] = 1.0                                     # |diff| = 1 on [-1, 1] -> 0.5 on [0, 1]
    x_cf[1] = -2.0                                    # |diff| = 2 -> 1.0
    names = ["Smiling", "Eyeglasses", "Bangs"]
    before = torch.tensor([[0.1, 0.9, 0.1], [0.2, 0.1, 0.1], [0.3, 0.8, 0.9], [0.4, 0.2, 0.2]])
    after = torch.tensor([[0.9, 0.9, 0.1],            # flipped, nothing else changed
                          [0.8, 0.7, 0.1],            # flipped, Eyeglasses changed
                          [0.2, 0.1, 0.2],            # not flipped, both others changed
                          [0.6, 0.2, 0.2]])           # flipped
    guide = torch.tensor([0.9, 0.9, 0.9, 0.1])
    m = counterfactual_metrics(x, x_cf, before, after, guide, 0, 1, names)
    assert m["flip_rate_oracle"] == pytest.approx(0.75)
    assert m["flip_rate_guide"] == pytest.approx(0.75)
    assert m["mnac"] == pytest.approx((0 + 1 + 2 + 0) / 4)
    assert m["changed_per_attribute"] == {"Eyeglasses": pytest.approx(0.5), "Bangs": pytest.approx(0.25)}
    assert m["l1_mean"] == pytest.approx((0.5 + 1.0) / 4)
    assert m["l1_std"] == pytest.approx(np.std([0.5, 1.0, 0, 0]))
    # toward 0 the same oracle outputs give the complementary flip rate
    assert counterfactual_metrics(x, x_cf, before, after, None, 0, 0, names)["flip_rate_oracle"] == pytest.approx(0.25)


def test_oracle_checkpoint_round_trip(toy_run):
    """The oracle rebuilt from its file alone scores exactly the test accuracy train.py stored in that file."""
    out, _ = toy_run
    net, ckpt = load_oracle(str(out / "oracle_best.pth"), "cpu")
    assert isinstance(net, Oracle) and ckpt["kind"] == "oracle" and not net.training
    a = ckpt["args"]
    test = load_split("toyfaces", "test", ckpt["image_size"], subset_fraction=a["subset_fraction"], seed=a["seed"],
                      verbose=False)
    cpu = torch.device("cpu")
    run_like = SimpleNamespace(device=cpu, autocast=autocast(cpu, a["precision"]), from_main=lambda x: x)
    acc = oracle_accuracy(net, test, run_like)
    assert net(to_float(test.images[:2])).shape == (2, 5)
    assert ckpt["test_acc"] == {n: round(v, 4) for n, v in zip(ckpt["attr_names"], acc.tolist())}


def test_guide_over_all_attributes_holds_the_others(toy_run, tmp_path):
    """train.py --guide_all_attributes gives a 5-output guide; generate.py then holds the other attributes
    (--preserve, default DEFAULT_PRESERVE with such a guide) and says so; a one-attribute guide refuses --preserve."""
    out, _ = toy_run
    guide_dir = tmp_path / "guide"
    assert_ok(run("train.py", "--dataset", "toyfaces", *TINY, "--classifier_epochs", 1, "--oracle_epochs", 0,
                  "--diffusion_epochs", 0, "--max_steps_per_epoch", 3, "--subset_fraction", 0.02,
                  "--guide_all_attributes", "--output_dir", guide_dir))
    ckpt = load_checkpoint(str(guide_dir / "classifier_best.pth"), "classifier")
    assert ckpt["config"]["num_outputs"] == 5 and ckpt["config"]["target_index"] == 0
    log = [json.loads(line) for line in (guide_dir / "train_log.jsonl").read_text().splitlines()]
    assert 0 <= log[0]["valid_mean_acc_all"] <= 1                   # the checkpoint is chosen on every head
    assert set(log[-1]["test_acc_all_t0"]) == {"Smiling", "Eyeglasses", "Bangs", "Mouth_Slightly_Open", "Goatee"}
    args = ["generate.py", "--diffusion_model", out / "diffusion_final.pth", "--oracle_model", out / "oracle_best.pth",
            "--classifier_model", guide_dir / "classifier_best.pth", "--from_dataset", 3, "--strength", 0.3,
            "--steps", 10, "--guidance_scale", 20, "--device", "cpu"]
    default = run(*args, "--output", tmp_path / "default.png")
    assert_ok(default)
    assert f"holding the other attributes (--preserve {DEFAULT_PRESERVE:g})" in default.stdout
    assert json.loads((tmp_path / "default.json").read_text())["preserve"] == DEFAULT_PRESERVE
    off = run(*args, "--preserve", 0, "--output", tmp_path / "off.png")
    assert_ok(off)
    assert json.loads((tmp_path / "off.json").read_text())["preserve"] == 0 and "holding" not in off.stdout
    a = np.asarray(Image.open(tmp_path / "default.png"))
    assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "off.png")))     # the extra guidance acted
    refused = run("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
                  out / "classifier_best.pth", "--from_dataset", 3, "--preserve", 1, "--device", "cpu",
                  "--output", tmp_path / "refused.png")
    assert_user_error(refused, "--guide_all_attributes")
    assert not (tmp_path / "refused.png").exists()
