"""Counterfactual evaluation: flip rate, MNAC and L1 over strengths x guidance scales, in both directions.

    python benchmarks/counterfactuals.py --run_dir runs/toyfaces --device cpu
    python benchmarks/counterfactuals.py --run_dir runs/toyfaces --device cpu --localize
    python benchmarks/counterfactuals.py --run_dir runs/celeba_all --n 1000 --strengths 0.3 0.5 0.7 --scales 2 4 8

For each direction (toward 1 on test images without the attribute, toward 0 on images with it), each
--strengths value and each --scales value, it makes counterfactuals of the same --n test images and
prints one table: flip rate by the independent oracle, flip rate by the guiding classifier (not an
independent judge), MNAC (mean number of other oracle attributes changed) and the per-pixel L1 on [0, 1].
--localize adds the ACE-style mask (see generate.py --localize).

On toyfaces the true counterfactual of every test face is known (the same face redrawn with only the
attribute changed), so the table also gives the L1 distance to it, and a "truth" row per direction: the
oracle's verdict on the true counterfactuals, i.e. the best flip rate and MNAC this oracle can report.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common import (ArgumentParser, UserError, atomic_write_json, autocast, check_output_file, check_positive,  # noqa: E402
                    check_seed, resolve_device, run_main)
from dataset import to_float, toyface_counterfactuals  # noqa: E402
from generate import (DEFAULT_PRESERVE, counterfactual_metrics, dataset_inputs, encode, guide_probability,  # noqa: E402
                      load_run, make_counterfactuals, oracle_probabilities)


def main():
    p = ArgumentParser(description=ArgumentParser.summary(__doc__))
    p.add_argument("--run_dir", required=True, help="folder with diffusion_final.pth, classifier_best.pth, oracle_best.pth")
    p.add_argument("--n", type=int, default=64, help="test images per direction")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="strengths: start step t0 = round(strength * T) - 1")
    p.add_argument("--scales", type=float, nargs="+", default=[10.0, 30.0, 100.0], help="guidance scales")
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"), help="sampler")
    p.add_argument("--steps", type=int, default=100, help="steps over the full schedule")
    p.add_argument("--invert", action="store_true", help="reach x_t0 by DDIM inversion (use with --sampler ddim)")
    p.add_argument("--localize", action="store_true", help="ACE-style mask: repaint only where guidance changed")
    p.add_argument("--mask_threshold", type=float, default=0.05, help="with --localize: see generate.py")
    p.add_argument("--mask_dilation", type=int, default=None, help="with --localize: pixels (default: size / 32)")
    p.add_argument("--preserve", type=float, default=None,
                   help="hold the other attributes with this weight (default: generate.py's with a guide that knows "
                        "them all, else 0)")
    p.add_argument("--targets", type=int, nargs="+", default=[1, 0], help="directions to evaluate")
    p.add_argument("--batch_size", type=int, default=64, help="sampling batch size")
    p.add_argument("--device", default="cuda", help="device")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="bf16 autocast")
    p.add_argument("--resample", type=int, default=1, help="with --localize: RePaint resampling rounds per step")
    p.add_argument("--seed", type=int, default=0, help="seed of the encoding and sampling noise")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    for name in ("n", "steps", "batch_size", "resample"):
        check_positive("--" + name, getattr(args, name))
    check_seed(args.seed)
    for s in args.scales:
        check_positive("--scales", s, allow_zero=True)
    if any(not 0 <= s <= 1 for s in args.strengths):
        raise UserError(f"--strengths must lie in [0, 1], got {args.strengths}; e.g. --strengths 0.3 0.5 0.7")
    if not 0.0 <= args.mask_threshold < 1.0:
        raise UserError(f"--mask_threshold must be in [0, 1), got {args.mask_threshold}")
    if any(t not in (0, 1) for t in args.targets):
        raise UserError(f"--targets must be 0 or 1, got {args.targets}; e.g. --targets 1 0")
    if args.invert and args.sampler != "ddim":
        raise UserError("--invert is DDIM inversion; add --sampler ddim or drop --invert")
    check_positive("--preserve", args.preserve, allow_zero=True)
    check_output_file(args.json, "--json")

    device = resolve_device(args.device, "sampling")
    net, diffusion, d_ckpt, clf, c_ckpt, oracle, o_ckpt = load_run(args.run_dir, device)
    names, k, T = o_ckpt["attr_names"], o_ckpt["attr_names"].index(c_ckpt["attribute"]), diffusion.num_timesteps
    amp = autocast(device, args.precision)
    toy = d_ckpt["dataset"] == "toyfaces"
    preserve = args.preserve if args.preserve is not None else (DEFAULT_PRESERVE if clf.cfg.num_outputs > 1 else 0.0)
    if preserve and clf.cfg.num_outputs == 1:
        raise UserError(f"--preserve needs a guide that knows every attribute, but the one in '{args.run_dir}' learned "
                        f"only {c_ckpt['attribute']}; train it with train.py --guide_all_attributes, or drop --preserve")
    rows = []

    def add_row(m, target, strength, scale, x_cf, x_true, seconds):
        if x_true is not None:
            m["l1_to_truth"] = ((x_cf - x_true).abs() / 2).mean().item()
        m.update(target=target, strength=strength, scale=scale, seconds=seconds)
        rows.append(m)
        print(f"  {c_ckpt['attribute']} -> {target}  strength {_g(strength)}  scale {_g(scale)}: flip (oracle) "
              f"{m['flip_rate_oracle']:.1%}  flip (guide) {m['flip_rate_guide']:.1%}  MNAC {m['mnac']:.2f}  "
              f"L1 {m['l1_mean']:.3f}  ({seconds:.0f} s)", flush=True)

    for target in args.targets:
        x_in, names_in = dataset_inputs(d_ckpt, c_ckpt["attribute"], c_ckpt["attribute_index"], args.n, target, None)
        o_before = oracle_probabilities(oracle, x_in, device)
        x_true = None
        if toy:           # the exact counterfactuals: what a perfect editor returns, judged by the same oracle
            x_true = to_float(torch.from_numpy(toyface_counterfactuals(
                names_in, "test", d_ckpt["image_size"], d_ckpt["args"].get("seed", 0), c_ckpt["attribute"], target)))
            m = counterfactual_metrics(x_in, x_true, o_before, oracle_probabilities(oracle, x_true, device),
                                       guide_probability(clf, x_true, target, device), k, target, names)
            add_row(m, target, "truth", "-", x_true, x_true, 0.0)
        for strength in args.strengths:
            t_start = round(strength * T) - 1
            t0 = time.time()
            x_t0 = encode(net, diffusion, x_in, t_start, invert=args.invert, steps=args.steps, seed=args.seed,
                          batch_size=args.batch_size, device=device, amp=amp)       # once for all scales
            results, masks = make_counterfactuals(
                net, diffusion, clf, target, args.scales, x_in, x_t0, t_start, localize=args.localize,
                mask_threshold=args.mask_threshold, mask_dilation=args.mask_dilation, preserve=preserve,
                sampler=args.sampler, steps=args.steps, seed=args.seed, resample=args.resample,
                batch_size=args.batch_size, device=device, amp=amp)
            seconds = (time.time() - t0) / len(args.scales)
            for scale in args.scales:
                x_cf = results[scale]
                m = counterfactual_metrics(x_in, x_cf, o_before, oracle_probabilities(oracle, x_cf, device),
                                           guide_probability(clf, x_cf, target, device), k, target, names)
                m["mask_area"] = masks[scale].mean().item()
                add_row(m, target, strength, scale, x_cf, x_true, seconds)
    print(f"\n{d_ckpt['dataset']} {d_ckpt['image_size']}px, {args.sampler.upper()}-{args.steps}"
          f"{', DDIM inversion' if args.invert else ''}{', localized (ACE mask)' if args.localize else ''}"
          f"{f', preserving the other attributes (weight {preserve:g})' if preserve else ''}, "
          f"{args.n} test images per direction\n")
    print("| target | strength | scale | flip rate (oracle) | flip rate (guide) | MNAC | L1 mean ± std |"
          + (" L1 to truth |" if toy else "") + (" mask area |" if args.localize else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if toy else "") + ("---|" if args.localize else ""))
    for m in rows:
        print(f"| {c_ckpt['attribute']}={m['target']} | {_g(m['strength'])} | {_g(m['scale'])} | "
              f"{m['flip_rate_oracle']:.1%} | {m['flip_rate_guide']:.1%} | {m['mnac']:.2f} | "
              f"{m['l1_mean']:.3f} ± {m['l1_std']:.3f} |" + (f" {m['l1_to_truth']:.3f} |" if toy else "")
              + (f" {m.get('mask_area', 0):.1%} |" if args.localize else ""))
    if args.json:
        atomic_write_json(args.json, {"rows": rows, "args": vars(args), "preserve": preserve})


def _g(v) -> str:
    return v if isinstance(v, str) else f"{v:g}"


if __name__ == "__main__":
    run_main(main)
