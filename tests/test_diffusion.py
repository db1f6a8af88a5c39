"""The diffusion maths against closed forms, the samplers, the UNet, and guidance."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from classifier import ClassifierConfig, NoisyClassifier, log_prob, make_cond_fn
from diffusion_model import (AttnBlock, DiffusionConfig, GaussianDiffusion, UNet, UNetConfig, Upsample, dropout,
                             timestep_embedding)

T = 1000


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(DiffusionConfig(timesteps=T))


def tiny_unet(size=16):
    torch.manual_seed(0)
    return UNet(UNetConfig(image_size=size, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(8,), dropout=0.0)).eval()


def tiny_classifier(size=16):
    torch.manual_seed(1)
    net = NoisyClassifier(ClassifierConfig(image_size=size, base_channels=16, channel_mult=(1, 2)))
    with torch.no_grad():                          # a non-trivial head so gradients are not ~0
        net.head.weight.normal_(0, 1.0)
    return net.eval()


class TrueNoise(torch.nn.Module):
    """An 'oracle network' that knows x_0: returns the eps implied by x_t = sqrt(abar) x_0 + sqrt(1-abar) eps."""

    def __init__(self, diffusion, x0):
        super().__init__()
        self.d, self.x0 = diffusion, x0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t):
        return self.d.predict_eps(x_t, t, self.x0)


def test_schedule_tables(diffusion):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    assert diffusion.betas.dtype == torch.float64
    assert torch.allclose(diffusion.betas, betas)
    assert torch.allclose(diffusion.alphas_cumprod, torch.cumprod(1 - betas, 0))
    assert diffusion.alphas_cumprod[-1] < 1e-4          # x_{T-1} is almost pure noise


def test_q_sample_mean_and_variance(diffusion):
    # x_t is linear in (x_0, eps): the mean is sqrt(abar) x_0 and the variance (1 - abar), DDPM Eq. 4
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    for t_val in (0, 10, 500, 999):
        t = torch.tensor([t_val])
        abar = diffusion.alphas_cumprod[t_val].item()
        assert torch.allclose(diffusion.q_sample(x0, t, torch.zeros_like(x0)), math.sqrt(abar) * x0, atol=1e-6)
        g = torch.Generator().manual_seed(t_val)
        n = 20000
        noise = torch.randn(n, 3, 4, 4, generator=g)
        xt = diffusion.q_sample(x0.expand(n, -1, -1, -1), t.expand(n), noise)
        assert torch.allclose(xt.mean(0), math.sqrt(abar) * x0[0], atol=0.03)
        assert torch.allclose(xt.var(0), torch.full_like(x0[0], 1 - abar), rtol=0.05, atol=1e-4)


def test_posterior_matches_bayes(diffusion):
    # q(x_{t-1} | x_t, x_0) from Gaussian conjugacy: precision = 1/(1-abar_{t-1}) + alpha_t/beta_t
    x0, xt = torch.randn(2, 3, 4, 4, dtype=torch.float64).unbind(0)
    for t_val in (1, 7, 300, 999):
        t = torch.tensor([t_val])
        b = diffusion.betas[t_val].item()
        a = 1 - b
        abar_prev = diffusion.alphas_cumprod[t_val - 1].item()
        var = 1 / (1 / (1 - abar_prev) + a / b)
        mean = var * (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(a) * xt / b)
        m, v = diffusion.q_posterior_mean_variance(x0[None], xt[None], t)
        assert torch.allclose(m[0], mean, atol=1e-10)
        assert abs(v.item() - var) < 1e-12


def test_p_sample_with_true_x0_is_the_posterior(diffusion):
    # DDPM Alg. 2 with a perfect eps-network draws exactly from q(x_{t-1} | x_t, x_0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8
    model = TrueNoise(diffusion, x0)
    t = torch.tensor([400, 400])
    xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    out = diffusion.p_sample(model, xt, t, t - 1, generator=torch.Generator().manual_seed(5))
    mean, var = diffusion.q_posterior_mean_variance(x0, xt, t)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(out, mean + var.sqrt() * z, atol=1e-5)
    # the last step (t = 0 -> clean image) adds no noise and returns x_0
    t0 = torch.zeros(2, dtype=torch.long)
    x1 = diffusion.q_sample(x0, t0, torch.randn(x0.shape, generator=g))
    assert torch.allclose(diffusion.p_sample(model, x1, t0, t0 - 1), x0, atol=1e-5)


def test_p_sample_over_a_skipped_schedule_is_the_bayes_posterior(diffusion):
    """DDPM-100 and other respaced schedules step t -> s < t - 1. With a perfect eps-network the step must draw
    from q(x_s | x_t, x_0), here derived by Bayes' rule as a product of two Gaussians instead of Eq. 7's form:
    x_t | x_s ~ N(a x_s, v1), a^2 = abar_t / abar_s, v1 = 1 - a^2;  x_s | x_0 ~ N(sqrt(abar_s) x_0, v0 = 1 - abar_s);
    precision 1/var = a^2 / v1 + 1 / v0,  mean = var * (a x_t / v1 + sqrt(abar_s) x_0 / v0)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8
    model = TrueNoise(diffusion, x0)
    for t_val, s_val in ((400, 300), (999, 989), (50, 9)):
        t, s = torch.tensor([t_val, t_val]), torch.tensor([s_val, s_val])
        xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        out = diffusion.p_sample(model, xt, t, s, generator=torch.Generator().manual_seed(7))
        abar_t, abar_s = (diffusion.alphas_cumprod[v].double() for v in (t_val, s_val))
        a2, v0 = abar_t / abar_s, 1 - abar_s
        v1 = 1 - a2
        var = 1 / (a2 / v1 + 1 / v0)
        mean = var * (a2.sqrt() * xt.double() / v1 + abar_s.sqrt() * x0.double() / v0)
        z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)).double()
        assert torch.allclose(out.double(), mean + var.sqrt() * z, atol=1e-5), (t_val, s_val)


