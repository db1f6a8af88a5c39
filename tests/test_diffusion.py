"""The diffusion maths against closed forms, the samplers (DDPM, DDIM, DPM-Solver++), the UNet, and guidance."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from classifier import ClassifierConfig, NoisyClassifier, log_prob, make_cond_fn
from diffusion_model import (SAMPLERS, AttnBlock, DiffusionConfig, GaussianDiffusion, UNet, UNetConfig,
                             timestep_embedding)

T = 1000
# the linear schedule of DDPM Sec. 4, computed here in float64 independently of the class
ABAR = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, T)), dtype=torch.float64)


def abar64(t_val: int) -> torch.Tensor:
    """alphas_cumprod[t] in float64, with alphas_cumprod[-1] := 1 (the clean image)."""
    return torch.tensor(1.0, dtype=torch.float64) if t_val < 0 else ABAR[t_val]


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(DiffusionConfig(timesteps=T))


def tiny_unet(size=16):
    """A small UNet whose output is not zero (the zero-initialised last conv gets weights), so nothing cancels."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=size, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(8,), dropout=0.0))
    torch.nn.init.normal_(net.conv_out.weight, 0, 0.05)
    return net.eval()


def tiny_classifier(size=16, num_outputs=40, target_index=31, seed=1):
    torch.manual_seed(seed)
    net = NoisyClassifier(ClassifierConfig(image_size=size, base_channels=16, channel_mult=(1, 2),
                                           num_outputs=num_outputs, target_index=target_index))
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


class GaussianDataEps(torch.nn.Module):
    """The exact eps-predictor for data N(mu, s^2 I), E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) /
    (abar s^2 + 1 - abar): smooth, but not the noise that made x_t from inputs in [-1, 1], so DDIM's inversion
    round trip has a real discretisation error; its x0_hat runs from the input toward mu (3: out of [-1, 1]).
    ``cfg.image_size`` as a UNet's."""

    def __init__(self, mu=3.0, s=2.0, image_size=8):
        super().__init__()
        self.mu, self.s, self.cfg = mu, s, SimpleNamespace(image_size=image_size)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t):
        a = ABAR[t].reshape(-1, 1, 1, 1)
        return ((1 - a).sqrt() * (x_t - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)).float()


class EpsSequence(torch.nn.Module):
    """A fake network: its k-th call returns eps[k], whatever x_t; it records the x_t and t it was called with."""

    def __init__(self, eps):
        super().__init__()
        self.eps, self.x_seen, self.t_seen = eps, [], []
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t):
        self.x_seen.append(x_t.clone())
        self.t_seen.append(int(t[0]))
        return self.eps[len(self.t_seen) - 1]


# ---------------------------------------------------------------------------------------------- schedule, posterior


def test_schedule_tables(diffusion):
    assert diffusion.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(diffusion.alphas_cumprod, ABAR, rtol=1e-12, atol=0)
    assert diffusion.alphas_cumprod[-1] < 1e-4          # x_{T-1} is almost pure noise
    t = torch.tensor([-1, 0, 499, 999])
    a = diffusion.alpha_bar(t)                           # t = -1 is the clean image
    assert a.shape == (4, 1, 1, 1) and a.dtype == torch.float64 and a[0].item() == 1.0
    torch.testing.assert_close(a.flatten()[1:], ABAR[[0, 499, 999]], rtol=1e-12, atol=0)
    assert diffusion.alpha_bar(t, ndim=2).shape == (4, 1)


def test_q_sample_mean_and_variance(diffusion):
    # x_t is linear in (x_0, eps): the mean is sqrt(abar) x_0 and the variance (1 - abar), DDPM Eq. 4
    x0 = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for t_val in (0, 10, 500, 999):
        t = torch.tensor([t_val])
        abar = ABAR[t_val].item()
        assert torch.allclose(diffusion.q_sample(x0, t, torch.zeros_like(x0)), math.sqrt(abar) * x0, atol=1e-6)
        g = torch.Generator().manual_seed(t_val)
        n = 20000
        noise = torch.randn(n, 3, 4, 4, generator=g)
        xt = diffusion.q_sample(x0.expand(n, -1, -1, -1), t.expand(n), noise)
        assert torch.allclose(xt.mean(0), math.sqrt(abar) * x0[0], atol=0.03)
        assert torch.allclose(xt.var(0), torch.full_like(x0[0], 1 - abar), rtol=0.05, atol=1e-4)


