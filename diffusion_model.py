"""The denoising network (a UNet) and the Gaussian diffusion that trains and samples with it.

Papers, cited on the lines that implement them:
  DDPM        Ho, Jain & Abbeel 2020, https://arxiv.org/abs/2006.11239
  DDIM        Song, Meng & Ermon 2021, https://arxiv.org/abs/2010.02502
  Guidance    Dhariwal & Nichol 2021, https://arxiv.org/abs/2105.05233 (Sec. 4.2: eps shifted by the score)
  DPM-Solver++  Lu et al. 2022, https://arxiv.org/abs/2211.01095 (Alg. 2, multistep second order, "2M")
  RePaint     Lugmayr et al. 2022, https://arxiv.org/abs/2201.09865 (Eq. 8-10: keep a known region)

Timestep convention, used everywhere in this project: t is an integer in [0, T-1]; t = 0 is the first
noising step (the paper's t = 1), so alphas_cumprod[t] = prod_{s <= t} (1 - betas[s]) and x_0 is the
clean image. A "previous" step t_prev = -1 means the clean image, with alphas_cumprod[-1] := 1.

``GaussianDiffusion`` holds the schedule and the maths; the network and ``cond_fn(x_t, t) -> s * grad_x log
p(y | x_t, t)`` are arguments, so this module knows nothing about classifiers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------------------------
# Network

@dataclass
class UNetConfig:
    image_size: int = 64               # square images, side divisible by 2**(len(channel_mult) - 1)
    in_channels: int = 3
    base_channels: int = 128           # width of the first level
    channel_mult: tuple = (1, 2, 2, 2)  # width of level i = base_channels * channel_mult[i]
    num_res_blocks: int = 2            # residual blocks per level (the decoder has one more)
    attn_resolutions: tuple = (16,)    # feature-map sides that get self-attention
    dropout: float = 0.1
    num_heads: int = 4
    groups: int = 32                   # GroupNorm groups (capped by the channel count)

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)

    def check(self) -> Optional[str]:
        """A problem with this configuration, in words a user can act on, or None."""
        if not self.channel_mult or min(self.channel_mult) < 1:
            return f"channel_mult needs one or more width multipliers, each >= 1, got {self.channel_mult}; e.g. 1,2,2,2"
        f = 2 ** (len(self.channel_mult) - 1)
        if self.image_size < 2 * f or self.image_size % f:
            return (f"image size {self.image_size} must be a multiple of {f} and at least {2 * f} for a UNet "
                    f"with {len(self.channel_mult)} levels; use e.g. {max(2 * f, f * round(self.image_size / f))}")
        if self.base_channels <= 0 or self.num_res_blocks <= 0:
            return "base_channels and num_res_blocks must be > 0"
        if not 0.0 <= self.dropout < 1.0:
            return f"dropout must be in [0, 1), got {self.dropout}"
        sides = [self.image_size // 2 ** i for i in range(len(self.channel_mult))]
        missing = [r for r in self.attn_resolutions if r not in sides]
        if missing:
            return (f"attn_resolutions {missing[0]} is not a feature-map side of this UNet "
                    f"({', '.join(map(str, sides))}); pick from those (the middle block always has attention)")
        return None


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (DDPM App. B; Vaswani et al. 2017 Sec. 3.5). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]                       # (B, half)
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))   # (B, dim)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding in between, plus a skip. (B,Ci,H,W) -> (B,Co,H,W).
    The embedding scales and shifts the normalised features, GroupNorm(h) (1 + scale) + shift (ADM's AdaGN, Dhariwal
    & Nichol 2021, Sec. 3), rather than DDPM's shift before the norm, which GroupNorm subtracts again wherever a
    group holds a single channel (a width of 32 or less with 32 groups)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, 2 * out_ch)                 # scale and shift
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)   # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.temb(F.silu(temb))[:, :, None, None].chunk(2, dim=1)   # (B, 2Co) -> 2 x (B, Co, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h) * (1 + scale) + shift)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, Eq. 1) over the H*W positions,
    q/k/v and output projection by 1x1 convolutions. (B,C,H,W) -> (B,C,H,W)."""

    def __init__(self, ch: int, num_heads: int = 4, groups: int = 32):
        super().__init__()
        self.num_heads = math.gcd(num_heads, ch)
        self.norm = group_norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # contiguous tokens: the fused kernels need the head dim contiguous (a view for a channels_last map)
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous()     # (B,3C,H,W) -> (B, HW, 3C)
        q, k, v = qkv.reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)                               # each (B, heads, HW, d)
        h = h.transpose(1, 2).reshape(B, H * W, C).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Conv2d):
    """Stride-2 3x3 conv. (B,C,H,W) -> (B,C,H/2,W/2)."""

    def __init__(self, ch: int):
        super().__init__(ch, ch, 3, stride=2, padding=1)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv. (B,C,H,W) -> (B,C,2H,2W)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """Layers in order; ResBlocks also get the timestep embedding. The one place that knows which layers take it."""

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        return h


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise in x_t. (B,3,S,S), (B,) int -> (B,3,S,S)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if problem := cfg.check():
            raise ValueError(problem)
        self.cfg = cfg
        ch, g, p = cfg.base_channels, cfg.groups, cfg.dropout
        temb_dim = 4 * ch
        self.temb_mlp = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        def block(c_in, c_out, side):           # a ResBlock, with attention at the listed sides
            attn = [AttnBlock(c_out, cfg.num_heads, g)] if side in cfg.attn_resolutions else []
            return TimestepSequential(ResBlock(c_in, c_out, temb_dim, p, g), *attn)

        # encoder: every block's output is handed to the decoder as a skip; remember the widths
        self.down, skip_chs, cur, side = nn.ModuleList(), [ch], ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(cur, ch * mult, side))
                cur = ch * mult
                skip_chs.append(cur)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(TimestepSequential(Downsample(cur)))
                side //= 2
                skip_chs.append(cur)
        self.mid = TimestepSequential(ResBlock(cur, cur, temb_dim, p, g), AttnBlock(cur, cfg.num_heads, g),
                                      ResBlock(cur, cur, temb_dim, p, g))
        # decoder: one more block per level than the encoder, each eating one skip; the upsampler ends a level
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = block(cur + skip_chs.pop(), ch * mult, side)
                cur = ch * mult
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(cur))
                    side *= 2
                self.up.append(layers)
        self.norm_out = group_norm(cur, g)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb_mlp(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))   # (B,) -> (B, 4*ch)
        hs = [self.conv_in(x)]                                                # (B,3,S,S) -> (B,ch,S,S)
        for block in self.down:
            hs.append(block(hs[-1], temb))
        h = self.mid(hs[-1], temb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), temb)                 # (B,C,H,W) -> (B,C+Cskip,H,W) -> ...
        return self.conv_out(F.silu(self.norm_out(h)))                       # (B,ch,S,S) -> (B,3,S,S)