def test_ddim_eta0_is_deterministic_and_recovers_x0(diffusion):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 1.8 - 0.9
    eps = torch.randn(x0.shape, generator=g)
    t = torch.full((3,), T - 1)
    xT = diffusion.q_sample(x0, t, eps)
    model = TrueNoise(diffusion, x0)
    for steps in (10, 50, T):
        out1 = diffusion.sample(model, x0.shape, sampler="ddim", steps=steps, eta=0.0, x_t=xT.clone(), progress=False)
        out2 = diffusion.sample(model, x0.shape, sampler="ddim", steps=steps, eta=0.0, x_t=xT.clone(), progress=False,
                                generator=torch.Generator().manual_seed(99))
        assert torch.equal(out1, out2)
        assert torch.allclose(out1, x0, atol=1e-4)


def test_ddim_inversion_round_trip(diffusion):
    # with a perfect eps-network, DDIM inversion to t0 and DDIM (eta = 0) back returns the input exactly
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 1.8 - 0.9
    model = TrueNoise(diffusion, x0)
    for t0, steps in ((499, 50), (999, 20)):
        x_t = diffusion.ddim_invert(model, x0, t0, steps)
        assert not torch.allclose(x_t, x0, atol=0.05)                  # x_t0 is scaled by sqrt(abar_t0) < 1
        back = diffusion.sample(model, x0.shape, sampler="ddim", steps=steps, x_t=x_t, t_start=t0, progress=False)
        assert torch.allclose(back, x0, atol=1e-4)


