"""Generate faces toward an attribute, or counterfactuals of given faces, and judge them independently.

Sample from noise (at the measured default scale):
    python generate.py --target_label 1 --num_samples 16
    python generate.py --target_label 0 --num_samples 16
    python generate.py --no_guidance --num_samples 16
Counterfactuals of given images (the same face, changed in the attribute; the measured recipe by default):
    python generate.py --input face.jpg photos/ --target_label 1
    python generate.py --from_dataset 64 --target_label 0          # N test images whose label is not the target
All models come from the checkpoint files (see train.py); e.g. --diffusion_model runs/toyfaces/diffusion_final.pth.

Writes --output (grid PNG), a folder named after its stem with one PNG per sample, and <stem>.json with the
arguments, per-sample probabilities, the summary and the network calls per image.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from classifier import ClassifierConfig, NoisyClassifier, Oracle, OracleConfig, make_cond_fn
from common import (PRECISION_HELP, PRECISIONS, ArgumentParser, UserError, amp_dtype, atomic_save, autocast,
                    check_positive, check_scales, check_seed, ensure_writable_dir, grid_image, load_checkpoint,
                    memory_format_for, refuse_folder, resolve_device, run_main, to_json, to_uint8)
from dataset import load_image_file, load_split, to_float
from diffusion_model import SAMPLERS, DiffusionConfig, GaussianDiffusion, UNet, UNetConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
RUN_FILES = ("diffusion_final.pth", "classifier_best.pth", "oracle_best.pth")     # what a train.py run leaves
# The defaults, measured on toyfaces with the usual guide and with one held at a real guide's accuracy
# (docs/results.md): a single scale for samples from noise; for counterfactuals a ladder of scales, each image
# taking the first at which the guide calls it flipped (as DiME), from the input's DDIM inversion, with
# localisation and preservation.
SAMPLE_DEFAULTS = {"guidance_scale": [60.0], "sampler": "ddpm", "steps": 100}
EDIT_DEFAULTS = {"guidance_scale": [30.0, 60.0, 120.0], "sampler": "ddim", "steps": 20, "strength": 0.5,
                 "preserve": 1.0}


def get_parser() -> ArgumentParser:
    p = ArgumentParser(__doc__)
    p.add_argument("--diffusion_model", default="diffusion_final.pth", help="diffusion checkpoint from train.py")
    p.add_argument("--classifier_model", default="classifier_best.pth", help="guiding classifier checkpoint")
    p.add_argument("--oracle_model", default=None,
                   help="independent judge (default: oracle_best.pth beside the classifier/diffusion model, if there)")
    p.add_argument("--num_samples", type=int, default=16, help="samples to draw from noise (per guidance scale)")
    p.add_argument("--guidance_scale", type=float, nargs="+", default=None, help="classifier guidance scale s. "
                   f"Samples: one row per scale (default {SAMPLE_DEFAULTS['guidance_scale'][0]:g}); counterfactuals: a "
                   f"ladder, tried from the smallest, each image taking the first scale the guide calls flipped "
                   f"(default {' '.join(f'{s:g}' for s in EDIT_DEFAULTS['guidance_scale'])})")
    p.add_argument("--target_label", type=int, default=1, choices=(0, 1), help="1: attribute present, 0: absent")
    p.add_argument("--output", default="generated_samples.png", help="grid image path; per-sample PNGs go in a "
                                                                      "folder named after its stem")
    p.add_argument("--no_guidance", action="store_true", help="sample without classifier guidance")
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help="ddpm (ancestral), ddim (deterministic) or "
                   f"dpmpp2m (DPM-Solver++(2M)); default {SAMPLE_DEFAULTS['sampler']} for samples, "
                   f"{EDIT_DEFAULTS['sampler']} for counterfactuals")
    p.add_argument("--steps", type=int, default=None, help="network calls over the full schedule (a counterfactual "
                   f"takes its share); default {SAMPLE_DEFAULTS['steps']} for samples, {EDIT_DEFAULTS['steps']} for "
                   f"counterfactuals")
    p.add_argument("--batch_size", type=int, default=64, help="images per sampling batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--device", default="cuda", help="cuda, cpu, cuda:1, mps (falls back to cpu without CUDA)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    # counterfactuals
    p.add_argument("--input", nargs="+", default=None, help="image files or folders to make counterfactuals of")
    p.add_argument("--from_dataset", type=int, default=None,
                   help="make counterfactuals of N test images whose true label is not the target")
    p.add_argument("--data_root", default=None, help="dataset root for --from_dataset (default: the training one)")
    p.add_argument("--strength", type=float, default=EDIT_DEFAULTS["strength"], help="counterfactual noise level: "
                   "start step t0 = round(strength * T) - 1; 0 returns the input, 1 edits from the full inversion "
                   "(from pure noise with --no_invert)")
    p.add_argument("--no_invert", action="store_true", help="counterfactuals: reach x_t0 by q_sample with fresh "
                   "noise (SDEdit) instead of the default deterministic DDIM inversion (fp32, no clipping, so that it "
                   "round-trips), which the ddim sampler alone takes; the other samplers always start from fresh noise")
    p.add_argument("--no_localize", action="store_true",
                   help="counterfactuals: let the whole image change (by default only where guidance changed it: an "
                        "ACE-style mask from a guided and an unguided run, the rest stays the input pixel for pixel)")
    p.add_argument("--mask_threshold", type=float, default=0.05, help="localisation: smallest guided-vs-unguided "
                   "change (mean |diff| on the [0, 1] scale over 3x3 pixels) that goes into the mask")
    p.add_argument("--preserve", type=float, default=EDIT_DEFAULTS["preserve"], help="counterfactuals: weight of "
                   "the guidance that holds every other attribute at the guide's probabilities on the input (0: off)")
    return p


def check_args(args, given: set) -> bool:
    """Every flag checked before anything is loaded or written (``given``: the flags on the command line);
    -> whether this is a counterfactual run."""
    cf_mode = args.input is not None or args.from_dataset is not None
    for name in ("num_samples", "batch_size", "steps", "from_dataset"):
        check_positive("--" + name, getattr(args, name))
    check_scales("--guidance_scale", args.guidance_scale)                              # 0 means no guidance
    check_positive("--preserve", args.preserve, allow_zero=True)
    check_seed(args.seed)
    if not 0.0 <= args.strength <= 1.0:
        raise UserError(f"--strength must be in [0, 1], got {args.strength}")
    if args.input is not None and args.from_dataset is not None:
        raise UserError("--input and --from_dataset both given; pass one of them")
    if args.no_guidance and cf_mode:
        raise UserError("--no_guidance with --input/--from_dataset would only re-noise and denoise; drop --no_guidance")
    # a flag written out that would do nothing here is a mistake to report: {flag: what it does, if idle}
    sampler = args.sampler or EDIT_DEFAULTS["sampler"]
    idle = {**dict.fromkeys(("strength", "no_localize", "preserve"),
                            not cf_mode and "works on --input/--from_dataset counterfactuals"),
            "no_invert": (not cf_mode or sampler != "ddim") and "turns off the DDIM inversion of ddim counterfactuals",
            "precision": cf_mode and sampler == "ddim" and not args.no_invert and "sets the autocast dtype, but "
                         "counterfactuals from DDIM inversion run in fp32 (add --no_invert for SDEdit)",
            "mask_threshold": (not cf_mode or args.no_localize) and "shapes the localisation mask of counterfactuals",
            "num_samples": cf_mode and ("sets the number of samples from noise; counterfactuals make one per input "
                                        "image"),
            "data_root": args.from_dataset is None and "is where --from_dataset reads the test split",
            "guidance_scale": args.no_guidance and "sets guidance, which --no_guidance turns off"}
    if flag := next((f for f, does in idle.items() if does and f in given), None):
        raise UserError(f"--{flag} {idle[flag]}, so it would do nothing in this run; drop it")
    if not 0.0 <= args.mask_threshold < 1.0:
        raise UserError(f"--mask_threshold must be in [0, 1), got {args.mask_threshold}")
    stem, ext = os.path.splitext(args.output)
    if ext.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--output '{args.output}' must end in .png or .jpg")
    refuse_folder(args.output, "--output")                   # before any work; writability is checked later
    refuse_folder(stem + ".json", "--output's summary")
    earlier = earlier_run(stem + ".json").get("args")
    name = os.path.basename(str(earlier.get("output") or "")) if isinstance(earlier, dict) else ""
    other = os.path.join(os.path.dirname(args.output), name)
    if name and name != os.path.basename(args.output) and os.path.isfile(other):     # same stem, another format
        raise UserError(f"--output '{args.output}' would take over the sample folder and .json of an earlier run's "
                        f"'{other}'; choose another name, or remove '{other}'")
    if os.path.exists(stem) and not os.path.isdir(stem):
        raise UserError(f"--output '{args.output}' needs the sample folder '{stem}', but that is a file; choose "
                        f"another --output or move the file")
    return cf_mode


# ----------------------------------------------------------------------------------------------
# Models from checkpoints

def count_calls(module: torch.nn.Module, with_grad: bool = False) -> dict:
    """{"images": n}: the images that pass through ``module``'s forward (only those with autograd on, for the
    guide's gradient calls), counted by a hook. Divided by the images made, it is the cost papers report."""
    counter = {"images": 0}

    def hook(mod, inputs, output):
        if torch.is_grad_enabled() or not with_grad:
            counter["images"] += inputs[0].shape[0]
    module.register_forward_hook(hook)
    return counter


