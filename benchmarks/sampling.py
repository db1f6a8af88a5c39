"""Sampling benchmark: seconds per image and the oracle's verdict for each sampler, guided and unguided.

    python benchmarks/sampling.py --run_dir runs/toyfaces --device cpu
    python benchmarks/sampling.py --run_dir runs/celeba --configs ddpm:1000 ddim:50 ddim:100 --num_samples 256

For every sampler configuration it draws --num_samples images guided toward 1, guided toward 0 and
unguided (same noise), and prints one table: seconds per image, the guided/unguided time ratio, the
oracle's rate of the attribute in each set, and the data's base rate for comparison. The oracle
(trained by train.py on clean images, other architecture and seed) never steers the samples.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common import ArgumentParser, autocast, resolve_device  # noqa: E402
from dataset import load_split  # noqa: E402
from generate import generate_images, load_run, oracle_probabilities  # noqa: E402


def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run_dir", required=True, help="folder with diffusion_final.pth, classifier_best.pth, oracle_best.pth")
    p.add_argument("--configs", nargs="+", default=["ddpm:1000", "ddim:50", "ddim:100"], help="sampler:steps list")
    p.add_argument("--num_samples", type=int, default=64, help="images per (config, target)")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="classifier guidance scale")
    p.add_argument("--batch_size", type=int, default=64, help="sampling batch size")
    p.add_argument("--device", default="cuda", help="device")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="bf16 autocast")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    device = resolve_device(args.device, "sampling")
    net, diffusion, d_ckpt, clf, c_ckpt, oracle, o_ckpt = load_run(args.run_dir, device)
    k = o_ckpt["attr_names"].index(c_ckpt["attribute"])
    a = d_ckpt["args"]
    test = load_split(d_ckpt["dataset"], "test", d_ckpt["image_size"], a["data_root"], a["subset_fraction"],
                      a["seed"], None, False, 0, verbose=False)
    base_rate = test.attrs[:, d_ckpt["attribute_index"]].float().mean().item()
    amp = autocast(device, args.precision)
    print(f"{d_ckpt['dataset']} {d_ckpt['image_size']}px, attribute {c_ckpt['attribute']}, base rate in test data "
          f"{base_rate:.1%}, {args.num_samples} samples per cell, scale {args.guidance_scale}, device {device}")

    rows = []
    for cfg in args.configs:
        sampler, steps = cfg.split(":")
        row = {"config": f"{sampler.upper()}-{steps}"}
        for name, target, scale in (("toward 1", 1, args.guidance_scale), ("toward 0", 0, args.guidance_scale),
                                    ("unguided", 1, 0.0)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            x = generate_images(net, diffusion, clf if scale else None, target, scale, n=args.num_samples,
                                sampler=sampler, steps=int(steps), seed=args.seed, batch_size=args.batch_size,
                                device=device, amp=amp)
            if device.type == "cuda":
                torch.cuda.synchronize()
            sec = time.time() - t0
            rate = (oracle_probabilities(oracle, x.to(device))[:, k] > 0.5).float().mean().item()
            row[name] = {"oracle_rate": rate, "seconds": sec, "s_per_image": sec / args.num_samples}
            print(f"  {row['config']:>10} {name:>9}: oracle {c_ckpt['attribute']} rate {rate:6.1%}  "
                  f"{sec:7.1f} s  ({sec / args.num_samples:.3f} s/image)", flush=True)
        row["guided_over_unguided_time"] = row["toward 1"]["seconds"] / row["unguided"]["seconds"]
        rows.append(row)

    ref = rows[0]
    print(f"\n| sampler | s/image guided | s/image unguided | guided/unguided time | speed-up vs {ref['config']} "
          f"| oracle rate toward 1 | toward 0 | unguided (base {base_rate:.1%}) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['toward 1']['s_per_image']:.3f} | {r['unguided']['s_per_image']:.3f} | "
              f"{r['guided_over_unguided_time']:.2f}x | {ref['toward 1']['seconds'] / r['toward 1']['seconds']:.1f}x | "
              f"{r['toward 1']['oracle_rate']:.1%} | {r['toward 0']['oracle_rate']:.1%} | "
              f"{r['unguided']['oracle_rate']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base_rate": base_rate, "rows": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