def abar64(diffusion, t_val: int) -> torch.Tensor:
    """alphas_cumprod[t] in float64, with alphas_cumprod[-1] := 1 (the clean image)."""
    return torch.tensor(1.0, dtype=torch.float64) if t_val < 0 else diffusion.alphas_cumprod[t_val].double()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_is_eq12(diffusion, eta):
    """One DDIM step against DDIM Eq. 12 with Eq. 16's sigma, written out in float64: with a network that
    knows x_0, x_prev = sqrt(abar_s) x_0 + sqrt(1 - abar_s - sigma^2) eps + sigma z, z the generator's draw."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8
    eps = torch.randn(x0.shape, generator=g)
    model = TrueNoise(diffusion, x0)
    for t_val, s_val in ((999, 979), (500, 100), (30, 0), (9, -1)):
        t, s = torch.full((2,), t_val), torch.full((2,), s_val)
        xt = diffusion.q_sample(x0, t, eps)
        out = diffusion.ddim_sample(model, xt, t, s, eta=eta, generator=torch.Generator().manual_seed(8))
        a_t, a_s = abar64(diffusion, t_val), abar64(diffusion, s_val)
        sigma = eta * ((1 - a_s) / (1 - a_t)).sqrt() * (1 - a_t / a_s).sqrt()
        z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8)).double()
        expected = a_s.sqrt() * x0.double() + (1 - a_s - sigma ** 2).sqrt() * eps.double() + sigma * z
        assert torch.allclose(out.double(), expected, atol=2e-5), (t_val, s_val)


def test_ddim_eta1_over_consecutive_steps_is_the_ddpm_step(diffusion):
    # DDIM Eq. 16 with eta = 1 and t_prev = t - 1 gives sigma^2 = beta_tilde_t (DDPM Eq. 7), so one DDIM step is
    # one ancestral step drawing the same noise, for any network (here an untrained UNet, x_0 clipped)
    model = tiny_unet()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    for t_val in (1, 100, 999):
        t, tp = torch.full((2,), t_val), torch.full((2,), t_val - 1)
        ddim = diffusion.ddim_sample(model, x, t, tp, eta=1.0, generator=torch.Generator().manual_seed(6))
        ddpm = diffusion.p_sample(model, x, t, tp, generator=torch.Generator().manual_seed(6))
        assert torch.allclose(ddim, ddpm, atol=1e-5), t_val
        sigma2 = (1 - abar64(diffusion, t_val - 1)) / (1 - abar64(diffusion, t_val)) * (
            1 - abar64(diffusion, t_val) / abar64(diffusion, t_val - 1))
        assert torch.allclose(sigma2, diffusion.posterior_variance[t_val].double(), rtol=1e-9)


def test_ddim_inversion_step_is_eq12_forwards(diffusion):
    """Each inversion step t -> t' is x_t' = sqrt(abar_t') x0_hat(x_t, t) + sqrt(1 - abar_t') eps_theta(x_t, t), with
    an untrained UNet (so nothing cancels): two steps 0 -> 499 -> 999 written out against ddim_invert."""
    model = tiny_unet()
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    assert diffusion.timestep_sequence(3, 999) == [999, 500, 0]
    x = x0.double()
    for t_val, t_next in ((0, 500), (500, 999)):
        with torch.no_grad():
            e = model(x.float(), torch.full((2,), t_val)).double()
        a_t, a_n = abar64(diffusion, t_val), abar64(diffusion, t_next)
        x0_hat = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()                                        # DDPM Eq. 15
        x = a_n.sqrt() * x0_hat + (1 - a_n).sqrt() * e
    assert torch.allclose(diffusion.ddim_invert(model, x0, 999, 3).double(), x, atol=1e-4)


def test_guidance_shifts_eps_by_eq14(diffusion):
    """Dhariwal & Nichol 2021, Sec. 4.2: eps_hat = eps_theta(x_t, t) - sqrt(1 - abar_t) * s * grad, with cond_fn
    (which returns s * grad) called on x_t and the current step t, never t_prev, by both samplers."""
    model = tiny_unet()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    shift = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    seen = []

    def cond_fn(x_t, t):
        seen.append((x_t, t.clone()))
        return shift
    for t_val in (10, 600):
        t = torch.full((2,), t_val)
        eps, _ = diffusion.guided_eps_x0(model, x, t, clip=False)
        eps_g, x0_g = diffusion.guided_eps_x0(model, x, t, cond_fn, clip=False)
        assert torch.allclose(eps_g.double(), eps.double() - (1 - abar64(diffusion, t_val)).sqrt() * shift.double(),
                              atol=1e-6)
        assert torch.allclose(x0_g, diffusion.predict_x0(x, t, eps_g), atol=1e-6)
        assert seen[-1][0] is x and torch.equal(seen[-1][1], t)
    seen.clear()
    for sampler in ("ddpm", "ddim"):
        diffusion.sample(model, x.shape, sampler=sampler, steps=4, x_t=x, cond_fn=cond_fn, progress=False)
    assert [int(t[0]) for _, t in seen] == 2 * diffusion.timestep_sequence(4)


def test_timestep_sequence(diffusion):
    assert diffusion.timestep_sequence() == list(range(T - 1, -1, -1))
    seq = diffusion.timestep_sequence(50)
    assert len(seq) == 50 and seq[0] == T - 1 and seq[-1] == 0 and seq == sorted(seq, reverse=True)
    part = diffusion.timestep_sequence(50, 499)                  # counterfactual from t0 = 499
    assert part[0] == 499 and part[-1] == 0 and len(part) == 25
    assert diffusion.timestep_sequence(50, -1) == []             # strength 0: nothing to do
    # one step starts where it is asked to, x_{t_start} -> x0_hat, never at 0 (which would return the noise)
    assert diffusion.timestep_sequence(1) == [T - 1]
    assert diffusion.timestep_sequence(100, 9) == [9] and diffusion.timestep_sequence(20, 49) == [49]
    assert diffusion.timestep_sequence(20, 50) == [50, 0]


def test_one_step_sampling_denoises(diffusion):
    # a single DDIM step from x_{T-1} (or from a low t_start) is x0_hat: with a network that knows x_0, x_0 itself
    g = torch.Generator().manual_seed(12)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8
    model, seen = TrueNoise(diffusion, x0), []
    model.register_forward_hook(lambda m, inputs, out: seen.append(int(inputs[1][0])))
    for t_start, steps in ((T - 1, 1), (9, 100), (49, 20)):
        xt = diffusion.q_sample(x0, torch.full((2,), t_start), torch.randn(x0.shape, generator=g))
        seen.clear()
        out = diffusion.sample(model, x0.shape, steps=steps, x_t=xt, t_start=t_start, progress=False)
        assert seen == [t_start] and torch.allclose(out, x0, atol=1e-4), (t_start, seen)
    # and one inversion step goes 0 -> t_start (x_0 taken as x at t = 0), not nowhere
    e = model(x0, torch.zeros(2, dtype=torch.long))
    expected = abar64(diffusion, 49).sqrt() * x0.double() + (1 - abar64(diffusion, 49)).sqrt() * e.double()
    assert torch.allclose(diffusion.ddim_invert(model, x0, 49, 20).double(), expected, atol=1e-5)


def test_sample_from_start_step_returns_input_at_zero_steps(diffusion):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = diffusion.sample(tiny_unet(), x.shape, x_t=x.clone(), t_start=-1, progress=False)
    assert torch.equal(out, x)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_known_region_is_kept_and_the_rest_generated(diffusion, sampler):
    """RePaint replacement: where mask = 0 the result is x0_known exactly; mask = 1 everywhere is plain sampling."""
    net, x0 = tiny_unet(), torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:10, 6:12] = 1
    x_t = diffusion.q_sample(x0, torch.full((2,), 499), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    kw = dict(sampler=sampler, steps=20, t_start=499, progress=False)
    out = diffusion.sample(net, x0.shape, x_t=x_t.clone(), known=(mask, x0), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(out * (1 - mask), x0 * (1 - mask))
    assert (out - x0)[:, :, 4:10, 6:12].abs().mean() > 0.05              # the masked region was generated anew
    everywhere = diffusion.sample(net, x0.shape, x_t=x_t.clone(), known=(torch.ones_like(mask), x0),
                                  generator=torch.Generator().manual_seed(1), **kw)
    if sampler == "ddim":                                                 # deterministic: no known-region noise drawn
        plain = diffusion.sample(net, x0.shape, x_t=x_t.clone(), generator=torch.Generator().manual_seed(1), **kw)
        assert torch.allclose(everywhere, plain, atol=1e-6)
    assert not torch.equal(everywhere * (1 - mask), x0 * (1 - mask))


def test_training_loss_is_eps_mse(diffusion):
    model = tiny_unet()
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    noise = torch.randn_like(x0)
    loss = diffusion.training_loss(model, x0, t, noise)
    manual = ((model(diffusion.q_sample(x0, t, noise), t) - noise) ** 2).mean()
    assert torch.allclose(loss, manual)
    # a fresh UNet outputs zeros (zero-initialised last conv), so the loss is E[eps^2] = 1
    assert abs(loss.item() - (noise ** 2).mean().item()) < 1e-6
    # the network sees x_t = q_sample(x_0, t, eps) and t itself (DDPM Alg. 1, line 5); t defaults to U{0..T-1}
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x_t, t_):
            seen.append((x_t, t_))
            return torch.zeros_like(x_t)
    diffusion.training_loss(Probe(), x0, t, noise)
    abar = diffusion.alphas_cumprod[t].double()[:, None, None, None]
    assert torch.allclose(seen[0][0].double(), abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double(),
                          atol=1e-6) and torch.equal(seen[0][1], t)
    torch.manual_seed(0)
    for _ in range(50):
        diffusion.training_loss(Probe(), x0)
    drawn = torch.cat([t_ for _, t_ in seen[1:]])
    assert 0 <= drawn.min() and drawn.max() <= T - 1 and drawn.float().std() > T / 4


def test_unet_shapes_and_config_check():
    net = tiny_unet()
    x = torch.randn(3, 3, 16, 16)
    assert net(x, torch.tensor([0, 5, 999])).shape == x.shape
    assert UNetConfig(image_size=18, channel_mult=(1, 2, 2)).check() is not None       # 18 % 4 != 0
    assert UNetConfig(image_size=4, channel_mult=(1, 2, 2)).check() is not None        # too small
    assert UNetConfig(image_size=64).check() is None
    with pytest.raises(ValueError):
        UNet(UNetConfig(image_size=30))


def assert_paths_agree(module, paths, x, expected, grad_atol=1e-12):
    """Each path of ``module`` maps x to ``expected``, and all paths give the same gradients for x and for
    every parameter (a fixed non-uniform upstream gradient)."""
    grads = []
    for forward in paths:
        xi = x.clone().requires_grad_()
        y = forward(xi)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
        module.zero_grad()
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=grad_atol)


def test_attention_paths_agree_with_the_formula():
    """The CPU's channel-major matmul path and the SDPA path (CUDA's) are both softmax(Q K^T / sqrt(d)) V of
    the 1x1-conv projections, values and gradients alike (float64, so only the order of sums differs)."""
    torch.manual_seed(0)
    blk = AttnBlock(32, num_heads=4, groups=8).double()
    with torch.no_grad():                                   # proj starts at zero: give it weights to test
        blk.proj.weight.normal_(0, 0.2)
        blk.proj.bias.normal_(0, 0.2)
    x = torch.randn(2, 32, 4, 6, dtype=torch.float64)
    # the formula, token-major: (B, HW, C) -> per head (B, heads, HW, d)
    tokens = blk.norm(x).flatten(2).transpose(1, 2)
    q, k, v = (tokens @ w.flatten(1).T + b for w, b in zip(blk.qkv.weight.chunk(3), blk.qkv.bias.chunk(3)))
    q, k, v = (m.view(2, 24, 4, 8).transpose(1, 2) for m in (q, k, v))
    o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v                 # (B, heads, HW, d)
    o = o.transpose(1, 2).reshape(2, 24, 32) @ blk.proj.weight.flatten(1).T + blk.proj.bias
    expected = x + o.transpose(1, 2).reshape(2, 32, 4, 6)
    assert_paths_agree(blk, (blk.forward_matmul, blk.forward_sdpa), x, expected)
    assert blk(x).equal(blk.forward_matmul(x))                # the CPU takes the matmul path


def test_upsample_paths_agree_with_upsample_then_conv():
    """The transposed conv with the folded 4x4 kernel is nearest x2 upsampling followed by the 3x3 conv: values
    and all gradients (float64), on odd and non-square sides; the CPU takes it from TRANSPOSED_MIN_SIDE on."""
    torch.manual_seed(0)
    up = Upsample(6).double()
    for H, W in ((3, 5), (4, 4)):
        x = torch.randn(2, 6, H, W, dtype=torch.float64)
        expected = torch.nn.functional.conv2d(torch.repeat_interleave(torch.repeat_interleave(x, 2, 2), 2, 3),
                                              up.conv.weight, up.conv.bias, padding=1)   # (2, 6, 2H, 2W)
        assert_paths_agree(up, (up.forward_direct, up.forward_transposed), x, expected, grad_atol=1e-11)
    side = Upsample.TRANSPOSED_MIN_SIDE
    big, small = torch.randn(1, 6, side, side, dtype=torch.float64), torch.randn(1, 6, side // 2, side // 2, dtype=torch.float64)
    assert up(big).equal(up.forward_transposed(big)) and up(small).equal(up.forward_direct(small))


def test_unet_with_transposed_upsampling_trains_under_bf16(monkeypatch, diffusion):
    """A 64x64 UNet (its 32 -> 64 upsampling runs transposed on the CPU) computes what the direct path does
    (float64), and a bf16-autocast training step through it gives finite gradients everywhere."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=64, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(), groups=4)).double().eval()
    for m in net.modules():                                       # non-zero last convs: the upsampling shows
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0, 0.1)
    xt, t = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.tensor([3, 700])
    transposed = net(xt, t)
    monkeypatch.setattr(Upsample, "TRANSPOSED_MIN_SIDE", 10 ** 6)
    torch.testing.assert_close(transposed, net(xt, t), rtol=0, atol=1e-10)
    monkeypatch.undo()
    net.float().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion.training_loss(net, torch.rand(2, 3, 64, 64) * 2 - 1)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.up[2].conv.weight.grad.abs().sum() > 0                 # the transposed conv's weight learns