def load_models(diffusion_path: str, classifier_path: str | None, oracle_path: str | None, device) -> SimpleNamespace:
    """The UNet (EMA weights) and schedule, the guide and the oracle (either may be None), checked to belong
    together; the attribute the guide steers and its column in the oracle; call counters on the UNet and guide."""
    d_ckpt = load_checkpoint(diffusion_path, "diffusion", "--diffusion_model")
    net = UNet(UNetConfig(**d_ckpt["config"]))
    net.load_state_dict(d_ckpt["ema"])                              # sample with the EMA weights
    m = SimpleNamespace(net=net.to(device, memory_format=memory_format_for(device)).eval(), d_ckpt=d_ckpt,
                        diffusion=GaussianDiffusion(DiffusionConfig(**d_ckpt["diffusion"])), guide=None, oracle=None,
                        attribute=d_ckpt["attribute"], attr_names=d_ckpt["attr_names"], target_index=None,
                        oracle_path=oracle_path, device=device)
    if classifier_path is not None:
        c_ckpt = load_checkpoint(classifier_path, "classifier", "--classifier_model")
        check_compatible(d_ckpt, c_ckpt, "--classifier_model")
        m.guide = NoisyClassifier(ClassifierConfig(**c_ckpt["config"]))
        m.guide.load_state_dict(c_ckpt["model"])
        m.guide, m.attribute, m.attr_names = m.guide.to(device).eval(), c_ckpt["attribute"], c_ckpt["attr_names"]
    if oracle_path is not None:
        o_ckpt = load_checkpoint(oracle_path, "oracle", "--oracle_model")
        check_compatible(d_ckpt, o_ckpt, "--oracle_model")
        if m.attribute not in o_ckpt["attr_names"]:
            raise UserError(f"--oracle_model '{oracle_path}' does not know attribute {m.attribute}; "
                            f"use the oracle trained with this model")
        m.oracle = Oracle(OracleConfig(**o_ckpt["config"]))
        m.oracle.load_state_dict(o_ckpt["model"])
        m.oracle, m.target_index = m.oracle.to(device).eval(), o_ckpt["attr_names"].index(m.attribute)
    m.unet_calls = count_calls(m.net)
    m.guide_grads = count_calls(m.guide, with_grad=True) if m.guide is not None else {"images": 0}
    return m


