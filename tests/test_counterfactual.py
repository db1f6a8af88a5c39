"""Counterfactuals (generate.py): the scale ladder, localisation, DDIM inversion, the SDEdit start, the edit mask,
call counting, the metrics, the guide's attribute choosing --from_dataset's inputs, and the oracle's checkpoint."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from classifier import ClassifierConfig, NoisyClassifier
from common import amp_dtype, autocast, load_checkpoint
from dataset import attribute_names, load_split, to_float
from diffusion_model import DiffusionConfig, GaussianDiffusion
from fakes import assert_ok, run_here
from generate import (count_calls, counterfactual_metrics, edit_mask, encode, generate_images, guide_probabilities,
                      load_models, make_counterfactuals)
from test_diffusion import GaussianDataEps
from train import accuracy

CPU = torch.device("cpu")
T = 1000


class AutocastProbe(GaussianDataEps):
    """GaussianDataEps that records, per call, whether it ran under CPU autocast."""

    def __init__(self):
        super().__init__()
        self.autocast = []

    def forward(self, x_t, t):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return super().forward(x_t, t)


class HalfMeans(torch.nn.Module):
    """A stub guide over two attributes: logit 0 (steered) = w * mean of the image's left half, logit 1 = w * mean of
    its right half, at any t. Linear, so its gradient moves only the half that a logit reads. (B,3,S,S) -> (B,2)"""

    def __init__(self, w=20.0):
        super().__init__()
        self.w, self.cfg = w, SimpleNamespace(target_index=0, num_outputs=2)

    def forward(self, x, t):
        S = x.shape[-1]
        return self.w * torch.stack([x[..., :S // 2].mean((1, 2, 3)), x[..., S // 2:].mean((1, 2, 3))], 1)


def stub_models(net=None, guide=None):
    """What make_counterfactuals needs of load_models' namespace, with the call counters main() reads."""
    m = SimpleNamespace(net=net or GaussianDataEps(mu=0.0, s=1.0), guide=guide or HalfMeans(), device=CPU,
                        diffusion=GaussianDiffusion(DiffusionConfig(timesteps=T)))
    m.unet_calls, m.guide_grads = count_calls(m.net), count_calls(m.guide, with_grad=True)
    m.guide_all = count_calls(m.guide)                      # every image through the guide, gradient or not
    return m


def half_images(lefts, right=0.3):
    """(N,3,8,8) images: left half at the given values, right half at ``right``."""
    x = torch.full((len(lefts), 3, 8, 8), right)
    x[..., :4] = torch.tensor(lefts)[:, None, None, None]
    return x


STEPS, STRENGTH = 10, 0.5          # t0 = 499, so each run takes ceil(10 * 500 / 1000) = 5 network calls
CALLS = 5


def cf(m, x, scales, **kw):
    """make_counterfactuals toward 1, by default inverted DDIM (deterministic per image), localised, no preserve."""
    kw = dict(strength=STRENGTH, steps=STEPS, sampler="ddim", invert=True, localize=True, preserve=0.0, seed=0) | kw
    return make_counterfactuals(m, x, 1, scales, **kw)


def test_the_ladder_keeps_the_first_scale_that_flips():
    """HalfMeans on images whose left halves are -0.1, -0.2, -0.5, -0.6 (target 1: left mean > 0): at scale 1 the
    first two flip, at 2 the rest. The ladder [1, 2, 4] gives the first two exactly their scale-1 result, the others
    exactly what scale 2 alone gives them, and stops before 4. Network calls: the inversion, then per rung a guided
    run and its localised repaint of the images left, the unguided run once (deterministic sampler); the guide's
    gradient counter sees only the guided runs, not the verdicts after each rung."""
    x = half_images([-0.1, -0.2, -0.5, -0.6])
    m = stub_models()
    single, _, _ = cf(m, x, [1.0])
    flipped = guide_probabilities(m, single)[:, 0] > 0.5
    assert flipped.tolist() == [True, True, False, False]
    rest, _, _ = cf(m, x[2:], [2.0])
    assert (guide_probabilities(m, rest)[:, 0] > 0.5).all()
    m = stub_models()
    out, masks, used = cf(m, x, [1.0, 2.0, 4.0])
    assert used.tolist() == [1.0, 1.0, 2.0, 2.0]
    assert torch.equal(out[:2], single[:2]) and torch.equal(out[2:], rest)
    tried = 4 + 2                                          # images per rung: all four, then the two left
    assert m.unet_calls["images"] == CALLS * (4 + 4 + 2 * tried)      # inversion, unguided once, guided + repaint
    assert m.guide_grads["images"] == CALLS * 2 * tried
    assert m.guide_all["images"] == CALLS * 2 * tried + tried         # + the no-grad verdict after each rung
    shuffled, _, used = cf(stub_models(), x, [4.0, 1.0, 2.0])          # a ladder is climbed from its smallest scale
    assert used.tolist() == [1.0, 1.0, 2.0, 2.0] and torch.equal(shuffled, out)


