"""Attribute classifiers: the noise-aware guide, the clean-image oracle, and guidance built from the guide.

- ``NoisyClassifier`` p_phi(y | x_t, t): binary (attribute present / absent), sees noisy images and the
  timestep, trained on q_sample(x_0, t) with t uniform over the schedule, so its gradient at step t of
  the reverse process means something (Dhariwal & Nichol 2021, Sec. 4.1, https://arxiv.org/abs/2105.05233).
  A classifier trained only on clean images gives near-random gradients on the noisy x_t the sampler
  actually holds.
- ``Oracle``: a clean-image classifier over *all* the dataset's attributes, with a different architecture
  (plain conv-BatchNorm-ReLU, no timestep) and seed. It never steers; it judges whether a counterfactual
  flipped the target and which other attributes changed (as DiME / ACE evaluate).
- ``make_cond_fn``: s * grad_x log p_phi(y | x_t, t), the function the samplers take as ``cond_fn``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion_model import Downsample, ResBlock, group_norm, timestep_embedding


@dataclass
class ClassifierConfig:
    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple = (1, 2, 2, 4)   # one level per entry, halving the resolution between levels
    num_res_blocks: int = 1
    dropout: float = 0.0
    num_outputs: int = 1       # 1: the steered attribute only; A: every attribute (train.py --guide_all_attributes)
    target_index: int = 0      # the output column of the steered attribute

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)


class NoisyClassifier(nn.Module):
    """Logit of p(y=1 | x_t, t): the UNet's encoder with a pooled linear head. (B,3,S,S), (B,) -> (B,).

    With ``num_outputs`` = A it learns every attribute; ``forward`` still returns the steered one (column
    ``target_index``), and ``all_outputs=True`` all of them, (B, A), for guidance that holds the others.
    """

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        temb_dim = 4 * ch
        self.temb_mlp = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList()
        cur = ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(ResBlock(cur, ch * mult, temb_dim, cfg.dropout))
                cur = ch * mult
            if level != len(cfg.channel_mult) - 1:
                self.blocks.append(Downsample(cur))
        self.norm_out = group_norm(cur)
        self.head = nn.Linear(cur, cfg.num_outputs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, all_outputs: bool = False) -> torch.Tensor:
        temb = self.temb_mlp(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))
        h = self.conv_in(x)                                        # (B,3,S,S) -> (B,ch,S,S)
        for block in self.blocks:
            h = block(h, temb) if isinstance(block, ResBlock) else block(h)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))              # (B,C,s,s) -> (B,C)
        logits = self.head(h)                                      # (B,C) -> (B,A)
        return logits if all_outputs else logits[:, self.cfg.target_index]          # (B,A) -> (B,)


def log_prob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y | x) for a binary logit: log sigmoid(logit) for y = 1, log sigmoid(-logit) for y = 0."""
    return F.logsigmoid(torch.where(y.bool(), logits, -logits))


def make_cond_fn(classifier: nn.Module, target_labels, guidance_scale, keep=None, keep_weight: float = 1.0):
    """Classifier guidance as a function for the samplers.        Dhariwal & Nichol 2021, Sec. 4.2 / Alg. 2

    :param target_labels: int, or (B,) tensor of 0/1 targets.
    :param guidance_scale: s >= 0, a float or a (B,) tensor (one scale per sample).
    :param keep: None, or (B, A) 0/1 values of every attribute to hold (a guide with A outputs): the
        guided log-probability becomes log p(y | x_t) + keep_weight * sum_{j != target} log p(a_j = keep_j | x_t),
        i.e. the product of experts p(y) * prod_j p(a_j)^w, so the edit keeps the other attributes.
    :returns: cond_fn(x_t, t) -> s * grad_{x_t} log p_phi(y | x_t, t), shape of x_t.
    """

    on_device = {}                 # targets, scales and kept values, moved to the sampler's device once

    def constants(device):
        if device not in on_device:
            others = None
            if keep is not None:                 # the held attributes: every output but the steered one
                k = classifier.cfg.target_index
                others = torch.tensor([j for j in range(keep.shape[1]) if j != k], device=device)
            on_device[device] = (torch.as_tensor(target_labels, device=device),
                                 torch.as_tensor(guidance_scale, device=device, dtype=torch.float32),
                                 None if keep is None else keep.to(device)[:, others], others)
        return on_device[device]

    def cond_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y, s, kept, others = constants(x_t.device)
        y = y.expand(x_t.shape[0])
        s = s.expand(x_t.shape[0]).reshape(-1, *([1] * (x_t.dim() - 1)))        # (B,) -> (B,1,1,1)
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            if keep is None:
                lp = log_prob(classifier(x_in, t).float(), y)                   # (B,)
            else:
                logits = classifier(x_in, t, all_outputs=True).float()         # (B, A)
                lp = (log_prob(logits[:, classifier.cfg.target_index], y)
                      + keep_weight * log_prob(logits[:, others], kept).sum(1))   # (B, A-1) -> (B,)
            grad = torch.autograd.grad(lp.sum(), x_in)[0]                       # (B,3,S,S)
        return s * grad.float()

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
    """Multi-attribute logits of a clean image: VGG-style conv-BN-ReLU stages. (B,3,S,S) -> (B,A)."""

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
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cur, cfg.num_attributes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean(dim=(2, 3))                      # (B,C,s,s) -> (B,C)
        return self.head(h)                                        # (B,C) -> (B,A)