def bayes_posterior(x0, xt, t_val, s_val):
    """q(x_s | x_t, x_0) by Bayes' rule as a product of two Gaussians (not Eq. 7's form), float64:
    x_t | x_s ~ N(a x_s, v1), a^2 = abar_t / abar_s, v1 = 1 - a^2;  x_s | x_0 ~ N(sqrt(abar_s) x_0, v0 = 1 - abar_s);
    precision 1/var = a^2 / v1 + 1 / v0,  mean = var * (a x_t / v1 + sqrt(abar_s) x_0 / v0)."""
    a2, v0 = ABAR[t_val] / ABAR[s_val], 1 - ABAR[s_val]
    v1 = 1 - a2
    var = 1 / (a2 / v1 + 1 / v0)
    return var * (a2.sqrt() * xt / v1 + ABAR[s_val].sqrt() * x0 / v0), var


def test_q_posterior_is_bayes_rule(diffusion):
    """DDPM Eq. 6-7 for consecutive steps (DDPM-1000) and skipped ones (respaced schedules, t -> s < t - 1);
    into the clean image (t_prev = -1) the posterior is x_0 itself, variance 0."""
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(2, 2, 3, 4, 4, dtype=torch.float64, generator=g).unbind(0)
    for t_val, s_val in ((1, 0), (7, 6), (300, 299), (999, 998), (400, 300), (999, 949), (50, 9)):
        mean, var = bayes_posterior(x0, xt, t_val, s_val)
        m, v = diffusion.q_posterior(x0, xt, torch.full((2,), t_val), torch.full((2,), s_val))
        torch.testing.assert_close(m, mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(v, var.expand(2, 1, 1, 1), rtol=1e-9, atol=0)
    for t_val in (0, 500):
        m, v = diffusion.q_posterior(x0, xt, torch.full((2,), t_val), torch.full((2,), -1))
        torch.testing.assert_close(m, x0, rtol=0, atol=1e-12)
        assert v.abs().max() < 1e-15


def test_p_sample_draws_from_q_posterior(diffusion):
    """DDPM Alg. 2's step given x0_hat is one draw from q(x_{t_prev} | x_t, x0_hat): mean + sqrt(var) z, z the
    generator's draw; into the clean image it adds no noise and returns x0_hat."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8
    for t_val, s_val in ((400, 399), (400, 300), (999, 989), (50, 9)):
        t, s = torch.full((2,), t_val), torch.full((2,), s_val)
        xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        out = diffusion.p_sample(xt, t, s, x0, generator=torch.Generator().manual_seed(7))
        mean, var = bayes_posterior(x0.double(), xt.double(), t_val, s_val)
        z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)).double()
        assert torch.allclose(out.double(), mean + var.sqrt() * z, atol=1e-5), (t_val, s_val)
    t0 = torch.zeros(2, dtype=torch.long)
    x1 = diffusion.q_sample(x0, t0, torch.randn(x0.shape, generator=g))
    assert torch.allclose(diffusion.p_sample(x1, t0, t0 - 1, x0, torch.Generator().manual_seed(1)), x0, atol=1e-6)


def test_training_loss_is_eps_mse(diffusion):
    """L_simple (DDPM Alg. 1): the network sees x_t = q_sample(x_0, t, eps) and t, t uniform in [0, T-1]; the loss is
    the MSE between its output and that eps."""
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x_t, t_):
            seen.append((x_t, t_))
            return 0.5 * x_t
    torch.manual_seed(0)
    t, noise = torch.randint(0, T, (4,)), torch.randn_like(x0)      # the draws training_loss makes, in its order
    torch.manual_seed(0)
    loss = diffusion.training_loss(Probe(), x0)
    x_t = ABAR[t].sqrt()[:, None, None, None] * x0.double() + (1 - ABAR[t]).sqrt()[:, None, None, None] * noise.double()
    assert torch.equal(seen[0][1], t) and torch.allclose(seen[0][0].double(), x_t, atol=1e-6)
    assert torch.allclose(loss.double(), ((0.5 * x_t - noise.double()) ** 2).mean(), atol=1e-6)
    for _ in range(50):
        diffusion.training_loss(Probe(), x0)
    drawn = torch.cat([t_ for _, t_ in seen[1:]])
    assert 0 <= drawn.min() and drawn.max() <= T - 1 and drawn.float().std() > T / 4


# ---------------------------------------------------------------------------------------------- timesteps


def test_timestep_sequence(diffusion):
    """Trailing spacing: T steps walk T-1..0, 20 steps 999, 949, ..., 49, a run from t_start takes its share, one step
    is [t_start]; always strictly descending within [0, t_start], and each entry is one network call."""
    assert diffusion.timestep_sequence() == diffusion.timestep_sequence(T) == list(range(T - 1, -1, -1))
    assert diffusion.timestep_sequence(20) == list(range(999, 0, -50))
    assert diffusion.timestep_sequence(20, 499) == list(range(499, 0, -50))          # half the schedule: 10 calls
    assert diffusion.timestep_sequence(50, 499) == list(range(499, 0, -20))
    assert diffusion.timestep_sequence(1) == [T - 1] and diffusion.timestep_sequence(1, 499) == [499]
    assert diffusion.timestep_sequence(100, 9) == [9] and diffusion.timestep_sequence(20, 49) == [49]
    assert diffusion.timestep_sequence(20, 50) == [50, 25]            # ceil(20 * 51 / 1000) = 2 calls, 25.5 apart
    assert diffusion.timestep_sequence(50, -1) == []                  # strength 0: nothing to do
    for steps in (1, 3, 7, 30, 99, 333, 999, T):
        for t_start in (0, 1, 49, 250, 499, 998, T - 1):
            seq = diffusion.timestep_sequence(steps, t_start)
            assert len(seq) == math.ceil(steps * (t_start + 1) / T), (steps, t_start)
            assert seq[0] == t_start and seq[-1] >= 0 and all(a > b for a, b in zip(seq, seq[1:])), (steps, t_start)
    g = torch.Generator().manual_seed(0)
    for sampler in SAMPLERS:                                          # the network sees exactly these timesteps
        for steps, t_start in ((7, None), (20, 499)):
            seq = diffusion.timestep_sequence(steps, t_start)
            model = EpsSequence([torch.randn(1, 3, 4, 4, generator=g) for _ in seq])
            diffusion.sample(model, (1, 3, 4, 4), sampler=sampler, steps=steps, t_start=t_start, generator=g,
                             progress=False)
            assert model.t_seen == seq, (sampler, steps, t_start)


def test_more_steps_than_timesteps_take_each_timestep_once():
    """steps counts network calls over the full schedule, so more than T of them can only mean every timestep once
    (train.py's epoch samples ask for 50 steps whatever --timesteps is): no repeated step, no t = -1 given to the
    network, whose 1 - abar_{-1} = 0 turns the sample into NaN."""
    d = GaussianDiffusion(DiffusionConfig(timesteps=10))
    assert d.timestep_sequence(50) == list(range(9, -1, -1)) and d.timestep_sequence(50, 4) == [4, 3, 2, 1, 0]
    x = d.sample(tiny_unet(), (1, 3, 16, 16), sampler="ddim", steps=50, generator=torch.Generator().manual_seed(0),
                 progress=False)
    assert torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------- samplers


def test_ddim_step_is_eq12(diffusion):
    """DDIM Eq. 12 with sigma = 0, written out in float64: x_prev = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat."""
    g = torch.Generator().manual_seed(4)
    x0, eps, xt = torch.randn(3, 2, 3, 8, 8, generator=g).unbind(0)
    for t_val, s_val in ((999, 979), (500, 100), (30, 0), (9, -1), (0, 499)):    # the last: an inversion step
        out = diffusion.ddim_sample(xt, torch.full((2,), t_val), torch.full((2,), s_val), x0, eps)
        a_s = abar64(s_val)
        assert torch.allclose(out.double(), a_s.sqrt() * x0.double() + (1 - a_s).sqrt() * eps.double(), atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_deterministic_samplers_recover_x0_with_a_perfect_network(diffusion, sampler):
    """With eps_theta that knows x_0, DDIM and DPM-Solver++ land on x_0 from x_{T-1} at any step count, and draw
    nothing from the generator."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 1.8 - 0.9
    xT = diffusion.q_sample(x0, torch.full((3,), T - 1), torch.randn(x0.shape, generator=g))
    model = TrueNoise(diffusion, x0)
    for steps in (10, 50, T):
        out = diffusion.sample(model, x0.shape, sampler=sampler, steps=steps, x_t=xT.clone(), progress=False)
        assert torch.allclose(out, x0, atol=1e-4), steps
    other = diffusion.sample(model, x0.shape, sampler=sampler, steps=T, x_t=xT.clone(), progress=False,
                             generator=torch.Generator().manual_seed(99))
    assert torch.equal(out, other)


def test_one_step_sampling_denoises(diffusion):
    # a single step from x_{T-1} (or from a low t_start) is x0_hat: with a network that knows x_0, x_0 itself
    g = torch.Generator().manual_seed(12)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8
    model, seen = TrueNoise(diffusion, x0), []
    model.register_forward_hook(lambda m, inputs, out: seen.append(int(inputs[1][0])))
    for sampler in SAMPLERS:
        for t_start, steps in ((T - 1, 1), (9, 100), (49, 20)):
            xt = diffusion.q_sample(x0, torch.full((2,), t_start), torch.randn(x0.shape, generator=g))
            seen.clear()
            out = diffusion.sample(model, x0.shape, sampler=sampler, steps=steps, x_t=xt, t_start=t_start,
                                   generator=g, progress=False)
            assert seen == [t_start] and torch.allclose(out, x0, atol=1e-4), (sampler, t_start, seen)
    # and one inversion step goes 0 -> t_start (x_0 taken as x at t = 0), not nowhere
    e = model(x0, torch.zeros(2, dtype=torch.long))
    expected = abar64(49).sqrt() * x0.double() + (1 - abar64(49)).sqrt() * e.double()
    assert torch.allclose(diffusion.ddim_invert(model, x0, 49, 20).double(), expected, atol=1e-5)


def test_sample_from_start_step_returns_input_at_zero_steps(diffusion):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for sampler in SAMPLERS:
        assert torch.equal(diffusion.sample(tiny_unet(), x.shape, sampler=sampler, x_t=x.clone(), t_start=-1,
                                            progress=False), x)
    with pytest.raises(ValueError, match="unknown sampler"):
        diffusion.sample(tiny_unet(), x.shape, sampler="euler", progress=False)


def dpmpp2m_reference(x, seq, eps, clip):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in float64 from the schedule computed here: alpha = sqrt(abar),
    sigma = sqrt(1 - abar), lambda = log(alpha / sigma), h = lambda_prev - lambda_t,
    x_prev = (sigma_prev / sigma_t) x - alpha_prev (e^{-h} - 1) D, D = x0_hat on the first step and
    (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_last with r = h_last / h after; the step to the clean image is x0_hat.
    -> the x after each step."""
    x, x0_last, h_last, out = x.double(), None, None, []
    for i, t in enumerate(seq):
        alpha, sigma = ABAR[t].sqrt(), (1 - ABAR[t]).sqrt()
        x0 = (x - sigma * eps[i].double()) / alpha
        x0 = x0.clamp(-1, 1) if clip else x0
        if i == len(seq) - 1:
            out.append(x0)
            break
        alpha_p, sigma_p = ABAR[seq[i + 1]].sqrt(), (1 - ABAR[seq[i + 1]]).sqrt()
        h = torch.log(alpha_p / sigma_p) - torch.log(alpha / sigma)
        if x0_last is None:
            d = x0
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
        x = (sigma_p / sigma) * x - alpha_p * (torch.exp(-h) - 1) * d
        out.append(x)
        x0_last, h_last = x0, h
    return out


def eps_run(n, shape=(2, 3, 8, 8), seed=0):
    """A start x and n eps outputs: eps slightly off x, so x0_hat is sometimes inside [-1, 1] and sometimes not."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x, [x + 0.3 * torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("steps, t_start", [(10, None), (20, None), (20, 499)])
def test_dpmpp2m_matches_the_paper_step_for_step(diffusion, steps, t_start):
    """Every intermediate x (what the network sees next) and the result equal the float64 reference of Alg. 2,
    with clipping of x0_hat and without (the sampler runs in float64 too, from a float64 x_T)."""
    seq = diffusion.timestep_sequence(steps, t_start)
    x, eps = eps_run(len(seq))
    for clip in (True, False):
        model = EpsSequence(eps)
        out = diffusion.sample(model, x.shape, sampler="dpmpp2m", steps=steps, t_start=t_start, x_t=x.double(),
                               clip=clip, progress=False)
        ref = dpmpp2m_reference(x, seq, eps, clip)
        assert model.t_seen == seq
        x0_raw = [(x_.double() - (1 - ABAR[t]).sqrt() * e.double()) / ABAR[t].sqrt()
                  for x_, t, e in zip(model.x_seen, seq, eps)]
        assert any((v.abs() > 1.1).any() for v in x0_raw)           # so clipping acts
        for i, (seen, expected) in enumerate(zip(model.x_seen[1:], ref)):
            torch.testing.assert_close(seen, expected, rtol=1e-9, atol=1e-9, msg=f"step {i} (clip={clip})")
        torch.testing.assert_close(out, ref[-1].clamp(-1, 1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("steps, t_start", [(10, None), (20, None), (20, 499)])
def test_dpmpp2m_matches_diffusers(diffusion, steps, t_start):
    """The same network outputs through diffusers' DPMSolverMultistepScheduler (dpmsolver++, second order, the
    same timesteps, thresholding at 1.0 = clipping x0_hat to [-1, 1]) give the same samples (float32 there)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (optional, not in requirements.txt) is not "
                                                        "installed; the float64 reference test still runs")
    seq = diffusion.timestep_sequence(steps, t_start)
    x, eps = eps_run(len(seq), seed=1)
    model = EpsSequence(eps)
    ours = diffusion.sample(model, x.shape, sampler="dpmpp2m", steps=steps, t_start=t_start, x_t=x.clone(),
                            progress=False)
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                                  algorithm_type="dpmsolver++", thresholding=True, sample_max_value=1.0)
    sched.set_timesteps(timesteps=seq)
    assert sched.timesteps.tolist() == seq
    theirs = x.clone()
    for i, t in enumerate(sched.timesteps):
        theirs = sched.step(eps[i], t, theirs).prev_sample
        if i + 1 < len(seq):
            torch.testing.assert_close(model.x_seen[i + 1], theirs, rtol=1e-5, atol=1e-5, msg=f"step {i}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)                 # measured 7e-6


def test_ddim_inversion_round_trip_needs_no_clipping(diffusion):
    """ddim_invert, then DDIM back without clipping, returns the input up to DDIM's discretisation error, with an
    imperfect network (GaussianDataEps) whose x0_hat leaves [-1, 1] on the way; sampling back *with* clipping
    from the same latent misses by far more, so the round trip depends on clipping being off."""
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    model = GaussianDataEps()
    for t0, steps, tol in ((499, T, 0.03), (999, 200, 0.15)):                    # measured 0.009, 0.06
        x_t = diffusion.ddim_invert(model, x0, t0, steps)
        assert diffusion.guided_eps_x0(model, x_t, torch.full((2,), t0), clip=False)[1].abs().max() > 1.5
        kw = dict(sampler="ddim", steps=steps, x_t=x_t, t_start=t0, progress=False)
        err = (diffusion.sample(model, x0.shape, clip=False, **kw) - x0).abs().max().item()
        err_clipped = (diffusion.sample(model, x0.shape, clip=True, **kw) - x0).abs().max().item()
        assert err < tol, (t0, steps, err)
        assert err_clipped > 0.25, (t0, steps, err_clipped)                       # measured 0.30, 0.79


def test_ddim_inversion_step_is_eq12_forwards(diffusion):
    """Each inversion step t -> t' is x_t' = sqrt(abar_t') x0_hat(x_t, t) + sqrt(1 - abar_t') eps_theta(x_t, t), with
    x0_hat not clipped: three steps 0 -> 332 -> 666 -> 999 written out against ddim_invert."""
    model = tiny_unet()
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    assert diffusion.timestep_sequence(3, 999) == [999, 666, 332]
    x = x0.double()
    for t_val, t_next in ((0, 332), (332, 666), (666, 999)):
        with torch.no_grad():
            e = model(x.float(), torch.full((2,), t_val)).double()
        a_t, a_n = abar64(t_val), abar64(t_next)
        x0_hat = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()                                        # DDPM Eq. 15
        x = a_n.sqrt() * x0_hat + (1 - a_n).sqrt() * e
    assert torch.allclose(diffusion.ddim_invert(model, x0, 999, 3).double(), x, atol=1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_known_region_is_kept_and_the_rest_generated(diffusion, sampler):
    """RePaint replacement: where mask = 0 the result is x0_known exactly; mask = 1 everywhere generates everywhere."""
    net, x0 = tiny_unet(), torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:10, 6:12] = 1
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x_t = diffusion.q_sample(x0, torch.full((2,), 499), noise)
    kw = dict(sampler=sampler, steps=20, t_start=499, progress=False)
    out = diffusion.sample(net, x0.shape, x_t=x_t.clone(), known=(mask, x0), generator=torch.Generator().manual_seed(1),
                           **kw)
    assert torch.equal(out * (1 - mask), x0 * (1 - mask))
    assert (out - x0)[:, :, 4:10, 6:12].abs().mean() > 0.05              # the masked region was generated anew
    everywhere = diffusion.sample(net, x0.shape, x_t=x_t.clone(), known=(torch.ones_like(mask), x0),
                                  generator=torch.Generator().manual_seed(1), **kw)
    if sampler != "ddpm":                                                # deterministic: the known noise is unused
        plain = diffusion.sample(net, x0.shape, x_t=x_t.clone(), generator=torch.Generator().manual_seed(1), **kw)
        assert torch.allclose(everywhere, plain, atol=1e-6)
    assert not torch.equal(everywhere * (1 - mask), x0 * (1 - mask))


def test_known_region_is_noised_to_each_step(diffusion):
    """RePaint Eq. 8: between steps the known region is q_sample(x0_known, t_prev), so with x0_known = 0 known
    everywhere, the network sees noise of std sqrt(1 - abar_{t_prev}) at each later step, not the clean zeros."""
    seen = []

    def net(x, t):
        seen.append((int(t[0]), x.std().item()))
        return torch.zeros_like(x)
    net.parameters = lambda: iter([torch.zeros(1)])               # the device sample() reads from the network
    x0, mask = torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    diffusion.sample(net, x0.shape, sampler="ddim", steps=10, t_start=499, x_t=torch.randn(1, 3, 32, 32),
                     known=(mask, x0), generator=torch.Generator().manual_seed(0), progress=False)
    for t, std in seen[1:]:                                       # each step's input: the last step's t_prev
        assert std == pytest.approx((1 - diffusion.alphas_cumprod[t]).sqrt().item(), rel=0.1), t


# ---------------------------------------------------------------------------------------------- the UNet


def test_unet_shapes_and_config_check():
    net = tiny_unet()
    x = torch.randn(3, 3, 16, 16)
    assert net(x, torch.tensor([0, 5, 999])).shape == x.shape
    assert UNetConfig(image_size=18, channel_mult=(1, 2, 2)).check() is not None       # 18 % 4 != 0
    assert UNetConfig(image_size=4, channel_mult=(1, 2, 2)).check() is not None        # too small
    assert UNetConfig(image_size=64).check() is None
    assert "not a feature-map side" in UNetConfig(image_size=16, channel_mult=(1, 2), attn_resolutions=(4,)).check()
    with pytest.raises(ValueError):
        UNet(UNetConfig(image_size=30))


def test_attention_is_the_formula():
    """AttnBlock is x + proj(softmax(Q K^T / sqrt(d)) V) per head over the H*W positions (Vaswani et al. Eq. 1), Q, K, V
    the 1x1-conv projections of the normalised map: written out in float64 on a non-square map."""
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
    torch.testing.assert_close(blk(x), x + o.transpose(1, 2).reshape(2, 32, 4, 6), rtol=0, atol=1e-12)


def test_timestep_embedding_distinguishes_steps():
    t = torch.tensor([0, 1, 500])
    e = timestep_embedding(t, 32)
    assert e.shape == (3, 32)
    angles = t[:, None].double() * 10000.0 ** (-torch.arange(16).double() / 16)      # t * 10000^(-i / half)
    assert torch.allclose(e.double(), torch.cat([angles.cos(), angles.sin()], 1), atol=1e-5)
    assert (e[1] - e[2]).abs().max() > 0.1


def test_the_unet_and_the_guide_read_the_timestep():
    """Through each ResBlock's scale and shift after GroupNorm: with the convolutions and linear layers drawn (none
    left at its zero init; GroupNorm's affine at its (1, 0) init), the same image at t = 0 and t = 999 gives
    different outputs, also where a group holds one channel (width 16 with 32 groups), where DDPM's shift before the
    norm is removed by it exactly."""
    torch.manual_seed(0)
    unet = lambda width: UNet(UNetConfig(image_size=16, base_channels=width, channel_mult=(1,), num_res_blocks=1,
                                         attn_resolutions=(), dropout=0.0))                       # noqa: E731
    guide = lambda width: NoisyClassifier(ClassifierConfig(16, base_channels=width, channel_mult=(1,), num_outputs=2,
                                                           target_index=0))                        # noqa: E731
    for net in (unet(64), unet(16), guide(64), guide(16)):
        for layer in net.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.normal_(layer.weight, 0, 0.3)
                torch.nn.init.normal_(layer.bias, 0, 0.3)
        x = torch.randn(1, 3, 16, 16)
        with torch.no_grad():
            a, b = (net(x, torch.tensor([t])) for t in (0, 999))
        assert (a - b).abs().mean() > 1e-3 * a.abs().mean(), type(net).__name__      # DDPM's shift, width 16: ~1e-7


# ---------------------------------------------------------------------------------------------- guidance


def test_guided_eps_x0_in_guided_diffusions_order(diffusion):
    """clip=True: x0 = clip(predict_x0(eps)), eps recomputed from it, eps_hat = eps - sqrt(1 - abar_t) * cond_fn
    (Dhariwal & Nichol Eq. 14), x0_hat = predict_x0(eps_hat) *not* clipped again; clip=False skips the clip. Written
    out in float64, on inputs where both the network's x0 and the guided x0_hat leave [-1, 1]."""
    g = torch.Generator().manual_seed(10)
    x, e, shift = torch.randn(3, 2, 3, 8, 8, generator=g).unbind(0)
    shift = 3 * shift
    model, seen = EpsSequence([e] * 8), []

    def cond_fn(x_t, t):
        seen.append((x_t, t.clone()))
        return shift
    for t_val in (100, 600):
        t, a = torch.full((2,), t_val), abar64(t_val)
        x0_raw = (x.double() - (1 - a).sqrt() * e.double()) / a.sqrt()                  # DDPM Eq. 15
        assert x0_raw.abs().max() > 1.2                                                 # the clip acts
        for clip in (True, False):
            x0 = x0_raw.clamp(-1, 1) if clip else x0_raw
            eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
            eps_hat = eps - (1 - a).sqrt() * shift.double()
            x0_hat = (x.double() - (1 - a).sqrt() * eps_hat) / a.sqrt()
            assert x0_hat.abs().max() > 1.2                                             # outside [-1, 1]: not clipped
            e_out, x0_out = diffusion.guided_eps_x0(model, x, t, cond_fn, clip=clip)
            torch.testing.assert_close(e_out.double(), eps_hat, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x0_out.double(), x0_hat, rtol=1e-5, atol=1e-5)
            assert seen[-1][0] is x and torch.equal(seen[-1][1], t)                      # at x_t and t, never t_prev
            e_out, x0_out = diffusion.guided_eps_x0(model, x, t, None, clip=clip)      # unguided
            torch.testing.assert_close(e_out.double(), eps, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x0_out.double(), x0, rtol=1e-5, atol=1e-5)
    # every sampler calls cond_fn once per network call, at the current step
    model = tiny_unet()
    x = torch.randn(2, 3, 16, 16, generator=g)
    shift = torch.zeros_like(x)
    seen.clear()
    for sampler in SAMPLERS:
        diffusion.sample(model, x.shape, sampler=sampler, steps=4, x_t=x, cond_fn=cond_fn, progress=False)
    assert [int(t[0]) for _, t in seen] == 3 * diffusion.timestep_sequence(4)


def test_cond_fn_is_the_gradient_of_log_p():
    """Finite differences of log p(y | x_t, t) of the steered column match cond_fn / s along random directions."""
    clf = tiny_classifier().double()
    k = clf.cfg.target_index
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([100, 700])
    s = 2.5
    for y in (0, 1):
        grad = make_cond_fn(clf, y, s)(x, t).double() / s
        for seed in range(3):
            v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            h = 1e-4
            with torch.no_grad():
                lp = lambda z: log_prob(clf(z, t)[:, k], torch.full((2,), y)).sum()
                fd = (lp(x + h * v) - lp(x - h * v)) / (2 * h)
            assert abs(fd.item() - (grad * v).sum().item()) < 1e-5 * max(1.0, abs(fd.item()))


def test_guidance_raises_log_p(diffusion):
    clf = tiny_classifier()
    k = clf.cfg.target_index
    x = torch.randn(4, 3, 16, 16)
    t = torch.full((4,), 300)
    for y in (0, 1):
        lp = lambda z: log_prob(clf(z, t)[:, k], torch.full((4,), y))
        step = make_cond_fn(clf, y, 1.0)(x, t)
        with torch.no_grad():
            assert (lp(x + 1e-2 * step) > lp(x)).all()
    # through the sampler: a guided DDIM step ends with higher log p(y | x) than the unguided one
    model = tiny_unet()
    xt = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t, tp = torch.full((4,), 300), torch.full((4,), 250)
    eps, x0 = diffusion.guided_eps_x0(model, xt, t)
    unguided = diffusion.ddim_sample(xt, t, tp, x0, eps)
    eps, x0 = diffusion.guided_eps_x0(model, xt, t, make_cond_fn(clf, 1, 50.0))
    guided = diffusion.ddim_sample(xt, t, tp, x0, eps)
    lp1 = lambda z: log_prob(clf(z, tp)[:, k], torch.ones(4))
    with torch.no_grad():
        assert (lp1(guided) > lp1(unguided)).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_scale_zero_equals_unguided(diffusion, sampler):
    model, clf = tiny_unet(), tiny_classifier()
    kw = dict(sampler=sampler, steps=5, progress=False)
    a = diffusion.sample(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(7), **kw)
    b = diffusion.sample(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(7),
                         cond_fn=make_cond_fn(clf, 1, 0.0), **kw)
    c = diffusion.sample(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(7),
                         cond_fn=make_cond_fn(clf, 1, 5.0), **kw)
    assert torch.allclose(a, b, atol=1e-4)    # a zero shift; x0_hat recomputed from eps differs in rounding (x 1/sqrt(abar))
    assert (a - c).abs().max() > 0.01


def test_per_sample_guidance_scales():
    clf = tiny_classifier()
    x, t = torch.randn(3, 3, 16, 16), torch.full((3,), 10)
    g1 = make_cond_fn(clf, 1, 1.0)(x, t)
    g = make_cond_fn(clf, torch.tensor([1, 1, 0]), torch.tensor([0.0, 1.0, 2.0]))(x, t)
    assert torch.equal(g[0], torch.zeros_like(g[0]))
    assert torch.allclose(g[1], g1[1])
    assert torch.allclose(g[2], 2 * make_cond_fn(clf, 0, 1.0)(x, t)[2], atol=1e-6)


def held_gradient_setup(num_outputs, target_index):
    """A float64 guide whose held attributes all share one head row (so all their logits are equal), its trunk and
    the two rows the same for any number of attributes; x, t; keep probabilities all 0.3 but the target's."""
    clf = tiny_classifier(num_outputs=num_outputs, target_index=target_index, seed=5).double()
    rows = torch.randn(2, clf.head.weight.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        clf.head.weight.copy_(rows[1].expand(num_outputs, -1))
        clf.head.weight[target_index] = rows[0]
        clf.head.bias.zero_()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([50, 400])
    keep = torch.full((2, num_outputs), 0.3, dtype=torch.float64)
    keep[:, target_index] = 0.9                                     # ignored: the target is steered, not held
    return clf, x, t, keep


@pytest.mark.parametrize("num_outputs, target_index", [(5, 2), (40, 31)])
def test_keep_guidance_is_the_gradient_of_the_product_of_experts(num_outputs, target_index):
    """With keep probabilities p, cond_fn is s * grad [log p(a_k = y | x_t) + w * mean_{j != k} (p_j log sigmoid(l_j)
    + (1 - p_j) log sigmoid(-l_j))], here by autograd of that sum written with F.logsigmoid; w = 0 or keep = None
    steer column k alone."""
    clf, k = tiny_classifier(num_outputs=num_outputs, target_index=target_index, seed=2).double(), target_index
    x, t = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([50, 400])
    keep = torch.rand(2, num_outputs, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    held = [j for j in range(num_outputs) if j != k]
    s, w, y = 1.5, 0.3, 1
    xr = x.clone().requires_grad_(True)
    l = clf(xr, t)
    term = keep[:, held] * F.logsigmoid(l[:, held]) + (1 - keep[:, held]) * F.logsigmoid(-l[:, held])
    expected = s * torch.autograd.grad((F.logsigmoid(l[:, k]) + w * term.mean(1)).sum(), xr)[0]
    torch.testing.assert_close(make_cond_fn(clf, y, s, keep=keep, keep_weight=w)(x, t).double(), expected,
                               rtol=1e-6, atol=1e-10)
    plain = make_cond_fn(clf, y, s)(x, t)
    torch.testing.assert_close(make_cond_fn(clf, y, s, keep=keep, keep_weight=0.0)(x, t), plain, rtol=0, atol=0)
    assert (make_cond_fn(clf, y, s, keep=keep, keep_weight=w)(x, t) - plain).abs().max() > 1e-3 * plain.abs().max()


def test_held_term_is_a_mean_over_the_held_attributes():
    """With every held logit equal (one shared head row) and equal keep probabilities, the held term's gradient is
    the same for 4 held attributes and for 39: a mean, not a sum (which would differ by 39/4)."""
    held = {}
    for num_outputs, k in ((5, 2), (40, 31)):
        clf, x, t, keep = held_gradient_setup(num_outputs, k)
        with_keep = make_cond_fn(clf, 1, 2.0, keep=keep, keep_weight=0.5)(x, t).double()
        held[num_outputs] = with_keep - make_cond_fn(clf, 1, 2.0)(x, t).double()
    assert held[5].abs().max() > 1e-4
    torch.testing.assert_close(held[40], held[5], rtol=1e-5, atol=1e-9)      # the logits are taken in float32


# ---------------------------------------------------------------------------------------------- no host syncs


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
    """A training step, and guided DDPM, DDIM and DPM-Solver++ runs (with held attributes and a known region), on
    the "meta" device read nothing from the host once warm: the schedule table and the guidance constants are
    moved once."""
    dev = torch.device("meta")
    net = UNet(UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,),
                          groups=4)).to(dev)
    clf = NoisyClassifier(ClassifierConfig(image_size=8, base_channels=8, channel_mult=(1,), num_outputs=3,
                                           target_index=1)).to(dev)
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=100))
    x = torch.randn(4, 3, 8, 8, device=dev)
    known = (torch.ones(4, 1, 8, 8, device=dev), x)
    cond_fn = make_cond_fn(clf, 1, 3.0, keep=torch.full((4, 3), 0.5), keep_weight=0.1)

    def sample(sampler, steps):
        diffusion.sample(net, x.shape, sampler=sampler, steps=steps, cond_fn=cond_fn, x_t=x, known=known, device=dev,
                         progress=False)

    diffusion.training_loss(net, x)                          # warm-up: the one-time copies happen here
    sample("ddim", 1)
    with HostInputs() as record:
        diffusion.training_loss(net, x).backward()
        for sampler in SAMPLERS:
            sample(sampler, 3 if sampler == "dpmpp2m" else 2)     # DPM-Solver++'s second-order step needs 3
    assert record.ops == []
    table = diffusion._abar                                  # a copy of the table per call is caught
    diffusion.alpha_bar = lambda t, ndim=4: table.to(t.device)[t + 1].reshape(-1, *([1] * (ndim - 1)))
    with HostInputs() as record:
        diffusion.training_loss(net, x)
    assert "aten._to_copy.default" in record.ops