def test_the_unguided_run_is_repeated_only_for_ddpm():
    """DDPM's unguided run for the mask is redrawn per rung (same subset, same noise as the guided run); a
    deterministic sampler's is computed once; DDIM alone inverts. Counted through the UNet's counter."""
    x = half_images([-0.1, -0.2, -0.5, -0.6])
    for sampler in ("ddpm", "ddim", "dpmpp2m"):
        m = stub_models()
        _, _, used = cf(m, x, [0.25, 2.0, 8.0], sampler=sampler)
        tried = sum([0.25, 2.0, 8.0].index(s) + 1 for s in used.tolist())
        assert tried > 4, sampler                           # some image went up the ladder
        unguided, inversion = tried if sampler == "ddpm" else 4, 4 if sampler == "ddim" else 0
        assert m.unet_calls["images"] == CALLS * (inversion + unguided + 2 * tried), sampler


def test_localised_counterfactuals_keep_the_input_outside_the_mask():
    """HalfMeans' steered logit reads only the left half, so the guided and unguided runs differ there alone: the
    mask covers the left half (blurred and dilated), and outside it the output is the input, pixel for pixel."""
    x = half_images([-0.1, -0.5])
    x[..., 4:] += torch.linspace(-0.2, 0.2, 8)[:, None]            # texture, so a copy is not a coincidence
    out, masks, _ = cf(stub_models(), x, [8.0], invert=False, sampler="ddpm")
    assert masks.shape == (2, 1, 8, 8) and set(masks.unique().tolist()) == {0.0, 1.0}
    assert masks[..., :4].eq(1).all() and masks[..., 6:].eq(0).all()
    outside = masks.expand_as(x) == 0
    assert torch.equal(out[outside], x[outside])
    assert (out - x)[..., :4].abs().mean() > 0.05                  # inside, it changed
    free, ones, _ = cf(stub_models(), x, [8.0], invert=False, sampler="ddpm", localize=False)
    assert ones.eq(1).all() and (free - x)[..., 6:].abs().mean() > 0.05      # without localisation all may change


def test_preserve_guides_the_held_attributes_only():
    """--preserve adds the held term for attribute 1, which HalfMeans reads from the right half: the right half
    changes, the left (steered) half is bit for bit the run without it."""
    x = half_images([-0.1, -0.5])
    plain, _, _ = cf(stub_models(), x, [2.0], localize=False)
    held, _, _ = cf(stub_models(), x, [2.0], localize=False, preserve=2.0)
    assert torch.equal(held[..., :4], plain[..., :4])
    assert (held - plain)[..., 4:].abs().max() > 1e-3


def test_strength_zero_returns_the_inputs():
    """t0 = -1: the inputs themselves, empty masks, no scale used (0), and no network call."""
    x = half_images([-0.1, -0.5])
    m = stub_models()
    out, masks, used = make_counterfactuals(m, x, 1, [3.0, 6.0], strength=0.0)
    assert torch.equal(out, x) and masks.eq(0).all() and used.tolist() == [0.0, 0.0]
    assert m.unet_calls["images"] == 0 and m.guide_all["images"] == 0