def test_cpu_unet_compiles_as_one_graph():
    """torch.compile sees the whole CPU UNet, transposed upsampling, matmul attention and dropout included,
    as one graph in training and in evaluation: no graph breaks (Dynamo cannot trace the eager mask's random_)."""
    net = UNet(UNetConfig(image_size=64, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(32,), dropout=0.1, groups=4))
    xt, t = torch.randn(2, 3, 64, 64), torch.tensor([1, 500])
    for mode in (net.train, net.eval):
        mode()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            explained = torch._dynamo.explain(net)(xt, t)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_dropout_is_inverted_dropout():
    x = torch.full((200_000,), 2.0)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0, training=True) is x
    p_eff = round(0.3 * 2 ** 15) / 2 ** 15                                 # the CPU mask's 15-bit resolution
    assert abs(p_eff - 0.3) <= 2 ** -16
    torch.manual_seed(0)
    y = dropout(x, 0.3, training=True)
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / (1 - p_eff)), rtol=1e-7, atol=0)
    sigma = math.sqrt(p_eff * (1 - p_eff) / x.numel())
    assert abs(1 - kept.double().mean().item() - p_eff) < 4 * sigma                          # drop rate, 4 sigma
    assert abs(y.double().mean().item() - 2.0) < 4 * 2.0 * sigma / (1 - p_eff)              # unbiased, 4 sigma
    torch.manual_seed(0)
    assert dropout(x, 0.3, training=True).equal(y)                        # reproducible from the seed
    torch.manual_seed(0)                                                   # bf16 input: the same elements drop
    assert dropout(x.bfloat16(), 0.3, training=True).float().equal(y.bfloat16().float())
    torch.manual_seed(0)
    odd = dropout(torch.ones(3, 5, 7), 0.5, training=True)                 # numel not a multiple of 4
    assert odd.shape == (3, 5, 7) and set(odd.unique().tolist()) == {0.0, 2.0}
    assert torch.isfinite(dropout(x, 0.99999, training=True)).all()       # p_eff capped below 1
    assert dropout(x, 1.0, training=True).eq(0).all()                     # p = 1 drops everything
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            dropout(x, p, training=True)
    net = UNet(UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(), dropout=0.5, groups=4))
    for m in net.modules():                                                # non-zero last convs: dropout shows
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0, 0.3)
    xt, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    assert not net.train()(xt, t).equal(net(xt, t))
    assert net.eval()(xt, t).equal(net(xt, t))


