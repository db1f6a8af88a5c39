"""Attribute classifiers: the noise-aware guide, the clean-image oracle, and guidance built from the guide.

- ``NoisyClassifier`` p_phi(a | x_t, t): every attribute of the dataset (multi-label), sees noisy images and
  the timestep, trained on q_sample(x_0, t) with t uniform over the schedule, so its gradient at step t of
  the reverse process means something (Dhariwal & Nichol 2021, Sec. 4.1, https://arxiv.org/abs/2105.05233).
  One attribute, ``target_index``, is the one it steers; the others let an edit hold them (``make_cond_fn``).
- ``Oracle``: a clean-image classifier over every attribute, with a different architecture (plain
  conv-BatchNorm-ReLU, no timestep) and seed. It never steers; it judges whether a counterfactual flipped the
  target and which other attributes changed (as DiME / ACE evaluate).
- ``make_cond_fn``: s * grad_x log p_phi(y | x_t, t), the function the samplers take as ``cond_fn``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion_model import Downsample, ResBlock, TimestepSequential, group_norm, timestep_embedding


@dataclass
class ClassifierConfig:
    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple = (1, 2, 2, 4)   # one level per entry, halving the resolution between levels
    num_res_blocks: int = 1
    num_outputs: int = 40                # every attribute of the dataset
    target_index: int = 31               # the output the guide steers (CelebA's Smiling)

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)


class NoisyClassifier(nn.Module):
    """Attribute logits of x_t: the UNet's encoder with a pooled linear head. (B,3,S,S), (B,) -> (B,A)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        ch, temb_dim = cfg.base_channels, 4 * cfg.base_channels
        self.temb_mlp = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        layers, cur = [], ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cur, ch * mult, temb_dim))
                cur = ch * mult
            if level != len(cfg.channel_mult) - 1:
                layers.append(Downsample(cur))                     # (B,C,H,W) -> (B,C,H/2,W/2)
        self.blocks = TimestepSequential(*layers)
        self.norm_out = group_norm(cur)
        self.head = nn.Linear(cur, cfg.num_outputs)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb_mlp(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))
        h = self.blocks(self.conv_in(x), temb)                     # (B,3,S,S) -> (B,C,s,s)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))   # (B,C,s,s) -> (B,C) -> (B,A)


def log_prob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y | x) of binary logits for targets y in [0, 1] (0/1 labels, or probabilities: then it is the
    expected log-likelihood, y log sigmoid(l) + (1 - y) log sigmoid(-l)). Same shape as logits."""
    return -F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none")


def make_cond_fn(classifier: NoisyClassifier, target, guidance_scale, keep=None, keep_weight: float = 0.0):
    """Classifier guidance as a function for the samplers.                     Dhariwal & Nichol 2021, Sec. 4.2

    :param target: 0/1, or a (B,) tensor of them: the value the steered attribute should take.
    :param guidance_scale: s >= 0, a float or a (B,) tensor (one scale per sample).
    :param keep: None, or (B, A) probabilities of every attribute to hold (the guide's own on the inputs):
        the guided log-probability becomes log p(y | x_t)
            + keep_weight * mean_{j != target} [p_j log p(a_j = 1 | x_t) + (1 - p_j) log p(a_j = 0 | x_t)],
        a product of experts whose soft targets keep the other attributes as the input had them; the mean over
        the held attributes makes the weight mean the same with 4 or 39 of them.
    :returns: cond_fn(x_t, t) -> s * grad_{x_t} log p_phi(y | x_t, t), shape of x_t.
    """
    k, on_device = classifier.cfg.target_index, {}         # the constants, moved to the sampler's device once

    def constants(device):
        if device not in on_device:
            held = torch.tensor([j for j in range(classifier.cfg.num_outputs) if j != k], device=device)
            on_device[device] = (torch.as_tensor(target, device=device, dtype=torch.float32),
                                 torch.as_tensor(guidance_scale, device=device, dtype=torch.float32),
                                 None if keep is None else keep.to(device)[:, held], held)
        return on_device[device]

    def cond_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y, s, kept, held = constants(x_t.device)
        device = x_t.device.type              # a confident guide's gradient underflows in fp16: fp32 there instead
        fp16 = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device) and \
            torch.get_autocast_dtype(device) == torch.float16
        with torch.enable_grad(), torch.autocast(device, enabled=False) if fp16 else contextlib.nullcontext():
            x_in = x_t.detach().requires_grad_(True)
            logits = classifier(x_in, t).float()                               # (B, A)
            lp = log_prob(logits[:, k], y.expand(x_t.shape[0]))                # (B,)
            if kept is not None and keep_weight > 0:
                lp = lp + keep_weight * log_prob(logits[:, held], kept).mean(1)   # (B, A-1) -> (B,)
            grad = torch.autograd.grad(lp.sum(), x_in)[0]                      # (B,3,S,S)
        return s.expand(x_t.shape[0]).reshape(-1, 1, 1, 1) * grad.float()

    return cond_fn


@dataclass
class OracleConfig:
    image_size: int = 64
    num_attributes: int = 40
    in_channels: int = 3
    width: int = 32            # channels of the first stage, doubled at each later stage
    max_stages: int = 4        # conv stages, each halving the resolution (fewer for small images)
    dropout: float = 0.3


class Oracle(nn.Module):
    """Multi-attribute logits of a clean image: VGG-style conv-BN-ReLU stages. (B,3,S,S) -> (B,A).
    ``features`` gives the pooled last stage, (B,3,S,S) -> (B,C): evaluate.py's feature space without Inception."""

    def __init__(self, cfg: OracleConfig):
        super().__init__()
        self.cfg = cfg
        stages = max(1, min(cfg.max_stages, int(math.log2(cfg.image_size)) - 2))   # stop at >= 4x4
        layers, cur = [], cfg.in_channels
        for i in range(stages):
            out = cfg.width * 2 ** i
            layers += [nn.Conv2d(cur, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]                             # (B,C,H,W) -> (B,2C,H/2,W/2) per stage
            cur = out
        self.stages = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cur, cfg.num_attributes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x).mean(dim=(2, 3))                     # (B,C,s,s) -> (B,C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))                         # (B,C) -> (B,A)