def load_run(run_dir: str, device, classifier_path: str | None = None) -> SimpleNamespace:
    """The three networks of one train.py --output_dir (or another guide), for evaluate.py and the benchmarks."""
    if not os.path.isdir(run_dir):
        raise UserError(f"--run_dir '{run_dir}' is not a folder; pass a train.py --output_dir")
    diffusion, classifier, oracle = (os.path.join(run_dir, f) for f in RUN_FILES)
    return load_models(diffusion, classifier_path or classifier, oracle, device)


def run_split(m, split: str, data_root: str | None = None):
    """A split of the run's dataset with its size, subset and seed, from its cache where that is on this machine."""
    a, d = m.d_ckpt["args"], m.d_ckpt
    if data_root is not None and d["dataset"] == "toyfaces":
        raise UserError("--data_root is where CelebA is read, but this model's toyfaces are drawn; drop --data_root")
    cache = a.get("cache_dir") if os.path.isdir(a.get("cache_dir") or "") else None
    return load_split(d["dataset"], split, d["image_size"], data_root or a.get("data_root", "./data"),
                      a.get("subset_fraction", 0.5), a.get("seed", 0), cache, verbose=False)


def check_compatible(d_ckpt: dict, other: dict, flag: str) -> None:
    """Classifier / oracle and diffusion model must agree on dataset and image size (and schedule, for the guide).
    The attribute may differ: the diffusion model is unconditional, so any guide of its dataset can steer it."""
    if other.get("dataset") != d_ckpt.get("dataset"):
        raise UserError(f"{flag} was trained on {other.get('dataset')} but the diffusion model on "
                        f"{d_ckpt.get('dataset')}; use checkpoints trained on the same dataset")
    if other["image_size"] != d_ckpt["image_size"]:
        raise UserError(f"{flag} was trained on {other['image_size']}x{other['image_size']} images but the diffusion "
                        f"model on {d_ckpt['image_size']}x{d_ckpt['image_size']}; use checkpoints from the same run")
    if "diffusion" in other and other["diffusion"]["timesteps"] != d_ckpt["diffusion"]["timesteps"]:
        raise UserError(f"{flag} was trained on a {other['diffusion']['timesteps']}-step schedule but the diffusion "
                        f"model uses {d_ckpt['diffusion']['timesteps']}; use checkpoints from the same run")