def test_inverted_counterfactuals_round_trip_in_fp32_without_clipping():
    """With --invert an unguided edit gives the input back. GaussianDataEps' x0_hat leaves [-1, 1] on the way, so
    generate.py must turn clipping off (sampling the same latent with clipping misses by far more), and it runs the
    network without the autocast it is handed (which it does use without --invert)."""
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m = stub_models(net=AutocastProbe(), guide=NoisyClassifier(ClassifierConfig(
        image_size=8, base_channels=16, channel_mult=(1, 2), num_outputs=3, target_index=0)).eval())
    bf16 = autocast(CPU, torch.bfloat16)
    out, _, _ = make_counterfactuals(m, x, 1, [0.0], strength=0.5, steps=T, sampler="ddim", invert=True,
                                     localize=False, preserve=0.0, amp=bf16)
    err = (out - x).abs().max().item()
    assert err < 0.03, err                                                     # measured 0.009
    assert len(m.net.autocast) == 499 + 500 and not any(m.net.autocast)       # inversion 0 -> 499, sampling back
    x_t0 = encode(m, x, 499, invert=True, steps=T)
    clipped = generate_images(m, 1, 0.0, x_t0=x_t0, t_start=499, sampler="ddim", steps=T, clip=True, amp=bf16)
    assert (clipped - x).abs().max() > 0.25                                    # measured 0.30
    assert m.net.autocast[-1]                                                  # amp reaches the network otherwise


def test_encode_is_q_sample_at_t_start():
    """SDEdit's start: x_t0 = sqrt(abar_t0) x_0 + sqrt(1 - abar_t0) eps (DDPM Eq. 4), eps ~ N(0, I) fresh for each
    batch but fixed by --seed; t0 = -1 (strength 0) is the input itself."""
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))
    m = SimpleNamespace(diffusion=d, device=CPU)
    x0 = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_t = encode(m, x0, 49, seed=3, batch_size=4)
    abar = d.alphas_cumprod[49]
    eps = (x_t.double() - abar.sqrt() * x0.double()) / (1 - abar).sqrt()
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05       # 6144 draws: 4 sigma
    assert not torch.allclose(eps[:4], eps[4:], atol=0.1)                            # each batch its own noise
    assert torch.equal(encode(m, x0, 49, seed=3, batch_size=4), x_t)
    assert not torch.equal(encode(m, x0, 49, seed=4, batch_size=4), x_t)
    assert torch.equal(encode(m, x0, -1), x0)
    # not the noise the sampler then draws for the same batch (generate_images seeds batch i with seed * 100003 + i):
    # reused, a DDPM step would add the same eps twice
    first_draw = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3 * 100003))
    assert (eps[:4].float() - first_draw).abs().mean() > 0.5


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
    # at the border the window averages only the pixels inside the image: a corner change counts 1/4 there, not 1/9
    x_g = x_u.clone()
    x_g[0, :, 0, 0] = 2.0
    assert edit_mask(x_g, x_u, threshold=0.2, dilation=0)[0, 0, 0, 0] == 1


def test_count_calls_counts_images_and_only_gradient_calls():
    net = torch.nn.Conv2d(3, 3, 1)
    every, grads = count_calls(net), count_calls(net, with_grad=True)
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        net(x)
    net(x[:2])
    assert every == {"images": 5} and grads == {"images": 2}


class Table(torch.nn.Module):
    """A stub network returning fixed logits (N, A), whatever the images (a batch of N)."""

    def __init__(self, probs, target_index=0):
        super().__init__()
        self.logits, self.cfg = torch.logit(probs), SimpleNamespace(target_index=target_index)

    def forward(self, x, t=None):
        assert x.shape[0] == self.logits.shape[0]
        return self.logits


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
    guide = torch.tensor([[0.9], [0.9], [0.9], [0.1]])              # the guide calls three of them flipped
    m = SimpleNamespace(guide=Table(guide), oracle=Table(after), target_index=0, attr_names=names, device=CPU)
    r = counterfactual_metrics(m, x, x_cf, 1, before, after)
    assert r["n"] == 4
    assert r["flip_rate_oracle"] == pytest.approx(0.75)
    assert r["flip_rate_guide"] == pytest.approx(0.75)
    assert r["mnac"] == pytest.approx((0 + 1 + 2 + 0) / 4)
    assert r["changed_per_attribute"] == {"Eyeglasses": pytest.approx(0.5), "Bangs": pytest.approx(0.25)}
    assert r["l1_mean"] == pytest.approx((0.5 + 1.0) / 4)
    assert r["l1_std"] == pytest.approx(np.std([0.5, 1.0, 0, 0]))
    assert counterfactual_metrics(m, x, x_cf, 1, before) == r                       # o_after from the oracle
    # toward 0 the same outputs give the complementary flip rates
    r0 = counterfactual_metrics(m, x, x_cf, 0, before, after)
    assert r0["flip_rate_oracle"] == pytest.approx(0.25) and r0["flip_rate_guide"] == pytest.approx(0.25)
    # without an oracle: only the guide's verdict and L1
    assert set(counterfactual_metrics(SimpleNamespace(guide=Table(guide), oracle=None, device=CPU), x, x_cf, 1)) == \
        {"n", "l1_mean", "l1_std", "flip_rate_guide"}