def test_timestep_embedding_distinguishes_steps():
    e = timestep_embedding(torch.tensor([0, 1, 500]), 32)
    assert e.shape == (3, 32)
    assert torch.allclose(e[0, :16], torch.ones(16))           # cos(0) = 1
    assert (e[1] - e[2]).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------- guidance


def test_cond_fn_is_the_gradient_of_log_p(diffusion):
    """Finite differences of log p(y | x_t, t) match cond_fn / s along random directions."""
    clf = tiny_classifier().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([100, 700])
    s = 2.5
    for y in (0, 1):
        grad = make_cond_fn(clf, y, s)(x, t).double() / s
        for seed in range(3):
            v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            h = 1e-4
            with torch.no_grad():
                lp = lambda z: log_prob(clf(z, t), torch.full((2,), y)).sum()
                fd = (lp(x + h * v) - lp(x - h * v)) / (2 * h)
            assert abs(fd.item() - (grad * v).sum().item()) < 1e-5 * max(1.0, abs(fd.item()))


def test_guidance_raises_log_p(diffusion):
    clf = tiny_classifier()
    x = torch.randn(4, 3, 16, 16)
    t = torch.full((4,), 300)
    for y in (0, 1):
        lp = lambda z: log_prob(clf(z, t), torch.full((4,), y))
        step = make_cond_fn(clf, y, 1.0)(x, t)
        with torch.no_grad():
            assert (lp(x + 1e-2 * step) > lp(x)).all()
    # through the sampler: a guided DDIM step ends with higher log p(y | x) than the unguided one
    model = tiny_unet()
    xt = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t, tp = torch.full((4,), 300), torch.full((4,), 250)
    unguided = diffusion.ddim_sample(model, xt, t, tp)
    guided = diffusion.ddim_sample(model, xt, t, tp, cond_fn=make_cond_fn(clf, 1, 50.0))
    lp1 = lambda z: log_prob(clf(z, tp), torch.ones(4))
    with torch.no_grad():
        assert (lp1(guided) > lp1(unguided)).all()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_scale_zero_equals_unguided(diffusion, sampler):
    model, clf = tiny_unet(), tiny_classifier()
    kw = dict(sampler=sampler, steps=20, eta=0.5, progress=False)
    a = diffusion.sample(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(7), **kw)
    b = diffusion.sample(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(7),
                         cond_fn=make_cond_fn(clf, 1, 0.0), **kw)
    c = diffusion.sample(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(7),
                         cond_fn=make_cond_fn(clf, 1, 5.0), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_per_sample_guidance_scales():
    clf = tiny_classifier()
    x, t = torch.randn(3, 3, 16, 16), torch.full((3,), 10)
    g1 = make_cond_fn(clf, 1, 1.0)(x, t)
    g = make_cond_fn(clf, torch.tensor([1, 1, 0]), torch.tensor([0.0, 1.0, 2.0]))(x, t)
    assert torch.equal(g[0], torch.zeros_like(g[0]))
    assert torch.allclose(g[1], g1[1])
    assert torch.allclose(g[2], 2 * make_cond_fn(clf, 0, 1.0)(x, t)[2], atol=1e-6)


def test_keep_guidance_is_the_gradient_of_the_product_of_experts():
    """With a guide over 4 attributes steering column 2, cond_fn with keep is
    s * grad [log p(a_2 = y) + w * sum_{j != 2} log p(a_j = keep_j)], checked by finite differences;
    without keep it steers column 2 alone."""
    torch.manual_seed(2)
    clf = NoisyClassifier(ClassifierConfig(image_size=16, base_channels=16, channel_mult=(1, 2), num_outputs=4,
                                           target_index=2)).double().eval()
    with torch.no_grad():
        clf.head.weight.normal_(0, 1.0)
    x, t = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([50, 400])
    keep = torch.tensor([[1, 0, 0, 1], [0, 0, 1, 1]])
    assert clf(x, t).shape == (2,) and clf(x, t, all_outputs=True).shape == (2, 4)
    assert torch.equal(clf(x, t), clf(x, t, all_outputs=True)[:, 2])
    s, w, y = 1.5, 0.3, 1

    def lp(z):
        logits = clf(z, t, all_outputs=True)
        return (log_prob(logits[:, 2], torch.ones(2)) + w * log_prob(logits[:, [0, 1, 3]], keep[:, [0, 1, 3]]).sum(1)).sum()

    grad = make_cond_fn(clf, y, s, keep=keep, keep_weight=w)(x, t).double() / s
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fd = (lp(x + 1e-4 * v) - lp(x - 1e-4 * v)) / 2e-4
    assert abs(fd.item() - (grad * v).sum().item()) < 1e-5 * max(1.0, abs(fd.item()))
    # keep_weight 0 and keep=None are both plain guidance on the steered column
    plain = make_cond_fn(clf, y, s)(x, t)
    assert torch.allclose(make_cond_fn(clf, y, s, keep=keep, keep_weight=0.0)(x, t), plain, atol=1e-10)
    assert not torch.allclose(make_cond_fn(clf, y, s, keep=keep, keep_weight=w)(x, t), plain)


class HostInputs(TorchDispatchMode):
    """Records every op that reads a host (CPU) tensor. With the models on another device, each such op is a
    host-to-device copy: on CUDA it makes the host wait for the GPU, which the sampling and training loops
    must never do per step."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in tree_flatten((args, kwargs))[0]):
            self.ops.append(str(func))
        return func(*args, **kwargs)


def test_hot_loop_makes_no_host_to_device_copies():
    """A training step, and guided DDPM and DDIM steps (with held attributes), run on the "meta" device read
    nothing from the host once warm: the schedule tables and the guidance constants are moved once."""
    dev = torch.device("meta")
    net = tiny_unet().to(dev)
    clf = NoisyClassifier(ClassifierConfig(image_size=16, base_channels=16, channel_mult=(1, 2), num_outputs=3)).to(dev)
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=100))
    x = torch.randn(4, 3, 16, 16, device=dev)
    t = torch.full((4,), 50, device=dev)
    cond_fn = make_cond_fn(clf, 1, 3.0, keep=torch.ones(4, 3), keep_weight=0.1)

    def steps():
        diffusion.training_loss(net, x).backward()
        diffusion.p_sample(net, x, t, t - 1, cond_fn)
        diffusion.ddim_sample(net, x, t, t - 1, 0.5, cond_fn)

    steps()                                                  # warm-up: the one-time copies happen here
    with HostInputs() as record:
        steps()
    assert record.ops == []
    diffusion.table = lambda name, device: getattr(diffusion, name).to(device)    # a copy per call is caught
    with HostInputs() as record:
        steps()
    assert "aten._to_copy.default" in record.ops


def test_q_jump_composes_to_q_sample(diffusion):
    """q(x_t | x_s) after q(x_s | x_0) is q(x_t | x_0): mean sqrt(abar_t) x_0, variance 1 - abar_t (DDPM Eq. 4);
    from s = -1 it is q_sample itself."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    s, t = torch.full((200_000,), 300), torch.full((200_000,), 700)
    x_s = diffusion.q_sample(x0, s, torch.randn(x0.shape, generator=g))
    x_t = diffusion.q_jump(x_s, s, t, torch.randn(x0.shape, generator=g))
    abar_t = diffusion.alphas_cumprod[700].item()
    assert abs(x_t.mean().item() - math.sqrt(abar_t) * 0.7) < 0.01
    assert abs(x_t.var().item() - (1 - abar_t)) < 0.01
    e = torch.randn(x0.shape, generator=g)
    assert torch.allclose(diffusion.q_jump(x0, torch.full((200_000,), -1), t, e), diffusion.q_sample(x0, t, e), atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_repaint_resampling_keeps_the_known_region(diffusion, sampler):
    """With resample = 3 every step is taken three times; the known region still comes back exactly, and the
    masked region differs from a run without resampling from the same start."""
    net, x0 = tiny_unet(), torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:10, 6:12] = 1
    x_t = diffusion.q_sample(x0, torch.full((2,), 499), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    kw = dict(sampler=sampler, steps=20, t_start=499, progress=False, known=(mask, x0), eta=1.0)
    once = diffusion.sample(net, x0.shape, x_t=x_t.clone(), generator=torch.Generator().manual_seed(1), **kw)
    thrice = diffusion.sample(net, x0.shape, x_t=x_t.clone(), resample=3, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(thrice * (1 - mask), x0 * (1 - mask))
    assert (thrice - once)[:, :, 4:10, 6:12].abs().mean() > 1e-3