# ----------------------------------------------------------------------------------------------
# Sampling and editing

def generate_images(m, target: int, scale: float, *, n: int = 16, x_t0=None, t_start=None, known=None, keep=None,
                    preserve: float = 0.0, sampler="ddpm", steps=None, clip=True, seed=0, batch_size=64,
                    amp=None) -> torch.Tensor:
    """Samples from noise, or counterfactuals from ``x_t0`` (the encoded inputs at t_start), guided toward ``target``
    at ``scale``; ``known`` (mask (N,1,S,S), x0 (N,3,S,S)) keeps x0 where mask = 0 (RePaint), ``keep`` (N, A) are
    the probabilities that --preserve holds. Batch i's noise comes from seed and i alone. -> (N,3,S,S) on the CPU."""
    size, device = m.net.cfg.image_size, m.device
    total, out = n if x_t0 is None else x_t0.shape[0], []
    for i in range(0, total, batch_size):
        b = min(batch_size, total - i)
        g = torch.Generator(device=device).manual_seed(seed * 100003 + i)
        x_t = torch.randn((b, 3, size, size), generator=g, device=device) if x_t0 is None else x_t0[i:i + b].to(device)
        cond_fn = None if m.guide is None or scale == 0 else make_cond_fn(
            m.guide, target, scale, None if keep is None else keep[i:i + b], preserve)
        kb = None if known is None else tuple(k[i:i + b].to(device) for k in known)
        with amp or autocast(device, None):
            x = m.diffusion.sample(m.net, x_t.shape, sampler=sampler, steps=steps, cond_fn=cond_fn, generator=g,
                                   x_t=x_t, t_start=t_start, known=kb, clip=clip, device=device)
        out.append(x.float().cpu())
    return torch.cat(out)


def encode(m, x0: torch.Tensor, t_start: int, *, invert=False, steps=None, seed=0, batch_size=64) -> torch.Tensor:
    """Inputs x_0 -> x_{t_start}, the start of their counterfactuals; (N,3,S,S) -> (N,3,S,S) on the CPU: q_sample
    with batch i's seeded noise (DDPM Eq. 4, as SDEdit), or deterministic DDIM inversion in fp32."""
    out = []
    for i in range(0, x0.shape[0], batch_size):
        x = x0[i:i + batch_size].to(m.device)
        if invert:
            x_t = m.diffusion.ddim_invert(m.net, x, t_start, steps)
        else:
            # its own stream, not the sampler's (seed * 100003 + i): 2^31 apart even where CPU generators keep 32 bits
            g = torch.Generator(device=m.device).manual_seed(seed * 100003 + i + 2 ** 31)
            t = torch.full((x.shape[0],), t_start, device=m.device, dtype=torch.long)
            x_t = m.diffusion.q_sample(x, t, torch.randn(x.shape, generator=g, device=m.device))
        out.append(x_t.float().cpu())
    return torch.cat(out)


def edit_mask(x_guided: torch.Tensor, x_unguided: torch.Tensor, threshold: float, dilation: int) -> torch.Tensor:
    """Where guidance changed the image, (N,3,S,S) twice -> (N,1,S,S) in {0, 1}: |x_g - x_u| on the [0, 1] scale,
    averaged over channels and a 3x3 window, above ``threshold``, dilated by ``dilation`` pixels (as ACE, Jeanneret
    et al. 2023). Both runs share x_t0 and the sampler's noise, so the difference is guidance's doing."""
    d = (x_guided - x_unguided).abs().mean(1, keepdim=True) / 2                      # (N,1,S,S)
    d = F.avg_pool2d(d, 3, stride=1, padding=1, count_include_pad=False)
    mask = (d > threshold).float()
    return F.max_pool2d(mask, 2 * dilation + 1, stride=1, padding=dilation) if dilation > 0 else mask