# ---------------------------------------------------------------------------------------------- trained tiny run


def test_from_dataset_picks_inputs_by_the_steered_attribute(toy_run, tmp_path, capsys, monkeypatch):
    """The diffusion model is unconditional, so a guide steering another attribute may steer it: --from_dataset
    then takes test images whose label of the guide's attribute (not the diffusion run's) is off target."""
    out, _ = toy_run
    guide = torch.load(out / "classifier_best.pth", weights_only=True)
    names = attribute_names("toyfaces")
    k = names.index("Eyeglasses")
    assert guide["attribute"] != "Eyeglasses"
    guide["attribute"], guide["attribute_index"], guide["config"]["target_index"] = "Eyeglasses", k, k
    torch.save(guide, tmp_path / "eyeglasses_guide.pth")
    proc = run_here("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
                    tmp_path / "eyeglasses_guide.pth", "--oracle_model", out / "oracle_best.pth", "--from_dataset", 6,
                    "--target_label", 1, "--strength", 0, "--device", "cpu", "--output", tmp_path / "cf.png",
                    cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_ok(proc)
    report = json.loads((tmp_path / "cf.json").read_text())
    assert report["attribute"] == "Eyeglasses" and len(report["samples"]) == 6
    assert report["summary"]["counterfactuals"]["l1_mean"] == 0                     # strength 0: the inputs
    d_ckpt = load_checkpoint(str(out / "diffusion_final.pth"))
    split = load_split("toyfaces", "test", d_ckpt["image_size"], subset_fraction=d_ckpt["args"]["subset_fraction"],
                       seed=d_ckpt["args"]["seed"], verbose=False)
    label = {os.path.splitext(n)[0]: split.attrs[i] for i, n in enumerate(split.names)}
    chosen = [label[rec["name"]] for rec in report["samples"]]
    assert all(a[k] == 0 for a in chosen)                                   # off target for the guide
    assert any(a[d_ckpt["attribute_index"]] == 1 for a in chosen)           # not picked by the diffusion run's


def test_oracle_checkpoint_round_trip(toy_run):
    """The oracle rebuilt from its file alone (load_models) scores exactly the test accuracy train.py stored in it."""
    out, _ = toy_run
    m = load_models(str(out / "diffusion_final.pth"), None, str(out / "oracle_best.pth"), CPU)
    ckpt = load_checkpoint(str(out / "oracle_best.pth"), "oracle")
    assert not m.oracle.training and m.attr_names == ckpt["attr_names"]
    a = ckpt["args"]
    test = load_split("toyfaces", "test", ckpt["image_size"], subset_fraction=a["subset_fraction"], seed=a["seed"],
                      verbose=False)
    run_like = SimpleNamespace(device=CPU, autocast=autocast(CPU, amp_dtype(CPU, a["precision"])),
                               from_main=lambda x: x)
    acc = accuracy(run_like, test, m.oracle)
    assert m.oracle(to_float(test.images[:2])).shape == (2, 5)
    assert ckpt["test_acc"] == {n: round(v, 4) for n, v in zip(ckpt["attr_names"], acc.tolist())}


def test_inversion_is_the_ddim_samplers_alone():
    """invert=True is the default, but only DDIM runs its step forwards: with DDPM the inputs are noised by q_sample
    and every network call keeps the autocast it is handed (an inverted run would switch it off)."""
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m = stub_models(net=AutocastProbe(), guide=NoisyClassifier(ClassifierConfig(
        image_size=8, base_channels=16, channel_mult=(1, 2), num_outputs=3, target_index=0)).eval())
    make_counterfactuals(m, x, 1, [0.0], strength=0.5, steps=T, sampler="ddpm", localize=False, preserve=0.0,
                         amp=autocast(CPU, torch.bfloat16))
    assert len(m.net.autocast) == 500 and all(m.net.autocast)                  # sampling 499 -> 0, no inversion
