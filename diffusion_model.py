"""The denoising network (a UNet) and the Gaussian diffusion that trains and samples with it.

Papers, cited on the lines that implement them:
  DDPM  Ho, Jain & Abbeel 2020, https://arxiv.org/abs/2006.11239
  DDIM  Song, Meng & Ermon 2021, https://arxiv.org/abs/2010.02502
  Guidance  Dhariwal & Nichol 2021, https://arxiv.org/abs/2105.05233 (Sec. 4.2, Alg. 2: both samplers
            shift eps by the classifier's score; Alg. 1's shift of the DDPM mean by s Sigma grad is not used)

Timestep convention, used everywhere in this project: t is an integer in [0, T-1]; t = 0 is the first
noising step (the paper's t = 1), so alphas_cumprod[t] = prod_{s <= t} (1 - betas[s]) and x_0 is the
clean image. A "previous" step t_prev = -1 means the clean image, with alphas_cumprod[-1] := 1.

``GaussianDiffusion`` holds the noise schedule and the maths only. The network is an argument of every
method that needs it, and guidance arrives as ``cond_fn(x_t, t) -> s * grad_x log p(y | x_t, t)``;
this module knows nothing about classifiers.
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

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def sides(self) -> list:
        """Feature-map side of each level, largest first."""
        return [self.image_size // 2 ** i for i in range(len(self.channel_mult))]

    def attention_problem(self) -> Optional[str]:
        """An attn_resolutions entry that is no level's side (it would add no attention), for a new config; kept
        out of ``check`` so that older checkpoints still load."""
        missing = [r for r in self.attn_resolutions if r not in self.sides]
        if missing:
            return (f"attn_resolutions {missing[0]} is not a feature-map side of this UNet "
                    f"({', '.join(map(str, self.sides))}); pick from those (the middle block always has attention)")
        return None

    def check(self) -> Optional[str]:
        """Return a problem description (for the user) or None."""
        if not self.channel_mult or min(self.channel_mult) < 1:
            return f"channel_mult needs one or more width multipliers, each >= 1, got {self.channel_mult}; e.g. 1,2,2,2"
        f = self.downsample_factor
        if self.image_size < 2 * f or self.image_size % f:
            return (f"image size {self.image_size} must be a multiple of {f} and at least {2 * f} for a UNet "
                    f"with {len(self.channel_mult)} levels; use e.g. {max(2 * f, f * round(self.image_size / f))}")
        if self.base_channels <= 0 or self.num_res_blocks <= 0:
            return "base_channels and num_res_blocks must be > 0"
        if not 0.0 <= self.dropout < 1.0:
            return f"dropout must be in [0, 1), got {self.dropout}"
        return None


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (DDPM App. B; Vaswani et al. 2017 Sec. 3.5). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]                       # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)   # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout (Srivastava et al. 2014): zero each element with probability p, scale the rest by 1/(1-p).

    ``F.dropout`` on accelerators, under torch.compile and for p = 1. In eager mode on the CPU, its
    ``bernoulli_`` mask took 8% of a training step, so there the mask comes from raw generator bits
    instead: each 64-bit draw gives four 15-bit uniforms u, and an element survives when
    u >= round(p * 2^15). It drops with probability p_eff = round(p * 2^15) / 2^15 (0.100006 for 0.1; kept
    below 1) and the survivors are scaled by 1 / (1 - p_eff), so the expectation is the input's. Forward
    plus backward on a 4x128x64x64 bf16 map this is 2.8-4.5x faster than ``F.dropout``
    (benchmarks/layer_paths.py); the 0/1 mask is made in place in the bits' buffer. Which elements drop
    does not depend on the input's dtype; the scale is applied in that dtype (bf16 rounds it, as
    ``F.dropout`` does).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p == 1.0 or torch.compiler.is_compiling():   # Dynamo cannot trace random_;
        return F.dropout(x, p, True)                                           # Inductor fuses F.dropout
    cut = min(round(p * 2 ** 15), 2 ** 15 - 1)                    # p_eff = cut / 2^15, at most 1 - 2^-15
    n = x.numel()
    # random_() on int64 fills bits 0-62; as four int16 per draw, the low 15 bits of each are uniform
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_().view(torch.int16)[:n]
    keep = bits.view(x.shape).bitwise_and_(2 ** 15 - 1).ge_(cut)        # in place: int16 1 (keep) or 0
    return x * keep.to(x.dtype).mul_(2 ** 15 / (2 ** 15 - cut))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added in between, plus a skip. (B,Ci,H,W) -> (B,Co,H,W)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = group_norm(out_ch, groups)
        self.p_drop = dropout
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)   # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def extra_repr(self) -> str:
        return f"p_drop={self.p_drop}"

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]          # (B, Co) -> (B, Co, 1, 1)
        h = self.conv2(dropout(F.silu(self.norm2(h)), self.p_drop, self.training))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map. (B,C,H,W) -> (B,C,H,W).

    q/k/v and the output projection are 1x1 convolutions (their weights, (C', C, 1, 1), are the checkpoint
    format). Two implementations of the same function, picked by device:
      - CUDA (and any other accelerator): the model is channels_last on CUDA (train.py), so the 1x1 conv
        output (which takes its weight's layout: GroupNorm's own output is NCHW on CUDA) viewed as tokens
        (B, HW, 3C) is already contiguous in the head dim, and ``F.scaled_dot_product_attention`` takes a
        fused (flash / memory-efficient) kernel; an NCHW model pays one copy to get there;
      - the CPU: channel-major matrix products, which need no token-major copy at all. On the CPU
        the SDPA kernels lose at these sizes (head dim 16-64, a few hundred tokens): the math kernel wants
        contiguous tokens and checks every row for full masking, the flash kernel's backward is slow, and a
        1x1 convolution's backward costs more in oneDNN than the same matrix product. At the default
        model's 256 channels and 16x16, forward plus backward, this path runs 1.0-1.2x faster than SDPA given
        contiguous q/k/v on 2 CPU cores (benchmarks/layer_paths.py; 1.3-1.6x against the strided views an
        NCHW map gives without a copy), and it needs no token-major copy at all.
    Both compute softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, Eq. 1); tests check they agree.
    """

    def __init__(self, ch: int, num_heads: int = 4, groups: int = 32):
        super().__init__()
        self.num_heads = math.gcd(num_heads, ch)
        self.norm = group_norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_matmul(x) if x.device.type == "cpu" else self.forward_sdpa(x)

    def forward_sdpa(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # with a channels_last qkv conv this is a view, contiguous in the head dim (the fused kernels need
        # that); an NCHW one is copied here, or strided q/k/v would leave SDPA only its math kernel
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous()     # (B,3C,H,W) -> (B, HW, 3C)
        q, k, v = qkv.reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)                # each (B, heads, HW, d)
        h = h.transpose(1, 2).reshape(B, H * W, C).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)

    def forward_matmul(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        heads, d = self.num_heads, C // self.num_heads
        qkv = torch.matmul(self.qkv.weight.flatten(1), self.norm(x).flatten(2))      # (3C,C) @ (B,C,HW) -> (B,3C,HW)
        qkv = qkv + self.qkv.bias[:, None]            # float32 bias: under bf16 autocast the sum is float32
        q, k, v = qkv.view(B, 3, heads, d, H * W).unbind(1)                           # each (B, heads, d, HW)
        # Eq. 1 transposed, keys on rows: A^T = softmax over keys of K Q^T / sqrt(d), then O^T = V^T A^T
        logits_t = torch.matmul(k.transpose(-1, -2), q * d ** -0.5)                  # (B, heads, HW_k, HW_q)
        h = torch.matmul(v, logits_t.softmax(dim=-2))                                 # (B, heads, d, HW_q)
        h = torch.matmul(self.proj.weight.flatten(1), h.reshape(B, C, H * W))         # (C,C) @ (B,C,HW)
        return x + (h + self.proj.bias[:, None]).view(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):                                          # (B,C,H,W) -> (B,C,H/2,W/2)
        return self.conv(x)


# Nearest x2 upsampling followed by a 3x3 conv is one transposed conv (stride 2, padding 1, 4x4 kernel).
# Along one axis, output row 2i + a of the conv over the upsampled map reads input rows i-1, i, i (a = 0) or
# i, i, i+1 (a = 1), the taps of the repeated row summed: (w0, w1 + w2) on rows (i-1, i) and (w0 + w1, w2)
# on rows (i, i+1). A transposed conv with stride 2 and padding 1 sends input row r to output row 2r - 1 + k
# through its tap k, so those are taps k = 3, 1 (a = 0) and k = 2, 0 (a = 1). Row k of _UPSAMPLE_TAPS is
# tap k as a sum of (w0, w1, w2).
_UPSAMPLE_TAPS = torch.tensor([[0., 0., 1.], [0., 1., 1.], [1., 1., 0.], [1., 0., 0.]])     # (4 taps, 3)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv. (B,C,H,W) -> (B,C,2H,2W).

    Two implementations of the same function, with the same weights:
      - ``forward_direct``: upsample, then convolve: 9 taps at each of the 4HW output pixels, 36 per
        input pixel;
      - ``forward_transposed``: one transposed conv of the input with the 3x3 kernel folded into 4x4
        (``_UPSAMPLE_TAPS``): each output pixel only sees 2x2 input pixels, so 16 taps per input pixel,
        2.25x fewer FLOPs. (The same count as a sub-pixel conv, which a stride-2 transposed conv is:
        Shi et al. 2016, https://arxiv.org/abs/1609.07009.)
    The CPU takes the transposed form at input sides of TRANSPOSED_MIN_SIDE and up. Forward plus backward
    with 256 channels at batch 4 (benchmarks/layer_paths.py, 2 CPU cores) it is 1.9-2.1x faster at 32 -> 64
    px, the default model's largest conv (165-174 -> 81-93 ms), 1.2-1.5x at 16 -> 32 px, and slower at
    8 -> 16 px (0.6-0.8x). The 16 px case stays on the direct form: it saves under 1% of a default-model
    step (about 12 of 1,600 ms), and the 32x32 toyfaces models keep the exact arithmetic that the README's
    figures were measured with.
    Accelerators keep the direct form until it is measured there (the same benchmark with --device
    cuda). Tests check that both forms agree.
    """

    TRANSPOSED_MIN_SIDE = 32

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    @classmethod
    def takes_transposed(cls, device: torch.device, side: int) -> bool:
        """Whether an input of this smallest side on this device runs ``forward_transposed``."""
        return device.type == "cpu" and side >= cls.TRANSPOSED_MIN_SIDE

    def forward(self, x):                                          # (B,C,H,W) -> (B,C,2H,2W)
        if self.takes_transposed(x.device, min(x.shape[-2:])):
            return self.forward_transposed(x)
        return self.forward_direct(x)

    def forward_direct(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))

    def forward_transposed(self, x):
        w = self.conv.weight                                                     # (Co, C, 3, 3)
        taps = _UPSAMPLE_TAPS.to(w)
        with torch.autocast(x.device.type, enabled=False):      # fold in the weight's dtype; the conv casts once
            w4 = torch.einsum("py,oiyx,qx->iopq", taps, w, taps)                 # (C, Co, 4, 4): transposed layout
        return F.conv_transpose2d(x, w4, self.conv.bias, stride=2, padding=1)   # (B,C,H,W) -> (B,Co,2H,2W)


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise in x_t. (B,3,S,S), (B,) int -> (B,3,S,S)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        problem = cfg.check()
        if problem:
            raise ValueError(problem)
        self.cfg = cfg
        ch, g = cfg.base_channels, cfg.groups
        temb_dim = 4 * ch
        self.temb_mlp = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        # encoder: remember the width of every activation that is handed to the decoder as a skip
        self.down = nn.ModuleList()
        skip_chs, cur, res = [ch], ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out = ch * mult
                self.down.append(self._block(cur, out, temb_dim, res))
                cur = out
                skip_chs.append(cur)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(Downsample(cur))
                res //= 2
                skip_chs.append(cur)

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_dim, cfg.dropout, g), AttnBlock(cur, cfg.num_heads, g),
                                  ResBlock(cur, cur, temb_dim, cfg.dropout, g)])

        # decoder: one more block per level than the encoder, each eating one skip
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                out = ch * mult
                self.up.append(self._block(cur + skip_chs.pop(), out, temb_dim, res))
                cur = out
            if level != 0:
                self.up.append(Upsample(cur))
                res *= 2
        assert not skip_chs

        self.norm_out = group_norm(cur, g)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _block(self, in_ch, out_ch, temb_dim, res):
        cfg = self.cfg
        layers = [ResBlock(in_ch, out_ch, temb_dim, cfg.dropout, cfg.groups)]
        if res in cfg.attn_resolutions:
            layers.append(AttnBlock(out_ch, cfg.num_heads, cfg.groups))
        return nn.ModuleList(layers)

    @staticmethod
    def _run(block, h, temb):
        if isinstance(block, (Downsample, Upsample)):
            return block(h)
        for layer in block:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb_mlp(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))   # (B,) -> (B, 4*ch)
        h = self.conv_in(x)                                                   # (B,3,S,S) -> (B,ch,S,S)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, temb)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for block in self.up:
            if not isinstance(block, Upsample):
                h = torch.cat([h, hs.pop()], dim=1)                          # (B,C,H,W) -> (B,C+Cskip,H,W)
            h = self._run(block, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))                       # (B,ch,S,S) -> (B,3,S,S)


# ----------------------------------------------------------------------------------------------
# Diffusion

CondFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    beta_start: float = 1e-4          # DDPM Sec. 4: linear schedule from 1e-4 to 0.02 over T = 1000
    beta_end: float = 0.02


def extract(a: torch.Tensor, t: torch.Tensor, shape) -> torch.Tensor:
    """Per-sample coefficients a[t], broadcastable to ``shape``: (B,) -> (B, 1, 1, 1). ``a`` is a schedule table
    already on t's device (``GaussianDiffusion.table``); callers cast the final coefficient to the image dtype."""
    return a[t].reshape(t.shape[0], *([1] * (len(shape) - 1)))


class GaussianDiffusion:
    """Linear-beta Gaussian diffusion: forward noising, the eps-MSE loss, and DDPM / DDIM samplers."""

    def __init__(self, cfg: DiffusionConfig = DiffusionConfig()):
        self.cfg = cfg
        T = self.num_timesteps = cfg.timesteps
        betas = np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float64)     # tables in float64
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        f64 = lambda a: torch.tensor(a, dtype=torch.float64)
        self.betas = f64(betas)
        self.alphas_cumprod = f64(alphas_cumprod)
        # index t+1 of this table is alphas_cumprod[t]; index 0 is the clean image (alphas_cumprod[-1] := 1)
        self._ac_with_one = f64(np.append(1.0, alphas_cumprod))
        self.sqrt_alphas_cumprod = f64(np.sqrt(alphas_cumprod))
        self.sqrt_one_minus_alphas_cumprod = f64(np.sqrt(1.0 - alphas_cumprod))
        # q(x_{t-1} | x_t, x_0) = N(mean, posterior_variance)                     DDPM Eq. 6-7
        self.posterior_variance = f64(betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        self.posterior_mean_coef1 = f64(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        self.posterior_mean_coef2 = f64((1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod))
        self._on_device = {}

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """The schedule table ``self.<name>`` on ``device``, copied there once and kept: a host-to-device copy
        in every step would make the host wait for the GPU each time. float64 (float32 on MPS, which has no
        float64), so the coefficient arithmetic stays exact until the final cast to the image dtype."""
        key = (name, str(device))
        if key not in self._on_device:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._on_device[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._on_device[key]

    def coef(self, name: str, t: torch.Tensor, shape) -> torch.Tensor:
        """self.<name>[t] for the batch of timesteps t (B,), as (B, 1, 1, 1): ``extract`` on t's device."""
        return extract(self.table(name, t.device), t, shape)

    def alpha_bar(self, t: torch.Tensor, shape) -> torch.Tensor:
        """alphas_cumprod[t] for t in [-1, T-1], broadcastable to shape."""
        return self.coef("_ac_with_one", t + 1, shape)

    # -- forward process ----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.                                 DDPM Eq. 4"""
        return (self.coef("sqrt_alphas_cumprod", t, x0.shape).to(x0.dtype) * x0
                + self.coef("sqrt_one_minus_alphas_cumprod", t, x0.shape).to(x0.dtype) * noise)

    def q_jump(self, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_s) for s < t: sqrt(a) x_s + sqrt(1 - a) eps with a = abar_t / abar_s (s = -1: x_s = x_0).
        From DDPM Eq. 4 at s and at t; q_sample is the case s = -1."""
        a = self.alpha_bar(t, x_s.shape) / self.alpha_bar(s, x_s.shape)
        return a.sqrt().to(x_s.dtype) * x_s + (1 - a).sqrt().to(x_s.dtype) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t-1} | x_t, x_0).                                   DDPM Eq. 6-7"""
        mean = (self.coef("posterior_mean_coef1", t, x_t.shape).to(x_t.dtype) * x0
                + self.coef("posterior_mean_coef2", t, x_t.shape).to(x_t.dtype) * x_t)
        return mean, self.coef("posterior_variance", t, x_t.shape).to(x_t.dtype)

    def training_loss(self, model: nn.Module, x0: torch.Tensor, t: Optional[torch.Tensor] = None,
                      noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L_simple = E ||eps - eps_theta(x_t, t)||^2 with t uniform.                     DDPM Alg. 1, Eq. 14"""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        eps = model(self.q_sample(x0, t, noise), t)
        return F.mse_loss(eps.float(), noise)

    # -- reverse process ----------------------------------------------------------------------
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).                    DDPM Eq. 4 solved for x_0"""
        abar = self.alpha_bar(t, x_t.shape)
        return (x_t - (1 - abar).sqrt().to(x_t.dtype) * eps) * (1 / abar.sqrt()).to(x_t.dtype)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        abar = self.alpha_bar(t, x_t.shape)
        return (x_t - abar.sqrt().to(x_t.dtype) * x0) * (1 / (1 - abar).sqrt()).to(x_t.dtype)

    def guided_eps_x0(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                      cond_fn: Optional[CondFn] = None, clip: bool = True):
        """The network's eps, shifted by the classifier's score, and the x_0 it implies.

        eps_hat = eps_theta(x_t, t) - sqrt(1 - abar_t) * s * grad log p(y | x_t, t)
                                        (Dhariwal & Nichol 2021, Sec. 4.2 / Alg. 2; cond_fn returns s * grad)
        Used by both samplers, so a guidance scale means the same for DDPM and DDIM.

        Order: the shift comes before x_0 is clipped to [-1, 1], and eps is then recomputed from the clipped
        x_0, so eps, x_0 and x_t always agree. openai/guided-diffusion (``condition_score``) clips first,
        shifts after and leaves the shifted x_0 unclipped. The shift moves x_0 by (1 - abar_t) / sqrt(abar_t)
        * s * grad, large at large t, and where that leaves [-1, 1] the clip keeps only part of it. So a scale
        here is not the paper's scale for the same effect; compare scales within this code only.
        """
        with torch.no_grad():
            eps = model(x_t, t).float()
        if cond_fn is not None:
            eps = eps - (1 - self.alpha_bar(t, x_t.shape)).sqrt().float() * cond_fn(x_t, t).float()
        x0 = self.predict_x0(x_t, t, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = self.predict_eps(x_t, t, x0)       # keep eps consistent with the clipped x_0
        return eps, x0

    def p_sample(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                 cond_fn: Optional[CondFn] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t_prev} ~ q(x_{t_prev} | x_t, x0_hat).           DDPM Alg. 2

        Variance: the posterior variance beta_tilde (DDPM Sec. 3.2, sigma^2 = beta_tilde). With
        t_prev = t - 1 this is exactly DDPM Eq. 6-7; with a skipped schedule it is the same posterior
        for beta' = 1 - abar_t / abar_{t_prev} (Nichol & Dhariwal 2021, Sec. 4).
        """
        _, x0 = self.guided_eps_x0(model, x_t, t, cond_fn)
        abar, abar_prev = self.alpha_bar(t, x_t.shape), self.alpha_bar(t_prev, x_t.shape)
        beta = 1 - abar / abar_prev
        coef_x0 = (abar_prev.sqrt() * beta / (1 - abar)).to(x_t.dtype)                      # DDPM Eq. 7
        coef_xt = ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)).to(x_t.dtype)
        mean = coef_x0 * x0 + coef_xt * x_t
        var = (beta * (1 - abar_prev) / (1 - abar)).to(x_t.dtype)                      # beta_tilde, DDPM Eq. 7
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        nonzero = (t_prev >= 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))          # no noise into x_0
        return mean + nonzero * var.sqrt() * noise

    def ddim_sample(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                    eta: float = 0.0, cond_fn: Optional[CondFn] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One DDIM step x_t -> x_{t_prev}.                                              DDIM Eq. 12

        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
        sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev).   DDIM Eq. 16
        eta = 0 is deterministic; eta = 1 on the full schedule is DDPM with beta_tilde.
        """
        eps, x0 = self.guided_eps_x0(model, x_t, t, cond_fn)
        abar, abar_prev = self.alpha_bar(t, x_t.shape), self.alpha_bar(t_prev, x_t.shape)
        sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        x_prev = (abar_prev.sqrt().to(x_t.dtype) * x0
                  + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt().to(x_t.dtype) * eps)
        if eta > 0:
            x_prev = x_prev + sigma.to(x_t.dtype) * torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return x_prev

    @torch.no_grad()
    def ddim_invert(self, model: nn.Module, x0: torch.Tensor, t_start: int, steps: Optional[int] = None,
                    progress: bool = False) -> torch.Tensor:
        """Deterministic DDIM encoding x_0 -> x_{t_start}: DDIM Eq. 12 with eta = 0 run forwards in time
        (Song et al. 2021, Sec. 4.3), x_{t'} = sqrt(abar_{t'}) x0_hat(x_t, t) + sqrt(1 - abar_{t'}) eps_theta(x_t, t)
        over the same timesteps ``sample`` walks back down, so DDIM (eta = 0) from the result reconstructs
        x_0 up to discretisation error: an edit starts from the input's own noise, not a fresh draw."""
        seq = self.timestep_sequence(steps, t_start)[::-1]                  # ascending: 0, ..., t_start
        seq = [0] + seq if seq and seq[0] != 0 else seq                     # one step: 0 -> t_start
        x, B = x0, x0.shape[0]
        for t, t_next in tqdm(list(zip(seq[:-1], seq[1:])), desc="ddim inversion", disable=not progress, leave=False):
            tt = torch.full((B,), t, device=x.device, dtype=torch.long)
            tn = torch.full((B,), t_next, device=x.device, dtype=torch.long)
            eps = model(x, tt).float()
            x0_hat = self.predict_x0(x, tt, eps)
            x = (self.alpha_bar(tn, x.shape).sqrt().to(x.dtype) * x0_hat
                 + (1 - self.alpha_bar(tn, x.shape)).sqrt().to(x.dtype) * eps)                   # DDIM Eq. 12
        return x

    def timestep_sequence(self, steps: Optional[int] = None, t_start: Optional[int] = None) -> list:
        """Descending timesteps from t_start (default T-1) to 0, ``steps`` of them evenly spaced over the
        full schedule (so a partial run from t_start < T-1 takes a proportional share of them); a share of one
        step is [t_start] alone, x_{t_start} -> x0_hat."""
        T = self.num_timesteps
        t_start = T - 1 if t_start is None else int(t_start)
        if t_start < 0:
            return []
        steps = T if steps is None else int(steps)
        n = max(1, math.ceil(steps * (t_start + 1) / T))
        if n == 1:                      # one step: x_{t_start} -> x0_hat directly (linspace(0, t, 1) would be [0])
            return [t_start]
        seq = np.unique(np.round(np.linspace(0, t_start, n)).astype(np.int64))
        return [int(s) for s in seq[::-1]]

    def sample(self, model: nn.Module, shape, *, sampler: str = "ddim", steps: Optional[int] = None,
               eta: float = 0.0, cond_fn: Optional[CondFn] = None, generator: Optional[torch.Generator] = None,
               x_t: Optional[torch.Tensor] = None, t_start: Optional[int] = None,
               known: Optional[tuple] = None, resample: int = 1, device=None, progress: bool = True) -> torch.Tensor:
        """Run the reverse process from x_{t_start} (default: pure noise at T-1) down to x_0.

        :param model: eps_theta(x_t, t); never stored.
        :param shape: (B, C, H, W) of the batch.
        :param sampler: "ddpm" (ancestral, DDPM Alg. 2) or "ddim" (DDIM Eq. 12 with ``eta``).
        :param steps: number of steps over the full schedule (default: all T).
        :param cond_fn: guidance, cond_fn(x_t, t) -> s * grad log p(y | x_t, t), same shape as x_t.
        :param x_t: start here instead of noise (counterfactuals: x_t = q_sample(x_0, t_start, eps)).
        :param known: (mask, x0_known), mask (B,1,H,W) in [0, 1] and x0_known (B,C,H,W): only where mask = 1
            is generated; elsewhere every x_{t_prev} is replaced by q_sample(x0_known, t_prev) with fresh
            noise, and x_0 by x0_known itself (RePaint, Lugmayr et al. 2022, Eq. 8-10).
        :param resample: with ``known``, RePaint's resampling: each step is taken ``resample`` times, going back
            from x_{t_prev} to x_t by the forward process in between (jump length 1), so the generated region
            can agree with the known one (RePaint Alg. 1, U = resample). 1: no resampling.
        :returns: x_0 samples in [-1, 1], shape ``shape``.
        """
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}")
        device = device or next(model.parameters()).device
        if x_t is None:
            x_t = torch.randn(shape, generator=generator, device=device)
        seq = self.timestep_sequence(steps, t_start)
        B = shape[0]
        for i, t in enumerate(tqdm(seq, desc=f"{sampler} sampling", disable=not progress, leave=False)):
            t_prev = seq[i + 1] if i + 1 < len(seq) else -1
            tt = torch.full((B,), t, device=device, dtype=torch.long)
            tp = torch.full((B,), t_prev, device=device, dtype=torch.long)
            rounds = resample if known is not None and t_prev >= 0 else 1
            for u in range(rounds):
                if sampler == "ddpm":
                    x_prev = self.p_sample(model, x_t, tt, tp, cond_fn, generator)
                else:
                    x_prev = self.ddim_sample(model, x_t, tt, tp, eta, cond_fn, generator)
                if known is not None:
                    mask, x0_known = known
                    x_known = x0_known if t_prev < 0 else self.q_sample(
                        x0_known, tp, torch.randn(x_t.shape, generator=generator, device=device, dtype=x_t.dtype))
                    x_prev = mask * x_prev + (1 - mask) * x_known                 # RePaint Eq. 10
                if u + 1 < rounds:                                                # RePaint Alg. 1, line 9
                    x_t = self.q_jump(x_prev, tp, tt, torch.randn(x_t.shape, generator=generator, device=device,
                                                                  dtype=x_t.dtype))
            x_t = x_prev
        return x_t.clamp(-1, 1)