@contextlib.contextmanager
def tf32_convolutions(allowed: bool):
    """cuDNN's TF32 convolutions (on by default on Ampere and later) off inside unless ``allowed``; restored after."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = before and allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def make_counterfactuals(m, x_in: torch.Tensor, target: int, scales=None, *, strength=EDIT_DEFAULTS["strength"],
                         localize=True, mask_threshold=0.05, preserve=EDIT_DEFAULTS["preserve"], invert=True,
                         sampler=EDIT_DEFAULTS["sampler"], steps=EDIT_DEFAULTS["steps"], **sample_kw):
    """Counterfactuals of ``x_in`` (N,3,S,S) toward ``target``, by default with the measured recipe: encode to
    t0 = round(strength * T) - 1, then a guided run per scale of the ladder ``scales`` for the images the guide
    does not yet call flipped (as DiME retries). With ``localize`` (ACE-style) each run is compared with an
    unguided one from the same x_t0 and noise, and a second guided run repaints only inside ``edit_mask``: outside
    it the output is the input, pixel for pixel. With ``invert`` and the ddim sampler: x_t0 by DDIM inversion, no
    clipping and fp32 throughout, so that an unguided edit gives the input back; else q_sample (SDEdit).
    ``sample_kw``: seed, batch_size, amp.
    -> (N,3,S,S) counterfactuals, (N,1,S,S) masks (ones without ``localize``, zeros at strength 0), (N,) the scale
    each used (0 at strength 0)."""
    scales, x_in = sorted(EDIT_DEFAULTS["guidance_scale"] if scales is None else scales), x_in.cpu()   # a ladder
    sample_kw.update(sampler=sampler, steps=steps)
    t0, n = round(strength * m.diffusion.num_timesteps) - 1, x_in.shape[0]
    if t0 < 0:                                                # strength 0: the inputs themselves, unguided
        return x_in.clone(), torch.zeros_like(x_in[:, :1]), torch.zeros(n)
    out, masks, used = x_in.clone(), torch.ones_like(x_in[:, :1]), torch.full((n,), float(scales[0]))
    invert = invert and sampler == "ddim"                     # inversion is DDIM's step run forwards
    if invert:                    # fp32: no autocast, and no TF32 convolutions (below), no clipping
        sample_kw.update(clip=False, amp=None)
    keep = guide_probabilities(m, x_in) if preserve > 0 else None        # the soft targets --preserve holds
    with tf32_convolutions(not invert):
        x_t0 = encode(m, x_in, t0, invert=invert, steps=steps, seed=sample_kw.get("seed", 0),
                      batch_size=sample_kw.get("batch_size", 64))
    todo, x_unguided = torch.arange(n), None

    def run(idx, scale, known=None):
        with tf32_convolutions(not invert):
            return generate_images(m, target, scale, x_t0=x_t0[idx], t_start=t0, known=known, preserve=preserve,
                                   keep=None if keep is None else keep[idx], **sample_kw)
    for scale in scales:
        if localize and (x_unguided is None or sampler == "ddpm"):   # DDPM: same subset, same noise
            x_unguided = torch.empty_like(x_in)
            x_unguided[todo] = run(todo, 0.0)
        x = run(todo, scale)
        if localize:
            masks[todo] = edit_mask(x, x_unguided[todo], mask_threshold, max(1, x_in.shape[-1] // 32))
            x = run(todo, scale, known=(masks[todo], x_in[todo]))
        out[todo], used[todo] = x, scale
        flipped = (guide_probabilities(m, x)[:, m.guide.cfg.target_index] > 0.5) == bool(target)
        todo = todo[~flipped]
        if len(todo) == 0:
            break
    return out, masks, used


# ----------------------------------------------------------------------------------------------
# Judging

def p_target(p: torch.Tensor, target: int) -> torch.Tensor:
    """p(attribute present) -> p(the attribute has the target value)."""
    return p if target == 1 else 1 - p


def hit_rate(p: torch.Tensor, target: int) -> float:
    """The share of images whose p(attribute present) puts them on the target's side of 0.5."""
    return ((p > 0.5) == bool(target)).float().mean().item()


