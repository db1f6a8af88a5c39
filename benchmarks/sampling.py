"""Sampling benchmark: for each sampler, guidance scale and direction, the oracle's verdict and the time per image.

    python benchmarks/sampling.py --run_dir runs/toyfaces --device cpu --configs ddpm:100 dpmpp2m:20 --scales 10 30
    python benchmarks/sampling.py --run_dir runs/toyfaces --device cpu --configs ddpm:1000 ddpm:100 ddim:50 \
        dpmpp2m:10 dpmpp2m:15 dpmpp2m:20 dpmpp2m:25 --fd_samples 512
    python benchmarks/sampling.py --run_dir runs/toyfaces --device cpu --order shift_then_clip   # the other order
    python benchmarks/sampling.py --run_dir runs/toyfaces --device cpu --precisions fp32 bf16     # same noise

For every --configs entry (sampler:steps) and --precisions entry it draws --num_samples images guided toward
each --targets value at each --scales value and, once, unguided, all from the same noise, and prints one table:
seconds per image, the oracle's rate of the attribute (toward 1: share that have it; toward 0: share that do not)
and the guide's. The oracle (trained by train.py on clean images, another architecture and seed) never steers.
--fd_samples N adds the Fréchet distance in the oracle's feature space (evaluate.py's measure where no Inception
weights are at hand): of N unguided samples to the test split, and of each guided set to the test images that have
its target. With several precisions, the mean absolute
pixel difference to the first one's images from the same noise is shown too.

Variants measured for the defaults, not offered by generate.py: --classifier_model steers with another guide
(e.g. one trained to a real guide's accuracy); --order shift_then_clip applies the guidance shift before the
x0_hat clipping (eps recomputed from the clipped x0_hat) instead of guided-diffusion's clip-then-shift;
--normalize divides each sample's guidance gradient by its root mean square, so that a scale is a step size
whatever the guide's confidence.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import generate  # noqa: E402
from classifier import make_cond_fn  # noqa: E402
from common import (PRECISIONS, ArgumentParser, UserError, amp_dtype, atomic_save, autocast,  # noqa: E402
                    check_output_file, check_positive, check_scales, check_seed, resolve_device, run_main, to_json)
from evaluate import features, frechet_distance  # noqa: E402
from diffusion_model import SAMPLERS, GaussianDiffusion  # noqa: E402
from generate import (generate_images, guide_probabilities, hit_rate, load_run,  # noqa: E402
                      oracle_probabilities, run_split)


class ShiftThenClip(GaussianDiffusion):
    """The other order: eps_hat = eps - sqrt(1 - abar) s grad first, then x0_hat clipped and eps recomputed from it."""

    def guided_eps_x0(self, model, x_t, t, cond_fn=None, clip=True):
        with torch.no_grad():
            eps = model(x_t, t).float()
        if cond_fn is not None:
            eps = eps - (1 - self.alpha_bar(t, x_t.dim())).sqrt().float() * cond_fn(x_t, t).float()
        x0 = self.predict_x0(x_t, t, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = self.predict_eps(x_t, t, x0)
        return eps, x0


def normalized_cond_fn(classifier, target, guidance_scale, *args, **kwargs):
    """make_cond_fn, each sample's gradient divided by its root mean square before the scale: s * g / rms(g)."""
    cond_fn = make_cond_fn(classifier, target, 1.0, *args, **kwargs)

    def normalized(x_t, t):
        g = cond_fn(x_t, t)
        return guidance_scale * g / g.flatten(1).square().mean(1).sqrt().clamp(min=1e-12).reshape(-1, 1, 1, 1)
    return normalized


def parse_config(cfg: str) -> tuple:
    """"ddpm:1000", "dpmpp2m:20" -> (sampler, steps)."""
    sampler, _, steps = cfg.partition(":")
    if sampler not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
        raise UserError(f"--configs entry {cfg!r} is not sampler:steps with a sampler of {', '.join(SAMPLERS)}; "
                        f"use e.g. ddpm:100 dpmpp2m:20")
    return sampler, int(steps)