# ----------------------------------------------------------------------------------------------
# Diffusion

CondFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    beta_start: float = 1e-4          # DDPM Sec. 4: linear schedule from 1e-4 to 0.02 over T = 1000
    beta_end: float = 0.02


class GaussianDiffusion:
    """Linear-beta Gaussian diffusion: forward noising, the eps-MSE loss, and the DDPM / DDIM / DPM-Solver++
    samplers. Schedule tables are float64 (float32 on MPS); coefficients are cast to the image dtype last."""

    def __init__(self, cfg: DiffusionConfig = DiffusionConfig()):
        self.cfg = cfg
        T = self.num_timesteps = cfg.timesteps
        betas = np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float64)
        self.alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float64)
        # index t + 1 of this table is alphas_cumprod[t]; index 0 is the clean image (alphas_cumprod[-1] := 1)
        self._abar = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        self._on_device = {}

    def alpha_bar(self, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """alphas_cumprod[t] for t (B,) in [-1, T-1], as (B, 1, 1, 1), from a copy on t's device made once (a copy
        per step would make the host wait for the GPU)."""
        key = str(t.device)
        if key not in self._on_device:
            self._on_device[key] = self._abar.to(t.device, torch.float32 if t.device.type == "mps" else torch.float64)
        return self._on_device[key][t + 1].reshape(-1, *([1] * (ndim - 1)))

    # -- forward process ----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.                                 DDPM Eq. 4"""
        abar = self.alpha_bar(t, x0.dim())
        return abar.sqrt().to(x0.dtype) * x0 + (1 - abar).sqrt().to(x0.dtype) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor):
        """Mean and variance of q(x_{t_prev} | x_t, x_0), DDPM Eq. 6-7 with beta' = 1 - abar_t / abar_{t_prev}, so
        that it holds for a skipped schedule too (Nichol & Dhariwal 2021, Sec. 4); t_prev = t - 1 is Eq. 7 itself."""
        abar, abar_prev = self.alpha_bar(t, x_t.dim()), self.alpha_bar(t_prev, x_t.dim())
        beta = 1 - abar / abar_prev
        mean = (abar_prev.sqrt() * beta / (1 - abar)).to(x_t.dtype) * x0 \
            + ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)).to(x_t.dtype) * x_t
        return mean, (beta * (1 - abar_prev) / (1 - abar)).to(x_t.dtype)     # beta_tilde

    def training_loss(self, model: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        """L_simple = E ||eps - eps_theta(x_t, t)||^2, t uniform in [0, T-1].             DDPM Alg. 1, Eq. 14"""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t).float(), noise)

    # -- reverse process ----------------------------------------------------------------------
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).                    DDPM Eq. 4 solved for x_0"""
        abar = self.alpha_bar(t, x_t.dim())
        return (x_t - (1 - abar).sqrt().to(x_t.dtype) * eps) * (1 / abar.sqrt()).to(x_t.dtype)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        abar = self.alpha_bar(t, x_t.dim())
        return (x_t - abar.sqrt().to(x_t.dtype) * x0) * (1 / (1 - abar).sqrt()).to(x_t.dtype)

    def guided_eps_x0(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                      cond_fn: Optional[CondFn] = None, clip: bool = True):
        """(eps_hat, x0_hat) for every sampler, in guided-diffusion's order (``condition_score``): x0_hat from the
        network's eps, clipped (``clip``), eps recomputed from it, then eps_hat = eps - sqrt(1 - abar_t) * s * grad
        log p(y | x_t, t) (Dhariwal & Nichol 2021, Eq. 14; cond_fn returns s * grad) and x0_hat from eps_hat."""
        with torch.no_grad():
            eps = model(x_t, t).float()
        x0 = self.predict_x0(x_t, t, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = self.predict_eps(x_t, t, x0)
        if cond_fn is not None:
            eps = eps - (1 - self.alpha_bar(t, x_t.dim())).sqrt().float() * cond_fn(x_t, t).float()
            x0 = self.predict_x0(x_t, t, eps)
        return eps, x0

    def p_sample(self, x_t, t, t_prev, x0, generator=None) -> torch.Tensor:
        """Ancestral step x_t -> x_{t_prev} ~ q(x_{t_prev} | x_t, x0_hat), variance beta_tilde.   DDPM Alg. 2"""
        mean, var = self.q_posterior(x0, x_t, t, t_prev)              # var = 0 into the clean image (t_prev = -1)
        return mean + var.sqrt() * torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)

    def ddim_sample(self, x_t, t, t_prev, x0, eps) -> torch.Tensor:
        """Deterministic step x_t -> x_{t_prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat.  DDIM Eq. 12,
        sigma = 0; the same formula with t_prev > t is the inversion of Sec. 4.3."""
        abar_prev = self.alpha_bar(t_prev, x_t.dim())
        return abar_prev.sqrt().to(x_t.dtype) * x0 + (1 - abar_prev).sqrt().to(x_t.dtype) * eps

    def dpmpp2m_sample(self, x_t, t, t_prev, x0, history=None) -> tuple:
        """One DPM-Solver++(2M) step x_t -> x_{t_prev}, data prediction (DPM-Solver++ Alg. 2; the step to the clean
        image is x0_hat itself, which ``sample`` takes). ``history``: (x0_hat, h) of the last step or None.
        -> (x_prev, the history for the next step)"""
        abar, abar_prev = self.alpha_bar(t, x_t.dim()), self.alpha_bar(t_prev, x_t.dim())
        lam = lambda a: 0.5 * (a.log() - (1 - a).log())                       # lambda = log(alpha / sigma)
        h = lam(abar_prev) - lam(abar)
        d = x0                                                                 # D: first order without a history
        if history is not None:                                                # D = (1 + 1/2r) x0 - 1/2r x0_last
            x0_last, h_last = history
            r = h_last / h
            d = ((1 + 1 / (2 * r)).to(x0.dtype) * x0 - (1 / (2 * r)).to(x0.dtype) * x0_last)
        # x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D
        x_prev = ((1 - abar_prev) / (1 - abar)).sqrt().to(x_t.dtype) * x_t \
            - (abar_prev.sqrt() * torch.expm1(-h)).to(x_t.dtype) * d
        return x_prev, (x0, h)

    @torch.no_grad()
    def ddim_invert(self, model: nn.Module, x0: torch.Tensor, t_start: int, steps: Optional[int] = None):
        """Deterministic x_0 -> x_{t_start}: DDIM Eq. 12 run forwards (Sec. 4.3) up the timesteps ``sample`` walks
        down, eps at the current step, no clipping, so that unclipped DDIM gives x_0 back up to discretisation."""
        seq = self.timestep_sequence(steps, t_start)[::-1]                    # ascending
        seq = [0] + seq if seq[0] != 0 else seq
        x, B = x0, x0.shape[0]
        for t, t_next in zip(seq[:-1], seq[1:]):
            tt, tn = (torch.full((B,), s, device=x.device, dtype=torch.long) for s in (t, t_next))
            eps, x0_hat = self.guided_eps_x0(model, x, tt, clip=False)
            x = self.ddim_sample(x, tt, tn, x0_hat, eps)
        return x

    def timestep_sequence(self, steps: Optional[int] = None, t_start: Optional[int] = None) -> list:
        """The network's timesteps, descending from t_start (default T-1), evenly spaced and ending one spacing
        above the clean image ("trailing" spacing, Lin et al. 2024, Table 2): n = ceil(steps * (t_start + 1) / T)
        of them, so a run from t_start < T - 1 takes its proportional share of ``steps``, and each is one call
        of the network. steps = T gives T-1, ..., 0; one step is [t_start], x_{t_start} -> x0_hat."""
        T = self.num_timesteps
        t_start = T - 1 if t_start is None else int(t_start)
        if t_start < 0:
            return []
        n = min(t_start + 1, max(1, math.ceil((T if steps is None else int(steps)) * (t_start + 1) / T)))
        return [int(np.round(k * (t_start + 1) / n)) - 1 for k in range(n, 0, -1)]

    def sample(self, model: nn.Module, shape, *, sampler: str = "ddpm", steps: Optional[int] = None,
               cond_fn: Optional[CondFn] = None, generator: Optional[torch.Generator] = None,
               x_t: Optional[torch.Tensor] = None, t_start: Optional[int] = None, known: Optional[tuple] = None,
               clip: bool = True, device=None, progress: bool = True) -> torch.Tensor:
        """Run the reverse process of ``model`` from x_{t_start} (default: noise at T-1) down to x_0 (B,C,H,W).

        :param sampler: "ddpm" (DDPM Alg. 2, the respaced posterior with fewer than T steps), "ddim" (DDIM Eq. 12)
            or "dpmpp2m" (DPM-Solver++(2M)); the last two are deterministic.
        :param steps: network calls over the full schedule (default: all T); see ``timestep_sequence``.
        :param x_t: start here instead of noise (a counterfactual's encoded input at t_start).
        :param known: (mask (B,1,H,W), x0_known (B,C,H,W)): generate only where mask = 1; elsewhere x_{t_prev} =
            q_sample(x0_known, t_prev) with fresh noise, and x_0 = x0_known.              RePaint Eq. 8-10
        :param clip: clip x0_hat to [-1, 1] at every step (off for DDIM inversion's round trip).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; one of {SAMPLERS}")
        device = device or next(model.parameters()).device
        x_t = torch.randn(shape, generator=generator, device=device) if x_t is None else x_t
        seq, history = self.timestep_sequence(steps, t_start), None
        for i, t in enumerate(tqdm(seq, desc=f"{sampler} sampling", disable=not progress, leave=False)):
            t_prev = seq[i + 1] if i + 1 < len(seq) else -1
            tt, tp = (torch.full((shape[0],), s, device=device, dtype=torch.long) for s in (t, t_prev))
            eps, x0 = self.guided_eps_x0(model, x_t, tt, cond_fn, clip)
            if sampler == "ddpm":
                x_t = self.p_sample(x_t, tt, tp, x0, generator)
            elif sampler == "ddim":
                x_t = self.ddim_sample(x_t, tt, tp, x0, eps)
            elif t_prev < 0:                                        # DPM-Solver++'s last step: x0_hat itself
                x_t = x0
            else:                                                   # second order from the second step on
                x_t, history = self.dpmpp2m_sample(x_t, tt, tp, x0, history)
            if known is not None:
                mask, x0_known = known
                noise = torch.randn(x_t.shape, generator=generator, device=device, dtype=x_t.dtype)
                x_known = x0_known if t_prev < 0 else self.q_sample(x0_known, tp, noise)
                x_t = mask * x_t + (1 - mask) * x_known                                      # RePaint Eq. 10
        return x_t.clamp(-1, 1)