@torch.no_grad()
def probabilities(fn, x: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """sigmoid(fn(x)) over batches of clean images x (N,3,S,S) on ``device``. -> (N,A) on the CPU."""
    return torch.cat([torch.sigmoid(fn(x[i:i + batch_size].to(device)).float()).cpu()
                      for i in range(0, x.shape[0], batch_size)])


def guide_probabilities(m, x: torch.Tensor) -> torch.Tensor:
    """The guide's p(attribute present) on clean images, judged at t = 0, the least noisy step it was trained on
    (noise std 0.01). (N,3,S,S) -> (N,A)"""
    return probabilities(lambda b: m.guide(b, torch.zeros(b.shape[0], dtype=torch.long, device=b.device)), x, m.device)


def oracle_probabilities(m, x: torch.Tensor) -> torch.Tensor:
    """The oracle's p(attribute present) for every attribute. (N,3,S,S) -> (N,A)"""
    return probabilities(m.oracle, x, m.device)


def counterfactual_metrics(m, x: torch.Tensor, x_cf: torch.Tensor, target: int, o_before=None, o_after=None,
                           g_after=None) -> dict:
    """Of counterfactuals x_cf of x (both (N,3,S,S) in [-1, 1]): flip rate = share judged to have the target label
    (p > 0.5) by the guide and, when there is one, the oracle; MNAC = mean number of the *other* attributes whose
    oracle decision changed, over every counterfactual (DiME Sec. 5 and ACE's code count the target too, over the
    flipped ones); L1 = mean absolute pixel difference on the [0, 1] scale per image,
    then mean and std."""
    l1 = ((x - x_cf).abs() / 2).flatten(1).mean(1)                               # (N,)
    out = {"n": int(x.shape[0]), "l1_mean": l1.mean().item(), "l1_std": l1.std(unbiased=False).item()}
    if m.guide is not None:
        g_after = guide_probabilities(m, x_cf) if g_after is None else g_after
        out["flip_rate_guide"] = hit_rate(g_after[:, m.guide.cfg.target_index], target)
    if m.oracle is not None:
        o_before = oracle_probabilities(m, x) if o_before is None else o_before
        o_after = oracle_probabilities(m, x_cf) if o_after is None else o_after
        out["flip_rate_oracle"] = hit_rate(o_after[:, m.target_index], target)
        changed = (o_before > 0.5) != (o_after > 0.5)                              # (N,A)
        others = [i for i in range(changed.shape[1]) if i != m.target_index]
        out["mnac"] = changed[:, others].float().sum(1).mean().item()
        out["changed_per_attribute"] = {m.attr_names[i]: changed[:, i].float().mean().item() for i in others}
    return out


# ----------------------------------------------------------------------------------------------
# Inputs and outputs

def list_input_images(paths: list, output: str) -> list:
    """The image files of --input, folders read in name order, checked against --output's files."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise UserError(f"--input folder '{p}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise UserError(f"--input '{p}' does not exist; pass image files or folders")
    # The grid, its .json and its sample folder must not overwrite an --input image or land in an --input folder,
    # where the next run would read them as inputs; nor may an input sit in the sample folder, which a rerun replaces.
    stem = os.path.splitext(output)[0]
    written = {os.path.realpath(p) for p in (output, stem + ".json")}
    into = {os.path.dirname(w) for w in written} | {os.path.realpath(stem)}
    clash = [p for p in paths if os.path.isdir(p) and os.path.realpath(p) in into]
    clash += [f for f in files if os.path.realpath(f) in written
              or os.path.dirname(os.path.realpath(f)) == os.path.realpath(stem)]
    if clash:
        raise UserError(f"--output '{output}' would write over or into --input '{clash[0]}'; "
                        f"choose an --output outside the inputs")
    return files


def dataset_inputs(m, n: int, target: int, split):
    """N images of ``split`` (the run's test split, from ``run_split``) whose true steered attribute is not the
    target. -> (N,3,S,S) in [-1, 1], their names."""
    pick = torch.nonzero(split.attrs[:, m.guide.cfg.target_index] != target).squeeze(1)[:n]
    if len(pick) == 0:
        raise UserError(f"no test images with {m.attribute} != {target}; choose the other --target_label")
    if len(pick) < n:
        print(f"warning: only {len(pick)} test images have {m.attribute} != {target}; using them all")
    return to_float(split.images[pick]), [os.path.splitext(split.names[i])[0] for i in pick.tolist()]


def difference_map(x: torch.Tensor, x_cf: torch.Tensor) -> np.ndarray:
    """Where a counterfactual differs from its input, as a heat map scaled to each image's largest change:
    (N,3,S,S), (N,3,S,S) -> (N,S,S,3) uint8."""
    d = ((x_cf - x).abs().mean(1, keepdim=True) / 2).permute(0, 2, 3, 1).numpy()   # (N,S,S,1) in [0, 1]
    d = d / np.maximum(d.max((1, 2, 3), keepdims=True), 1e-3)
    rgb = np.clip(3 * d - np.array([0, 1, 2], np.float32), 0, 1)                  # black -> red -> yellow -> white
    return (rgb * 255).round().astype(np.uint8)


def earlier_run(json_path: str) -> dict:
    """The .json an earlier run wrote at ``json_path`` ("args", "samples", ...), or {} if there is none to read."""
    try:
        with open(json_path) as f:
            earlier = json.load(f)
        return earlier if isinstance(earlier, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def write_files(folder: str, json_path: str, files: dict) -> None:
    """Write ``files`` {name: (3,S,S) image} into the sample folder, and remove the per-sample images that an
    earlier run with the same --output listed in its .json and this run does not write."""
    try:
        earlier = {r["file"] for r in earlier_run(json_path)["samples"] if os.path.basename(str(r["file"])) ==
                   r["file"]}
    except (KeyError, TypeError):                       # no earlier run, or a .json not written by this script
        earlier = set()
    for name, x in files.items():
        atomic_save(Image.fromarray(to_uint8(x[None])[0]), os.path.join(folder, name))
    stale = [os.path.join(folder, f) for f in sorted(earlier - set(files)) if os.path.isfile(os.path.join(folder, f))]
    for path in stale:
        os.remove(path)
    if stale:
        print(f"removed {len(stale)} per-sample image(s) that an earlier run wrote to {folder}{os.sep}")


def report_samples(m, results: dict, target: int) -> tuple:
    """Samples from noise {scale: (N,3,S,S)}: per scale the oracle's and the guide's target rates, printed; a square
    grid, or a row per scale. -> (grid, {file: image}, summary, records)"""
    summary, records, tiles, n = {}, [], [], len(next(iter(results.values())))
    names = "sample_{i:04d}.png" if len(results) == 1 else "s{scale:g}_sample_{i:04d}.png"
    for scale, x in results.items():
        key, s, p_guide, p_oracle, line = f"scale_{scale:g}" if scale else "unguided", {"n": len(x)}, None, None, ""
        if m.guide is not None:                              # p(target) = p(present), or 1 - it toward 0
            p_guide = p_target(guide_probabilities(m, x)[:, m.guide.cfg.target_index], target)
            s.update(guide_target_rate=hit_rate(p_guide, 1), guide_mean_p=p_guide.mean().item())
            line = f"  guiding classifier: {s['guide_target_rate']:.1%} are {m.attribute}={target}"
        if m.oracle is not None:
            p_oracle = p_target(oracle_probabilities(m, x)[:, m.target_index], target)
            s.update(oracle_target_rate=hit_rate(p_oracle, 1), oracle_mean_p=p_oracle.mean().item())
            line = (f"  oracle (independent): {s['oracle_target_rate']:.1%} of {len(x)} are {m.attribute}={target}, "
                    f"mean p {s['oracle_mean_p']:.2f}" + line)
        print(f"[{key}]" + line)
        summary[key] = s
        for i in range(x.shape[0]):
            records.append({"index": i, "scale": scale, "file": names.format(scale=scale, i=i),
                            "guide_p_target": None if p_guide is None else round(p_guide[i].item(), 4),
                            "oracle_p_target": None if p_oracle is None else round(p_oracle[i].item(), 4)})
        tiles.append(to_uint8(x))
    grid = grid_image(np.concatenate(tiles), nrow=n if len(results) > 1 else math.ceil(math.sqrt(n)))
    return grid, {r["file"]: results[r["scale"]][r["index"]] for r in records}, summary, records


def report_counterfactuals(m, x_in, x_cf, masks, used, target: int, names: list) -> tuple:
    """Counterfactuals: flip rates, MNAC, L1 and the scale each image used; panels original | counterfactual |
    difference, one row per image. -> (grid, {file: image}, summary, records)"""
    o_before, o_after = (oracle_probabilities(m, x) if m.oracle is not None else None for x in (x_in, x_cf))
    g_before, g_after = guide_probabilities(m, x_in), guide_probabilities(m, x_cf)           # (N,A)
    s = counterfactual_metrics(m, x_in, x_cf, target, o_before, o_after, g_after)
    s.update(mask_area=masks.mean().item(), scale_used={f"{v:g}": int((used == v).sum()) for v in used.unique()})
    oracle = f"flip rate (oracle, independent) {s['flip_rate_oracle']:.1%}  MNAC {s['mnac']:.2f}  " \
        if m.oracle is not None else ""
    print(f"[counterfactuals]  {oracle}flip rate (guiding classifier) {s['flip_rate_guide']:.1%}  L1 "
          f"{s['l1_mean']:.4f} ± {s['l1_std']:.4f}  mask {s['mask_area']:.1%} of the image  scale used: "
          + ", ".join(f"{k} for {v}" for k, v in s["scale_used"].items()))
    k, flip = m.guide.cfg.target_index, lambda p: p_target(p, target)
    tiles, records = [], []
    for i, (name, a, b, d) in enumerate(zip(names, to_uint8(x_in), to_uint8(x_cf), difference_map(x_in, x_cf))):
        tiles += [a, b, d]
        rec = {"index": i, "name": name, "file": f"{i:04d}_{name}.png", "scale": used[i].item(),
               "guide_p_target_before": round(flip(g_before[i, k]).item(), 4),
               "guide_p_target": round(flip(g_after[i, k]).item(), 4),
               "l1": round(((x_in[i] - x_cf[i]).abs() / 2).mean().item(), 5),
               "mask_area": round(masks[i].mean().item(), 4)}
        if o_before is not None:
            rec.update(oracle_p_target_before=round(flip(o_before[i, m.target_index]).item(), 4),
                       oracle_p_target=round(flip(o_after[i, m.target_index]).item(), 4))
        records.append(rec)
    files = {r["file"]: x_cf[r["index"]] for r in records}
    return grid_image(np.stack(tiles), nrow=3), files, {"counterfactuals": s}, records


def main() -> int:
    parser = get_parser()
    args = parser.parse_args()
    cf_mode = check_args(args, parser.given())
    input_files = list_input_images(args.input, args.output) if args.input is not None else None
    device = resolve_device(args.device, "sampling")
    guide = args.classifier_model if not args.no_guidance or os.path.isfile(args.classifier_model) else None
    oracle = args.oracle_model or os.path.join(os.path.dirname(guide or args.diffusion_model), "oracle_best.pth")
    oracle = oracle if args.oracle_model or os.path.isfile(oracle) else None
    m = load_models(args.diffusion_model, guide, oracle, device)
    T = m.diffusion.num_timesteps
    if (args.steps or 0) > T:
        raise UserError(f"--steps {args.steps} is more than the model's {T} timesteps; use at most {T}")
    defaults = EDIT_DEFAULTS if cf_mode else SAMPLE_DEFAULTS
    sampler, steps = args.sampler or defaults["sampler"], min(args.steps or defaults["steps"], T)
    scales = [0.0] if args.no_guidance else args.guidance_scale or defaults["guidance_scale"]
    stem = os.path.splitext(args.output)[0]
    if input_files is not None:
        x_in = to_float(torch.stack([load_image_file(f, m.d_ckpt["image_size"]) for f in input_files]))
        names = [os.path.splitext(os.path.basename(f))[0] for f in input_files]
    elif cf_mode:
        x_in, names = dataset_inputs(m, args.from_dataset, args.target_label, run_split(m, "test", args.data_root))
    ensure_writable_dir(os.path.dirname(os.path.abspath(args.output)), "output folder")
    ensure_writable_dir(stem, "sample folder")
    amp = autocast(device, amp_dtype(device, args.precision))
    print(f"{'counterfactuals' if cf_mode else 'samples'}: {sampler.upper()}-{steps} on {device}, attribute "
          f"{m.attribute} -> {args.target_label}, " + ("unguided" if args.no_guidance else f"scales {scales}")
          + (f", strength {args.strength:g}, preserve {args.preserve:g}, "
             f"{'no localisation' if args.no_localize else 'localised'}" if cf_mode else ""))
    t0 = time.time()
    kw = dict(sampler=sampler, steps=steps, seed=args.seed, batch_size=args.batch_size, amp=amp)
    if cf_mode:
        x_cf, masks, used = make_counterfactuals(m, x_in, args.target_label, scales, strength=args.strength,
                                                 localize=not args.no_localize, mask_threshold=args.mask_threshold,
                                                 preserve=args.preserve, invert=not args.no_invert, **kw)
        seconds = time.time() - t0
        grid, files, summary, records = report_counterfactuals(m, x_in, x_cf, masks, used, args.target_label, names)
    else:
        results = {s: generate_images(m, args.target_label, s, n=args.num_samples, **kw) for s in scales}
        seconds = time.time() - t0
        grid, files, summary, records = report_samples(m, results, args.target_label)
    made = len(records)
    calls = {"unet_calls_per_image": m.unet_calls["images"] / made,
             "guide_grads_per_image": m.guide_grads["images"] / made}
    write_files(stem, stem + ".json", files)
    atomic_save(grid, args.output)
    atomic_save(to_json({"args": vars(args), "mode": "counterfactual" if cf_mode else "sampling",
                         "attribute": m.attribute, "target_label": args.target_label, "sampler": sampler,
                         "steps": steps, "scales": scales, "seconds": round(seconds, 2), **calls, "guide": guide,
                         "oracle": m.oracle_path if m.oracle else None, "summary": summary, "samples": records}),
                stem + ".json")
    if not args.no_guidance:
        print("note: the guiding classifier steered these images, so its verdict is not an independent judge; " + (
            "trust the oracle's" if m.oracle is not None else "train an oracle (train.py --oracle_epochs) for one"))
    print(f"{made} {'counterfactuals' if cf_mode else 'samples'} in {seconds:.1f} s "
          f"({calls['unet_calls_per_image']:.0f} UNet calls and {calls['guide_grads_per_image']:.0f} guide gradients "
          f"per image); wrote {args.output}, {stem}{os.sep} and {stem}.json")
    return 0


if __name__ == "__main__":
    run_main(main)