def main():
    p = ArgumentParser(__doc__)
    p.add_argument("--run_dir", required=True, help="folder with diffusion_final.pth, classifier_best.pth, oracle_best.pth")
    p.add_argument("--classifier_model", default=None, help="steer with this guide instead of the run's")
    p.add_argument("--configs", nargs="+", default=["ddpm:100"], help="sampler:steps entries, e.g. ddpm:100 dpmpp2m:20")
    p.add_argument("--scales", type=float, nargs="+", default=[30.0], help="guidance scales")
    p.add_argument("--targets", type=int, nargs="+", default=[1, 0], choices=(0, 1), help="directions to steer")
    p.add_argument("--num_samples", type=int, default=64, help="samples per cell")
    p.add_argument("--fd_samples", type=int, default=0, help="unguided samples for the oracle-feature FD (0: none)")
    p.add_argument("--batch_size", type=int, default=64, help="sampling batch size")
    p.add_argument("--precisions", nargs="+", default=["auto"], choices=PRECISIONS, help="autocast dtypes to compare")
    p.add_argument("--order", default="clip_then_shift", choices=("clip_then_shift", "shift_then_clip"),
                   help="where the guidance shift goes relative to the x0_hat clipping")
    p.add_argument("--normalize", action="store_true", help="guidance gradient divided by its RMS per sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--device", default="cuda", help="device")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    configs = [parse_config(c) for c in args.configs]
    for name in ("num_samples", "batch_size"):
        check_positive("--" + name, getattr(args, name))
    check_positive("--fd_samples", args.fd_samples, allow_zero=True)
    check_scales("--scales", args.scales)
    check_seed(args.seed)
    check_output_file(args.json, "--json")
    device = resolve_device(args.device, "sampling")
    m = load_run(args.run_dir, device, args.classifier_model)      # another guide: its attribute, the run's oracle
    if args.order == "shift_then_clip":
        m.diffusion = ShiftThenClip(m.diffusion.cfg)
    if args.normalize:
        generate.make_cond_fn = normalized_cond_fn
    k_guide, k_oracle = m.guide.cfg.target_index, m.target_index
    real = None
    if args.fd_samples:                  # the test split's features, and which test images have the attribute
        test = run_split(m, "test")
        real = (features(m.oracle.features, test.images, device), test.attrs[:, test.attr_names.index(m.attribute)])
    generate_images(m, 1, 1.0, n=1, sampler="ddim", steps=2)       # untimed: the device's first-call set-up
    rows, first = [], {}
    for sampler, steps in configs:
        for precision in args.precisions:
            amp = autocast(device, amp_dtype(device, precision))
            kw = dict(sampler=sampler, steps=steps, seed=args.seed, batch_size=args.batch_size, amp=amp)
            for target, scale in [(1, 0.0)] + [(t, s) for s in args.scales for t in args.targets]:
                n = max(args.num_samples, args.fd_samples if scale == 0 else 0)
                t0 = time.perf_counter()
                x = generate_images(m, target, scale, n=n, **kw)
                row = {"sampler": sampler, "steps": steps, "precision": precision, "scale": scale,
                       "target": None if scale == 0 else target, "s_per_image": (time.perf_counter() - t0) / n,
                       "oracle_rate": hit_rate(oracle_probabilities(m, x[:args.num_samples])[:, k_oracle], target),
                       "guide_rate": hit_rate(guide_probabilities(m, x[:args.num_samples])[:, k_guide], target)}
                if real is not None:          # unguided: against the whole split; guided: its images with the target
                    f_test = real[0] if scale == 0 else real[0][(real[1] == target).numpy()]
                    row["fd_oracle_features"] = frechet_distance(features(m.oracle.features, x, device), f_test)
                key = (sampler, steps, scale, target)
                if key in first:
                    row["mean_abs_diff_to_first_precision"] = (x - first[key]).abs().mean().item() / 2
                first.setdefault(key, x)
                rows.append(row)
                print(row, flush=True)
            if args.json:
                atomic_save(to_json({"args": vars(args), "rows": rows}), args.json)
    print_table(rows, m.attribute)


def print_table(rows: list, attribute: str) -> None:
    print(f"\n| sampler | precision | scale | toward | s/image | oracle: {attribute} rate | guide | FD (oracle features) "
          f"| mean abs diff |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        toward = "unguided (share with it)" if r["target"] is None else str(r["target"])
        fd, diff = r.get("fd_oracle_features"), r.get("mean_abs_diff_to_first_precision")     # absent: not measured
        print(f"| {r['sampler'].upper()}-{r['steps']} | {r['precision']} | {r['scale']:g} | {toward} | "
              f"{r['s_per_image']:.3f} | {r['oracle_rate']:.1%} | {r['guide_rate']:.1%} | "
              f"{'–' if fd is None else f'{fd:.3f}'} | {'–' if diff is None else f'{diff:.4f}'} |")


if __name__ == "__main__":
    run_main(main)
