"""Sampling benchmark: seconds per image and the oracle's verdict for each sampler, guided and unguided.

    python benchmarks/sampling.py --run_dir runs/toyfaces --device cpu
    python benchmarks/sampling.py --run_dir runs/celeba --configs ddpm:1000 ddim:50 ddim:100 --num_samples 256

For every sampler configuration it draws --num_samples images guided toward 1, guided toward 0 and
unguided (same noise), and prints one table: seconds per image, the guided/unguided time ratio, the
oracle's rate of the attribute in each set, and the data's base rate for comparison. The oracle
(trained by train.py on clean images, other architecture and seed) never steers the samples.

Whole-run times on a shared machine drift by tens of percent between runs, so the cost of guidance is
also measured per step: one DDPM step (``p_sample``) on a batch of --batch_size, unguided and guided,
interleaved --step_repeats times in this process, and the median of the per-pair ratios reported.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from classifier import make_cond_fn  # noqa: E402
from common import (ArgumentParser, UserError, atomic_write_json, autocast, check_output_file, check_positive,  # noqa: E402
                    check_seed, resolve_device, run_main)
from dataset import load_split  # noqa: E402
from generate import generate_images, load_run, oracle_probabilities  # noqa: E402
from train_throughput import sync  # noqa: E402


def parse_config(cfg: str) -> tuple:
    """"ddpm:1000", "ddim:50" or "ddim:50:0.5" -> (sampler, steps, eta)."""
    parts = cfg.split(":")
    try:
        sampler, steps = parts[0], int(parts[1])
        eta = float(parts[2]) if len(parts) == 3 else 0.0
    except (IndexError, ValueError):
        sampler, steps, eta = None, 0, 0.0
    if sampler not in ("ddpm", "ddim") or len(parts) > (3 if sampler == "ddim" else 2) or steps < 1 or not 0 <= eta <= 1:
        raise UserError(f"--configs entry {cfg!r} is not sampler:steps[:eta]; use e.g. ddpm:1000 ddim:50 ddim:50:1")
    return sampler, steps, eta


def step_ratio(net, diffusion, clf, device, amp, batch: int, repeats: int, scale: float) -> dict:
    """Seconds of one DDPM-100 step from t = T/2 (p_sample, DDPM Alg. 2) unguided and guided (eps_theta plus
    cond_fn, the classifier's forward and input-gradient), in ``repeats`` interleaved pairs after a warm-up.
    -> {"unguided_s", "guided_s": medians, "ratio": median of the per-pair guided / unguided ratios}."""
    size = net.cfg.image_size
    g = torch.Generator(device=device).manual_seed(0)
    x_t = torch.randn((batch, 3, size, size), generator=g, device=device)                # (B,3,S,S)
    T = diffusion.num_timesteps
    t = T // 2
    tt = torch.full((batch,), t, device=device, dtype=torch.long)
    tp = tt - max(1, T // 100)
    cond_fn = make_cond_fn(clf, 1, scale)
    timed = {"unguided": [], "guided": []}

    def one(fn):
        sync(device)
        t0 = time.perf_counter()
        with amp, torch.no_grad():
            diffusion.p_sample(net, x_t, tt, tp, fn, g)
        sync(device)
        return time.perf_counter() - t0

    for _ in range(2):                                                                  # warm-up
        one(None), one(cond_fn)
    for _ in range(repeats):
        timed["unguided"].append(one(None))
        timed["guided"].append(one(cond_fn))
    ratios = [a / b for a, b in zip(timed["guided"], timed["unguided"])]
    return {"unguided_s": statistics.median(timed["unguided"]), "guided_s": statistics.median(timed["guided"]),
            "ratio": statistics.median(ratios), "batch": batch, "repeats": repeats, "t": t}


def main():
    p = ArgumentParser(description=ArgumentParser.summary(__doc__))
    p.add_argument("--run_dir", required=True, help="folder with diffusion_final.pth, classifier_best.pth, oracle_best.pth")
    p.add_argument("--configs", nargs="+", default=["ddpm:1000", "ddim:50", "ddim:100"],
                   help="sampler:steps[:eta] list; eta (DDIM only, default 0) in [0, 1]")
    p.add_argument("--num_samples", type=int, default=64, help="images per (config, target)")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="classifier guidance scale")
    p.add_argument("--batch_size", type=int, default=64, help="sampling batch size")
    p.add_argument("--device", default="cuda", help="device")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="bf16 autocast")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--step_repeats", type=int, default=20,
                   help="interleaved unguided/guided single-step timings for the per-step ratio (0 skips it)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    for name in ("num_samples", "batch_size"):
        check_positive("--" + name, getattr(args, name))
    check_positive("--guidance_scale", args.guidance_scale, allow_zero=True)
    check_positive("--step_repeats", args.step_repeats, allow_zero=True)
    check_seed(args.seed)
    configs = [parse_config(c) for c in args.configs]
    check_output_file(args.json, "--json")

    device = resolve_device(args.device, "sampling")
    net, diffusion, d_ckpt, clf, c_ckpt, oracle, o_ckpt = load_run(args.run_dir, device)
    T = diffusion.num_timesteps
    for cfg, (_, steps, _) in zip(args.configs, configs):
        if steps > T:
            raise UserError(f"--configs entry {cfg!r} asks for {steps} steps but the model's schedule has {T}; "
                            f"use at most {T}")
    k = o_ckpt["attr_names"].index(c_ckpt["attribute"])
    a = d_ckpt["args"]
    test = load_split(d_ckpt["dataset"], "test", d_ckpt["image_size"], a["data_root"], a["subset_fraction"],
                      a["seed"], None, False, 0, verbose=False)
    base_rate = test.attrs[:, d_ckpt["attribute_index"]].float().mean().item()
    amp = autocast(device, args.precision)
    print(f"{d_ckpt['dataset']} {d_ckpt['image_size']}px, attribute {c_ckpt['attribute']}, base rate in test data "
          f"{base_rate:.1%}, {args.num_samples} samples per cell, scale {args.guidance_scale}, device {device}")

    step = None
    if args.step_repeats > 0:
        step = step_ratio(net, diffusion, clf, device, amp, args.batch_size, args.step_repeats, args.guidance_scale)
        print(f"one DDPM step, batch {args.batch_size}, t = {step['t']}: unguided {1e3 * step['unguided_s']:.1f} ms, "
              f"guided {1e3 * step['guided_s']:.1f} ms; guided/unguided {step['ratio']:.2f}x "
              f"(median of {args.step_repeats} interleaved pairs)", flush=True)

    rows = []

    def write_json():                  # after every row, so a run stopped part-way keeps what it measured
        if args.json:
            atomic_write_json(args.json, {"base_rate": base_rate, "rows": rows, "step": step, "args": vars(args)})

    write_json()
    for sampler, steps, eta in configs:
        row = {"config": f"{sampler.upper()}-{steps}" + (f" (eta {eta:g})" if eta else "")}
        for name, target, scale in (("toward 1", 1, args.guidance_scale), ("toward 0", 0, args.guidance_scale),
                                    ("unguided", 1, 0.0)):
            sync(device)
            t0 = time.time()
            x = generate_images(net, diffusion, clf if scale else None, target, scale, n=args.num_samples,
                                sampler=sampler, steps=steps, eta=eta, seed=args.seed, batch_size=args.batch_size,
                                device=device, amp=amp)
            sync(device)
            sec = time.time() - t0
            rate = (oracle_probabilities(oracle, x, device)[:, k] > 0.5).float().mean().item()
            row[name] = {"oracle_rate": rate, "seconds": sec, "s_per_image": sec / args.num_samples}
            print(f"  {row['config']:>10} {name:>9}: oracle {c_ckpt['attribute']} rate {rate:6.1%}  "
                  f"{sec:7.1f} s  ({sec / args.num_samples:.3f} s/image)", flush=True)
        row["guided_over_unguided_time"] = row["toward 1"]["seconds"] / row["unguided"]["seconds"]
        rows.append(row)
        write_json()

    ref = rows[0]
    print(f"\n| sampler | s/image guided | s/image unguided | guided/unguided time | speed-up vs {ref['config']} "
          f"| oracle rate toward 1 | toward 0 | unguided (base {base_rate:.1%}) | toward 1 vs {ref['config']} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['toward 1']['s_per_image']:.3f} | {r['unguided']['s_per_image']:.3f} | "
              f"{r['guided_over_unguided_time']:.2f}x | {ref['toward 1']['seconds'] / r['toward 1']['seconds']:.1f}x | "
              f"{r['toward 1']['oracle_rate']:.1%} | {r['toward 0']['oracle_rate']:.1%} | "
              f"{r['unguided']['oracle_rate']:.1%} | "
              f"{100 * (r['toward 1']['oracle_rate'] - ref['toward 1']['oracle_rate']):+.1f} pts |")


if __name__ == "__main__":
    run_main(main)
