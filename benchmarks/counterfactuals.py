"""Counterfactual evaluation: flip rate, MNAC and L1 over strengths x guidance scales, in both directions.

    python benchmarks/counterfactuals.py --run_dir runs/toyfaces --device cpu
    python benchmarks/counterfactuals.py --run_dir runs/celeba --n 1000 --strengths 0.3 0.5 0.7 --scales 2 4 8

For each direction (toward 1 on test images without the attribute, toward 0 on images with it), each
--strengths value and each --scales value, it makes counterfactuals of the same --n test images and
prints one table: flip rate by the independent oracle, flip rate by the guiding classifier (not an
independent judge), MNAC (mean number of other oracle attributes changed) and the per-pixel L1 on [0, 1].
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import ArgumentParser, autocast, resolve_device  # noqa: E402
from generate import (counterfactual_metrics, dataset_inputs, encode, generate_images, guide_probability,  # noqa: E402
                      load_run, oracle_probabilities)


def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run_dir", required=True, help="folder with diffusion_final.pth, classifier_best.pth, oracle_best.pth")
    p.add_argument("--n", type=int, default=64, help="test images per direction")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="t0 / T values")
    p.add_argument("--scales", type=float, nargs="+", default=[10.0, 30.0, 100.0], help="guidance scales")
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"), help="sampler")
    p.add_argument("--steps", type=int, default=100, help="steps over the full schedule")
    p.add_argument("--invert", action="store_true", help="reach x_t0 by DDIM inversion (use with --sampler ddim)")
    p.add_argument("--targets", type=int, nargs="+", default=[1, 0], help="directions to evaluate")
    p.add_argument("--batch_size", type=int, default=64, help="sampling batch size")
    p.add_argument("--device", default="cuda", help="device")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="bf16 autocast")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    device = resolve_device(args.device, "sampling")
    net, diffusion, d_ckpt, clf, c_ckpt, oracle, o_ckpt = load_run(args.run_dir, device)
    names, k, T = o_ckpt["attr_names"], o_ckpt["attr_names"].index(c_ckpt["attribute"]), diffusion.num_timesteps
    amp = autocast(device, args.precision)
    rows = []
    for target in args.targets:
        x_in, _ = dataset_inputs(d_ckpt, args.n, target, None)
        o_before = oracle_probabilities(oracle, x_in.to(device))
        for strength in args.strengths:
            t_start = round(strength * T) - 1
            t0 = time.time()
            x_t0 = encode(net, diffusion, x_in, t_start, invert=args.invert, steps=args.steps,
                          batch_size=args.batch_size, device=device, amp=amp)       # once for all scales
            encode_seconds = time.time() - t0
            for scale in args.scales:
                t0 = time.time()
                x_cf = generate_images(net, diffusion, clf, target, scale, x_t0=x_t0, t_start=t_start,
                                       sampler=args.sampler, steps=args.steps, batch_size=args.batch_size,
                                       device=device, amp=amp)
                m = counterfactual_metrics(x_in, x_cf, o_before, oracle_probabilities(oracle, x_cf.to(device)),
                                           guide_probability(clf, x_cf.to(device), target), k, target, names)
                m.update(target=target, strength=strength, scale=scale, seconds=time.time() - t0 + encode_seconds)
                rows.append(m)
                print(f"  {c_ckpt['attribute']} -> {target}  strength {strength:.2f}  scale {scale:g}: flip (oracle) "
                      f"{m['flip_rate_oracle']:.1%}  flip (guide) {m['flip_rate_guide']:.1%}  MNAC {m['mnac']:.2f}  "
                      f"L1 {m['l1_mean']:.3f}  ({m['seconds']:.0f} s)", flush=True)
    print(f"\n{d_ckpt['dataset']} {d_ckpt['image_size']}px, {args.sampler.upper()}-{args.steps}, "
          f"{args.n} test images per direction\n")
    print("| target | strength | scale | flip rate (oracle) | flip rate (guide) | MNAC | L1 mean ± std |")
    print("|---|---|---|---|---|---|---|")
    for m in rows:
        print(f"| {c_ckpt['attribute']}={m['target']} | {m['strength']:g} | {m['scale']:g} | "
              f"{m['flip_rate_oracle']:.1%} | {m['flip_rate_guide']:.1%} | {m['mnac']:.2f} | "
              f"{m['l1_mean']:.3f} ± {m['l1_std']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
