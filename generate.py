"""Generate faces toward an attribute, or counterfactuals of given faces, and judge them independently.

Sample from noise (the seed's commands):
    python generate.py --target_label 1 --guidance_scale 3.0 --num_samples 16
    python generate.py --target_label 0 --guidance_scale 3.0 --num_samples 16
    python generate.py --no_guidance --num_samples 16
Counterfactuals of given images (the same face, changed in the attribute):
    python generate.py --input face.jpg photos/ --target_label 1 --strength 0.5
Evaluation run on N test images whose label is not the target, at several scales:
    python generate.py --from_dataset 64 --target_label 1 --guidance_scale 2 4 8 --retry_scales
Change only the region guidance needs (ACE-style mask; the rest of the face stays the input's pixels):
    python generate.py --input face.jpg --target_label 1 --strength 0.5 --localize
All models come from the checkpoint files (see train.py); e.g. --diffusion_model runs/toyfaces/diffusion_final.pth.

Writes --output (grid PNG), a folder named after its stem with one PNG per sample, and <stem>.json
with the arguments, per-sample probabilities and the summary.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from classifier import ClassifierConfig, NoisyClassifier, Oracle, OracleConfig, make_cond_fn
from common import (PRECISION_HELP, ArgumentParser, UserError, atomic_save_image, atomic_write_json, autocast,
                    check_positive, check_seed, ensure_writable_dir, grid_image, heatmap, load_checkpoint,
                    memory_format_for, refuse_folder, resolve_device, run_main, to_uint8)
from dataset import load_image_file, load_split, to_float
from diffusion_model import DiffusionConfig, GaussianDiffusion, UNet, UNetConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_STRENGTH = 0.5
DEFAULT_STEPS = 100
DEFAULT_PRESERVE = 0.1     # weight of the other attributes' guidance, from the measurements in the README


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description="Classifier-guided sampling and counterfactuals with GuidedEmotion models.")
    p.add_argument("--diffusion_model", default="diffusion_final.pth", help="diffusion checkpoint from train.py")
    p.add_argument("--classifier_model", default="classifier_best.pth", help="guiding classifier checkpoint")
    p.add_argument("--oracle_model", default=None,
                   help="independent judge (default: oracle_best.pth beside the classifier/diffusion model, if there)")
    p.add_argument("--num_samples", type=int, default=16, help="samples to draw from noise (per guidance scale)")
    p.add_argument("--guidance_scale", type=float, nargs="+", default=[3.0],
                   help="classifier guidance scale s (one or more; each gets its own grid row and summary)")
    p.add_argument("--target_label", type=int, default=1, choices=(0, 1), help="1: attribute present, 0: absent")
    p.add_argument("--output", default="generated_samples.png", help="grid image path; per-sample PNGs go in a "
                                                                      "folder named after its stem")
    p.add_argument("--no_guidance", action="store_true", help="sample without classifier guidance")
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"),
                   help="ancestral DDPM (default; see README for why) or deterministic DDIM")
    p.add_argument("--steps", type=int, default=None, help="sampling steps spread over the full schedule (default: "
                   f"{DEFAULT_STEPS}, or T if smaller; DDPM with fewer than T steps uses the respaced posterior)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic, 1: DDPM-like noise)")
    p.add_argument("--batch_size", type=int, default=64, help="images per sampling batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--device", default="cuda", help="cuda, cpu, cuda:1, mps (falls back to cpu without CUDA)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help=PRECISION_HELP)
    # counterfactuals
    p.add_argument("--input", nargs="+", default=None, help="image files or folders to make counterfactuals of")
    p.add_argument("--from_dataset", type=int, default=None,
                   help="make counterfactuals of N test images whose true label is not the target")
    p.add_argument("--data_root", default=None, help="dataset root for --from_dataset (default: the training one)")
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH,
                   help="counterfactual noise level: start step t0 = round(strength * T) - 1; 0 returns the input, "
                        "1 is free generation")
    p.add_argument("--invert", action="store_true",
                   help="counterfactuals: reach x_t0 by deterministic DDIM inversion instead of q_sample's fresh "
                        "noise (needs --sampler ddim; keeps the person better, steers less per unit of scale)")
    p.add_argument("--localize", action="store_true",
                   help="counterfactuals: repaint only where guidance changed the image (ACE-style mask: a guided and "
                        "an unguided run from the same noise, their difference thresholded and dilated); the rest "
                        "stays the input pixel for pixel. Costs about 2.5x the time")
    p.add_argument("--mask_threshold", type=float, default=0.05,
                   help="with --localize: smallest guided-vs-unguided change (mean |diff| on the [0, 1] scale over "
                        "3x3 pixels) that goes into the mask")
    p.add_argument("--mask_dilation", type=int, default=None,
                   help="with --localize: grow the mask by this many pixels (default: image size / 32)")
    p.add_argument("--resample", type=int, default=1,
                   help="with --localize: RePaint resampling, each step of the repainting run taken this many times "
                        "(1: none; about that many times slower)")
    p.add_argument("--preserve", type=float, default=None,
                   help="counterfactuals with a guide trained by train.py --guide_all_attributes: weight of the "
                        "guidance that holds every other attribute at the guide's verdict on the input "
                        f"(default {DEFAULT_PRESERVE:g} with such a guide, 0 otherwise; 0: off)")
    p.add_argument("--retry_scales", action="store_true",
                   help="counterfactuals: retry images that did not flip, by the guide's verdict, at the next "
                        "--guidance_scale in the order given, so give them smallest first (as DiME; the oracle "
                        "only judges)")
    return p


# ----------------------------------------------------------------------------------------------
# Models from checkpoints


def load_diffusion(path: str, device):
    ckpt = load_checkpoint(path, "diffusion", "--diffusion_model")
    net = UNet(UNetConfig(**ckpt["config"]))
    net.load_state_dict(ckpt.get("ema") or ckpt["model"])             # sample with the EMA weights
    net = net.to(device, memory_format=memory_format_for(device)).eval()
    return net, GaussianDiffusion(DiffusionConfig(**ckpt["diffusion"])), ckpt


def load_classifier(path: str, device):
    ckpt = load_checkpoint(path, "classifier", "--classifier_model")
    net = NoisyClassifier(ClassifierConfig(**ckpt["config"]))
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval(), ckpt


def load_oracle(path: str, device):
    ckpt = load_checkpoint(path, "oracle", "--oracle_model")
    net = Oracle(OracleConfig(**ckpt["config"]))
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval(), ckpt


def load_run(run_dir: str, device):
    """The three networks of one training run (its output folder), for the evaluation scripts."""
    net, diffusion, d_ckpt = load_diffusion(os.path.join(run_dir, "diffusion_final.pth"), device)
    clf, c_ckpt = load_classifier(os.path.join(run_dir, "classifier_best.pth"), device)
    oracle, o_ckpt = load_oracle(os.path.join(run_dir, "oracle_best.pth"), device)
    check_compatible(d_ckpt, c_ckpt, f"{run_dir}/classifier_best.pth")
    check_compatible(d_ckpt, o_ckpt, f"{run_dir}/oracle_best.pth")
    return net, diffusion, d_ckpt, clf, c_ckpt, oracle, o_ckpt


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
# Sampling


def _no_autocast(device) -> torch.autocast:
    return torch.autocast(torch.device(device).type, enabled=False)


def encode(net, diffusion, x0: torch.Tensor, t_start: int, *, invert=False, steps=None, seed=0, batch_size=64,
           device="cpu", amp=None) -> torch.Tensor:
    """Inputs x_0 -> x_{t_start}, the start of their counterfactuals; (N,3,S,S) -> (N,3,S,S) on the CPU.

    q_sample with batch i's seeded noise (DDPM Eq. 4), or with ``invert`` deterministic DDIM inversion.
    t_start = -1 (strength 0) returns the inputs. Done once per input set, whatever the number of scales.
    """
    out = []
    for i in range(0, x0.shape[0], batch_size):
        x = x0[i:i + batch_size].to(device)
        if t_start < 0:
            x_t = x
        elif invert:
            with amp or _no_autocast(device):
                x_t = diffusion.ddim_invert(net, x, t_start, steps)
        else:
            g = torch.Generator(device=device).manual_seed(seed * 100003 + i)
            noise = torch.randn(x.shape, generator=g, device=device)
            x_t = diffusion.q_sample(x, torch.full((x.shape[0],), t_start, device=device, dtype=torch.long), noise)
        out.append(x_t.float().cpu())
    return torch.cat(out)


def generate_images(net, diffusion, classifier, target: int, scale: float, *, n: int = 16, x_t0=None,
                    t_start=None, known=None, keep=None, keep_weight=1.0, sampler="ddim", steps=None, eta=0.0,
                    resample=1, seed=0, batch_size=64, device="cpu", amp=None) -> torch.Tensor:
    """Samples from noise, or counterfactuals from ``x_t0`` (see ``encode``), guided toward ``target`` at ``scale``.

    :param x_t0: (N,3,S,S) encoded inputs at step t_start; None samples ``n`` images from pure noise.
    :param t_start: the counterfactual start step t0 in [-1, T-1]; -1 returns ``x_t0`` (the inputs) unchanged.
    :param known: (mask (N,1,S,S), x0 (N,3,S,S)): generate only where mask = 1, keep x0 elsewhere (RePaint).
    :param keep: (N, A) attribute values the guidance holds, with weight ``keep_weight`` (see make_cond_fn).
    Batch i's noise comes from seed and i alone, so a run is reproducible. Returns (N,3,S,S) on the CPU.
    """
    size = net.cfg.image_size
    guided = classifier is not None and scale != 0
    cond_fn = make_cond_fn(classifier, target, scale) if guided and keep is None else None
    total = n if x_t0 is None else x_t0.shape[0]
    out = []
    for i in range(0, total, batch_size):
        b = min(batch_size, total - i)
        if guided and keep is not None:
            cond_fn = make_cond_fn(classifier, target, scale, keep=keep[i:i + b], keep_weight=keep_weight)
        g = torch.Generator(device=device).manual_seed(seed * 100003 + i)
        x_t = torch.randn((b, 3, size, size), generator=g, device=device)    # x_{T-1} ~ N(0, I)
        if x_t0 is not None:
            x_t = x_t0[i:i + b].to(device)
            if t_start < 0:
                out.append(x_t.cpu())
                continue
        kb = None if known is None else tuple(k[i:i + b].to(device) for k in known)
        with amp or _no_autocast(device):
            x = diffusion.sample(net, x_t.shape, sampler=sampler, steps=steps, eta=eta, cond_fn=cond_fn,
                                 generator=g, x_t=x_t, t_start=t_start, known=kb, resample=resample, device=device)
        out.append(x.float().cpu())
    return torch.cat(out)


def edit_mask(x_guided: torch.Tensor, x_unguided: torch.Tensor, threshold: float, dilation: int) -> torch.Tensor:
    """Where guidance changed the image: (N,3,S,S), (N,3,S,S) -> (N,1,S,S) in {0, 1}.

    Both come from the same x_t0 and the same sampler noise, so their difference is guidance's doing,
    not the model's imperfect reconstruction. |x_g - x_u| on the [0, 1] scale, averaged over channels
    and a 3x3 window, above ``threshold``, then dilated by ``dilation`` pixels (as ACE, Jeanneret et al.
    2023, post-processes its pre-explanations: only the changed region, dilated, is repainted).
    """
    d = (x_guided - x_unguided).abs().mean(1, keepdim=True) / 2                      # (N,1,S,S)
    d = F.avg_pool2d(d, 3, stride=1, padding=1, count_include_pad=False)
    mask = (d > threshold).float()
    return F.max_pool2d(mask, 2 * dilation + 1, stride=1, padding=dilation) if dilation > 0 else mask


def make_counterfactuals(net, diffusion, classifier, target: int, scales: list, x_in: torch.Tensor, x_t0, t_start,
                         *, localize=False, mask_threshold=0.05, mask_dilation=None, preserve=0.0, **sample_kw):
    """Counterfactuals of ``x_in`` (N,3,S,S) from its encoding ``x_t0`` at every guidance scale.

    Plain: one guided run from x_t0 per scale. With ``localize`` (ACE-style): an unguided run from the
    same x_t0 and noise, then per scale the guided run, ``edit_mask`` of the two, and a second guided run
    that repaints only inside the mask; outside it the output is the input, pixel for pixel.
    :param mask_dilation: pixels; None: image size / 32 (at least 1).
    :param preserve: > 0 (a guide that knows every attribute): also hold the attributes the guide sees in
        each input, with this weight (``make_cond_fn``'s keep_weight).
    :returns: {scale: (N,3,S,S) counterfactuals}, {scale: (N,1,S,S) masks, all ones without ``localize``}.
    """
    if mask_dilation is None:
        mask_dilation = max(1, x_in.shape[-1] // 32)
    keep = None
    if preserve > 0:                                 # the guide's own clean-image verdicts (t = 0) on the inputs
        keep = guide_attributes(classifier, x_in, sample_kw.get("device", "cpu"))
    run = lambda s, known=None: generate_images(net, diffusion, classifier, target, s, x_t0=x_t0, t_start=t_start,
                                                known=known, keep=keep, keep_weight=preserve, **sample_kw)
    x_unguided = run(0.0) if localize and t_start >= 0 else None
    results, masks = {}, {}
    for scale in scales:
        x = run(scale)
        mask = torch.ones_like(x[:, :1])
        if x_unguided is not None and scale > 0:
            mask = edit_mask(x, x_unguided, mask_threshold, mask_dilation)
            x = run(scale, known=(mask, x_in))
        results[scale], masks[scale] = x, mask
    return results, masks


# ----------------------------------------------------------------------------------------------
# Judging


def clean_batches(fn, x0: torch.Tensor, device=None, batch_size: int = 256) -> torch.Tensor:
    """fn(x) for every batch x of clean images x0 (N,3,S,S), run on ``device`` (default: x0's), concatenated on
    the CPU along the first dimension."""
    device = x0.device if device is None else device
    with torch.no_grad():
        return torch.cat([fn(x0[i:i + batch_size].to(device)).cpu() for i in range(0, x0.shape[0], batch_size)])


def at_t0(x: torch.Tensor) -> torch.Tensor:
    """Timestep 0 for every image of the batch x: the guide judges a clean image as if it were x_t at the least
    noisy step it was trained on (t = 0, noise std sqrt(1 - abar_0) = 0.01). (B,3,S,S) -> (B,)"""
    return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)


def guide_probability(classifier, x0: torch.Tensor, target: int, device=None, batch_size: int = 256) -> torch.Tensor:
    """The guiding classifier's p(target | x_0) on clean images (judged at t = 0, ``at_t0``). (N,3,S,S) -> (N,)"""
    def p_target(x):
        logit = classifier(x, at_t0(x)).float()
        return torch.sigmoid(logit if target == 1 else -logit)
    return clean_batches(p_target, x0, device, batch_size)


def guide_attributes(classifier, x0: torch.Tensor, device=None, batch_size: int = 256) -> torch.Tensor:
    """The guide's 0/1 verdict on every attribute of clean images (a guide with several outputs). (N,3,S,S) -> (N,A)"""
    return clean_batches(lambda x: (classifier(x, at_t0(x), all_outputs=True).float() > 0).long(), x0, device,
                         batch_size)


def oracle_probabilities(oracle, x0: torch.Tensor, device=None, batch_size: int = 256) -> torch.Tensor:
    """The oracle's p(attribute present) for every attribute. (N,3,S,S) -> (N,A)"""
    return clean_batches(lambda x: torch.sigmoid(oracle(x).float()), x0, device, batch_size)


def counterfactual_metrics(x: torch.Tensor, x_cf: torch.Tensor, oracle_before: torch.Tensor | None,
                           oracle_after: torch.Tensor | None, guide_after: torch.Tensor | None,
                           target_index: int | None, target: int, attr_names: list | None) -> dict:
    """Flip rates, MNAC and L1 for a batch of counterfactuals.

    :param x, x_cf: (N,3,S,S) inputs and counterfactuals in [-1, 1].
    :param oracle_before, oracle_after: (N,A) oracle probabilities, or None without an oracle.
    :param guide_after: (N,) the guide's p(target | counterfactual), or None.
    flip rate = share of counterfactuals judged to have the target label (p > 0.5);
    MNAC = mean number of the *other* attributes whose oracle decision changed (DiME Sec. 5, ACE);
    L1 = mean absolute per-pixel difference on the [0, 1] scale, per image, then mean and std.
    """
    l1 = ((x - x_cf).abs() / 2).flatten(1).mean(1)                               # (N,)
    out = {"n": int(x.shape[0]), "l1_mean": l1.mean().item(), "l1_std": l1.std(unbiased=False).item()}
    if guide_after is not None:
        out["flip_rate_guide"] = (guide_after > 0.5).float().mean().item()
    if oracle_after is not None:
        pred_after = oracle_after[:, target_index] > 0.5
        out["flip_rate_oracle"] = (pred_after == bool(target)).float().mean().item()
        changed = (oracle_before > 0.5) != (oracle_after > 0.5)                    # (N,A)
        others = [i for i in range(changed.shape[1]) if i != target_index]
        out["mnac"] = changed[:, others].float().sum(1).mean().item()
        out["changed_per_attribute"] = {attr_names[i]: changed[:, i].float().mean().item() for i in others}
    return out


# ----------------------------------------------------------------------------------------------
# Inputs for counterfactuals


def list_input_images(paths: list) -> list:
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
    return files


def check_outputs_spare_inputs(output: str, inputs: list, input_files: list) -> None:
    """The grid, its .json and its sample folder must not overwrite an --input image or land in an --input
    folder, where the next run would read them as inputs. An input inside the sample folder is refused too:
    a rerun writes that folder's sample_*.png and removes the ones the earlier run listed."""
    stem = os.path.splitext(output)[0]
    written = {os.path.realpath(p) for p in (output, stem + ".json")}
    into = written | {os.path.join(os.path.realpath(stem), "sample.png")}     # the sample folder's files
    clash = [p for p in inputs if os.path.isdir(p) and os.path.realpath(p) in {os.path.dirname(w) for w in into}]
    clash += [f for f in input_files if os.path.realpath(f) in written
              or os.path.dirname(os.path.realpath(f)) == os.path.realpath(stem)]
    if clash:
        raise UserError(f"--output '{output}' would write over or into --input '{clash[0]}'; "
                        f"choose an --output outside the inputs")


def sample_files(records: list) -> set:
    """The per-sample file names (inside the sample folder) that a summary's "samples" records list."""
    found = set()
    for rec in records:
        for v in (rec, *rec.values()):
            if isinstance(v, dict) and isinstance(v.get("file"), str) and os.path.basename(v["file"]) == v["file"]:
                found.add(v["file"])
    return found


def earlier_sample_files(json_path: str) -> set:
    """Per-sample files an earlier run with the same --output listed in its summary (none if it has none)."""
    try:
        with open(json_path) as f:
            records = json.load(f).get("samples", [])
        return sample_files(records) if isinstance(records, list) else set()
    except (OSError, ValueError, AttributeError):
        return set()


def dataset_inputs(d_ckpt: dict, attribute: str, attribute_index: int, n: int, target: int, data_root: str | None):
    """N test-split images whose true ``attribute`` (the steered one, column ``attribute_index``) is not the
    target, at the diffusion model's size and subset."""
    a = d_ckpt["args"]
    split = load_split(d_ckpt["dataset"], "test", d_ckpt["image_size"], data_root or a.get("data_root", "./data"),
                       a.get("subset_fraction", 0.5), a.get("seed", 0), None, False, 0, verbose=True)
    keep = torch.nonzero(split.attrs[:, attribute_index] != target).squeeze(1)[:n]
    if len(keep) < n:
        print(f"warning: only {len(keep)} test images have {attribute} != {target}; using them all")
    if len(keep) == 0:
        raise UserError(f"no test images with {attribute} != {target}; choose the other --target_label")
    return to_float(split.images[keep]), [split.names[i] for i in keep.tolist()]


# ----------------------------------------------------------------------------------------------


def main() -> int:
    parser = get_parser()
    args = parser.parse_args()
    cf_mode = args.input is not None or args.from_dataset is not None
    # check every argument before loading or writing anything
    check_positive("--num_samples", args.num_samples)
    check_positive("--batch_size", args.batch_size)
    check_positive("--steps", args.steps)
    check_positive("--from_dataset", args.from_dataset)
    check_seed(args.seed)
    for scale in args.guidance_scale:
        check_positive("--guidance_scale", scale, allow_zero=True)          # 0 means no guidance
    if not 0.0 <= args.strength <= 1.0:
        raise UserError(f"--strength must be in [0, 1], got {args.strength}")
    if not 0.0 <= args.eta <= 1.0:
        raise UserError(f"--eta must be in [0, 1], got {args.eta}")
    if args.input is not None and args.from_dataset is not None:
        raise UserError("--input and --from_dataset both given; pass one of them")
    if args.invert and (not cf_mode or args.sampler != "ddim"):
        raise UserError("--invert works on --input/--from_dataset counterfactuals with --sampler ddim; add those "
                        "or drop --invert")
    if (args.localize or args.mask_dilation is not None) and not cf_mode:
        raise UserError("--localize/--mask_dilation work on --input/--from_dataset counterfactuals; add one of those "
                        "or drop them")
    check_positive("--resample", args.resample)
    if args.resample > 1 and not args.localize:
        raise UserError("--resample works on --localize counterfactuals (it repaints the masked region); add "
                        "--localize or drop --resample")
    if not 0.0 <= args.mask_threshold < 1.0:
        raise UserError(f"--mask_threshold must be in [0, 1), got {args.mask_threshold}")
    check_positive("--mask_dilation", args.mask_dilation, allow_zero=True)
    check_positive("--preserve", args.preserve, allow_zero=True)
    if args.preserve and not cf_mode:
        raise UserError("--preserve works on --input/--from_dataset counterfactuals; add one of those or drop it")
    if args.no_guidance and cf_mode:
        raise UserError("--no_guidance with --input/--from_dataset would only re-noise and denoise; drop --no_guidance")
    given = parser.given()                  # a flag written out that would do nothing here is a mistake to report
    idle = {"strength": (not cf_mode, "works on --input/--from_dataset counterfactuals"),   # flag: (idle?, why)
            "retry_scales": (not cf_mode, "works on --input/--from_dataset counterfactuals"),
            "num_samples": (cf_mode, "sets the number of samples from noise; counterfactuals make one per input image"),
            "mask_threshold": (not args.localize, "works on --localize counterfactuals"),
            "eta": (args.sampler != "ddim", "is DDIM's noise (--sampler ddim)")}
    for flag, (does_nothing, why) in idle.items():
        if does_nothing and flag in given:
            raise UserError(f"--{flag} {why}, so it would do nothing in this run; drop it")
    stem, ext = os.path.splitext(args.output)
    if ext.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--output '{args.output}' must end in .png or .jpg")
    refuse_folder(args.output, "--output")                   # before any work; writability is checked later
    refuse_folder(stem + ".json", "--output's summary")
    if os.path.exists(stem) and not os.path.isdir(stem):
        raise UserError(f"--output '{args.output}' needs the sample folder '{stem}', but that is a file; choose "
                        f"another --output or move the file")
    input_files = list_input_images(args.input) if args.input is not None else None
    if input_files is not None:
        check_outputs_spare_inputs(args.output, args.input, input_files)

    device = resolve_device(args.device, "sampling")
    net, diffusion, d_ckpt = load_diffusion(args.diffusion_model, device)
    T = diffusion.num_timesteps
    if args.steps is not None and args.steps > T:
        raise UserError(f"--steps {args.steps} is more than the model's {T} timesteps; use at most {T}")
    steps = args.steps or min(DEFAULT_STEPS, T)
    size = d_ckpt["image_size"]

    classifier = c_ckpt = None
    if not args.no_guidance or os.path.isfile(args.classifier_model):
        classifier, c_ckpt = load_classifier(args.classifier_model, device)
        check_compatible(d_ckpt, c_ckpt, "--classifier_model")
    attribute, attribute_index = (c_ckpt or d_ckpt)["attribute"], (c_ckpt or d_ckpt)["attribute_index"]
    oracle_path = args.oracle_model
    if oracle_path is None:
        beside = os.path.dirname(args.classifier_model if c_ckpt else args.diffusion_model)
        oracle_path = os.path.join(beside, "oracle_best.pth")
        oracle_path = oracle_path if os.path.isfile(oracle_path) else None
    oracle = o_ckpt = None
    if oracle_path is not None:
        oracle, o_ckpt = load_oracle(oracle_path, device)
        check_compatible(d_ckpt, o_ckpt, "--oracle_model")
        if attribute not in o_ckpt["attr_names"]:
            raise UserError(f"--oracle_model '{oracle_path}' does not know attribute {attribute}; "
                            f"use the oracle trained with this model")
    target_index = o_ckpt["attr_names"].index(attribute) if o_ckpt else None
    every = classifier is not None and classifier.cfg.num_outputs > 1
    if args.preserve and not every:
        raise UserError(f"--preserve needs a guide that knows every attribute, but '{args.classifier_model}' learned "
                        f"only {attribute}; train one with train.py --guide_all_attributes, or drop --preserve")
    preserve = (DEFAULT_PRESERVE if every else 0.0) if args.preserve is None else args.preserve

    if input_files is not None:
        x_in = torch.stack([load_image_file(f, size) for f in input_files])
        x_in, names = to_float(x_in), [os.path.splitext(os.path.basename(f))[0] for f in input_files]
    elif args.from_dataset is not None:
        x_in, names = dataset_inputs(d_ckpt, attribute, attribute_index, args.from_dataset, args.target_label,
                                     args.data_root)
        names = [os.path.splitext(n)[0] for n in names]
    folder = stem
    ensure_writable_dir(os.path.dirname(os.path.abspath(args.output)), "output folder")
    ensure_writable_dir(folder, "sample folder")

    scales = [0.0] if args.no_guidance else list(args.guidance_scale)
    amp = autocast(device, args.precision)
    t_start = round(args.strength * T) - 1 if cf_mode else None        # 0-based t0: 499 for 0.5 at T = 1000
    what = "counterfactuals" if cf_mode else "samples"
    print(f"{what}: {args.sampler.upper()}-{steps} on {device}, attribute {attribute} -> {args.target_label}, "
          f"scales {scales if not args.no_guidance else 'none (unguided)'}"
          + (f", holding the other attributes (--preserve {preserve:g})" if cf_mode and preserve else "")
          + (", localized (--localize)" if args.localize else ""))
    t0 = time.time()
    x_t0 = None
    if cf_mode:
        x_t0 = encode(net, diffusion, x_in, t_start, invert=args.invert, steps=steps, seed=args.seed,
                      batch_size=args.batch_size, device=device, amp=amp)
    sample_kw = dict(sampler=args.sampler, steps=steps, eta=args.eta, seed=args.seed, batch_size=args.batch_size,
                     resample=args.resample, device=device, amp=amp)      # resample acts on the repainting run only
    if cf_mode:                                                      # scale -> (N,3,S,S) on CPU, (N,1,S,S) masks
        results, masks = make_counterfactuals(net, diffusion, classifier, args.target_label, scales, x_in, x_t0,
                                              t_start, localize=args.localize, mask_threshold=args.mask_threshold,
                                              mask_dilation=args.mask_dilation,
                                              preserve=preserve if cf_mode and not args.no_guidance else 0.0,
                                              **sample_kw)
    else:
        results = {scale: generate_images(net, diffusion, None if args.no_guidance else classifier,
                                          args.target_label, scale, n=args.num_samples, **sample_kw)
                   for scale in scales}
    seconds = time.time() - t0

    # judge: the guide's own verdict, and the independent oracle's
    def judge(x):
        g = guide_probability(classifier, x, args.target_label, device) if classifier is not None else None
        o = oracle_probabilities(oracle, x, device) if oracle is not None else None
        return g, o

    summary, per_sample = {}, []
    if cf_mode:
        g_before, o_before = judge(x_in)
        columns = []                    # (label, images, guide p, oracle p, masks) in the panels, left to right
        retry_pick = None
        for scale in scales:
            g_after, o_after = judge(results[scale])
            m = summary[f"scale_{scale:g}"] = counterfactual_metrics(
                x_in, results[scale], o_before, o_after, g_after, target_index, args.target_label,
                o_ckpt["attr_names"] if o_ckpt else None)
            if args.localize:
                m["mask_area"] = masks[scale].mean().item()
            flipped = g_after > 0.5     # the guide decides retries (as DiME); the oracle only judges the result
            if args.retry_scales:                  # keep the first scale at which each image flipped
                if retry_pick is None:
                    retry_pick = (results[scale].clone(), masks[scale].clone(), flipped.clone(),
                                  torch.full((len(flipped),), scale))
                else:
                    xr, mr, fr, sr = retry_pick
                    take = ~fr
                    xr[take], mr[take], sr[take], fr[take] = results[scale][take], masks[scale][take], scale, flipped[take]
            columns.append((f"s={scale:g}", results[scale], g_after, o_after, masks[scale]))
        if retry_pick is not None and len(scales) > 1:
            xr, mr, fr, sr = retry_pick
            g_after, o_after = judge(xr)
            m = counterfactual_metrics(x_in, xr, o_before, o_after, g_after, target_index, args.target_label,
                                       o_ckpt["attr_names"] if o_ckpt else None)
            m["scale_used"] = {f"{s:g}": int((sr == s).sum()) for s in scales}
            if args.localize:
                m["mask_area"] = mr.mean().item()
            summary["retry"] = m
            columns.append(("retry", xr, g_after, o_after, mr))
            retry_scale_used = sr
        # panels: original | (counterfactual | difference) per column, one row per image
        tiles = []
        x_u8 = to_uint8(x_in)
        for i in range(x_in.shape[0]):
            tiles.append(x_u8[i])
            for _, xc, _, _, _ in columns:
                tiles.append(to_uint8(xc[i:i + 1])[0])
                diff = ((xc[i] - x_in[i]).abs().mean(0) / 2).numpy()              # (S,S) in [0, 1]
                tiles.append(heatmap(diff / max(diff.max(), 1e-3)))
        grid = grid_image(np.stack(tiles), nrow=1 + 2 * len(columns))
        for i, name in enumerate(names):
            rec = {"index": i, "name": name,
                   "guide_p_target_before": _f(g_before, i), "oracle_p_target_before": _o(o_before, i, target_index,
                                                                                          args.target_label)}
            for label, xc, g_after, o_after, mc in columns:
                fname = f"{i:04d}_{name}_{label.replace('=', '')}.png"
                atomic_save_image(_pil(xc[i]), os.path.join(folder, fname))
                rec[label] = {"file": fname, "guide_p_target": _f(g_after, i),
                              "oracle_p_target": _o(o_after, i, target_index, args.target_label),
                              "l1": ((x_in[i] - xc[i]).abs() / 2).mean().item()}
                if args.localize:
                    rec[label]["mask_area"] = round(mc[i].mean().item(), 4)
                if label == "retry":
                    rec[label]["scale"] = float(retry_scale_used[i])
            per_sample.append(rec)
    else:
        tiles = []
        for scale in scales:
            g, o = judge(results[scale])
            x_u8 = to_uint8(results[scale])
            tiles.append(x_u8)
            s = {"n": args.num_samples}
            if g is not None:
                s["guide_target_rate"] = (g > 0.5).float().mean().item()
                s["guide_mean_p_target"] = g.mean().item()
            if o is not None:
                p_t = o[:, target_index] if args.target_label == 1 else 1 - o[:, target_index]
                s["oracle_target_rate"] = (p_t > 0.5).float().mean().item()
                s["oracle_mean_p_target"] = p_t.mean().item()
            key = "unguided" if args.no_guidance else f"scale_{scale:g}"
            summary[key] = s
            for i in range(args.num_samples):
                fname = f"sample_{i:04d}.png" if len(scales) == 1 else f"s{scale:g}_sample_{i:04d}.png"
                atomic_save_image(_pil(results[scale][i]), os.path.join(folder, fname))
                per_sample.append({"index": i, "scale": scale, "file": fname, "guide_p_target": _f(g, i),
                                   "oracle_p_target": _o(o, i, target_index, args.target_label)})
        tiles = np.concatenate(tiles)
        nrow = math.ceil(math.sqrt(args.num_samples)) if len(scales) == 1 else args.num_samples
        grid = grid_image(tiles, nrow=nrow)

    atomic_save_image(grid, args.output)
    report = {"args": vars(args), "mode": "counterfactual" if cf_mode else "sampling", "attribute": attribute,
              "target_label": args.target_label, "sampler": args.sampler, "steps": steps,
              "strength": args.strength if cf_mode else None, "preserve": preserve if cf_mode else None,
              "seconds": round(seconds, 2),
              "guide": args.classifier_model if classifier is not None else None, "oracle": oracle_path,
              "summary": summary, "samples": per_sample}
    json_path = stem + ".json"
    stale = earlier_sample_files(json_path) - sample_files(per_sample)    # an earlier run's extra samples
    atomic_write_json(json_path, report)
    stale = [os.path.join(folder, fname) for fname in sorted(stale) if os.path.isfile(os.path.join(folder, fname))]
    for path in stale:
        os.remove(path)
    if stale:
        print(f"removed {len(stale)} per-sample image(s) that an earlier run wrote to {folder}{os.sep}")
    print_summary(summary, cf_mode, attribute, args.target_label, oracle is not None,
                  steered=classifier is not None and not args.no_guidance)
    print(f"{sum(r.shape[0] for r in results.values())} {what} in {seconds:.1f} s; wrote {args.output}, "
          f"{folder}{os.sep} and {json_path}")
    return 0


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(x[None])[0])


def _f(p, i):
    return None if p is None else round(float(p[i]), 4)


def _o(o, i, k, target):
    if o is None:
        return None
    p = float(o[i, k])
    return round(p if target == 1 else 1 - p, 4)


def print_summary(summary, cf_mode, attribute, target, has_oracle, steered):
    want = f"{attribute}={target}"
    for key, s in summary.items():
        line = [f"[{key}]"]
        if cf_mode:
            if "flip_rate_oracle" in s:
                line.append(f"flip rate (oracle, independent) {s['flip_rate_oracle']:.1%}")
                line.append(f"MNAC {s['mnac']:.2f}")
            if "flip_rate_guide" in s:
                line.append(f"flip rate (guiding classifier) {s['flip_rate_guide']:.1%}")
            line.append(f"L1 {s['l1_mean']:.4f} ± {s['l1_std']:.4f}")
            if "mask_area" in s:
                line.append(f"mask {s['mask_area']:.1%} of the image")
        else:
            if "oracle_target_rate" in s:
                line.append(f"oracle (independent): {s['oracle_target_rate']:.1%} of {s['n']} are {want}, "
                            f"mean p {s['oracle_mean_p_target']:.2f}")
            if "guide_target_rate" in s:
                line.append(f"guiding classifier: {round(s['guide_target_rate'] * s['n'])}/{s['n']} are {want}, "
                            f"mean p {s['guide_mean_p_target']:.2f}")
        print("  ".join(line))
    if steered:
        print("note: the guiding classifier steered these images, so its verdict is not an independent judge"
              + ("; trust the oracle's" if has_oracle else "; train an oracle (train.py --oracle_epochs) for one"))


if __name__ == "__main__":
    run_main(main)
