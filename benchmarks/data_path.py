"""Data-path throughput: decoding JPEG files per image against the uint8 cache that train.py reads, and
the share of a training step spent waiting for data on each path.

    python benchmarks/data_path.py --device cpu                      # 2000 generated JPEGs, a tiny UNet
    python benchmarks/data_path.py --device cuda --base_channels 128 --num_res_blocks 2 --num_workers 8 --steps 50

Set-up: a CelebA-format folder of --n_images generated 178x218 JPEGs (``tests/fakes.make_celeba``; smooth
colours plus noise, so a bit harder to decode than real faces) in a temporary folder, deleted at the end.
Its train split (60% of the images) is decoded once into the cache by ``load_split`` and loaded again,
now memory-mapped from the .npy, exactly as train.py reads it on a second run.

1. Data only, one process, batches of --batch_size, both ending in a float batch in [-1, 1], flipped at random:
   JPEG   per image: PIL open + ``preprocess_pil`` (centre crop, LANCZOS resize) + to tensor, what a
          DataLoader ``Dataset.__getitem__`` would do every epoch; then stack, ``to_float``, ``random_flip``.
   cache  ``train.batches`` on the CPU: an epoch's order, index a batch from the memmap, ``to_float``, flip.
   Each repeat times one pass over the split on each path (the cache: passes until 0.2 s have gone by).
2. Waiting for data in a training step: a small UNet (flags below) trained with train_throughput.py's step.
   For each step, the time from asking for a batch until it is on --device (synchronised) against the
   whole step. The cache path is ``train.batches`` itself (on CUDA the split moves to the GPU when it takes
   under a quarter of its memory); the JPEG path is a ``DataLoader`` with --num_workers workers sampling with
   replacement, so that no epoch boundary restarts the workers. The first 2 steps of each are not timed
   (workers start, the split moves, caches warm).
The repeats interleave the two paths; the table shows medians and the median of the per-repeat ratios.
"""
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "tests"))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common import (PRECISION_HELP, PRECISIONS, ArgumentParser, UserError, amp_dtype, atomic_save,  # noqa: E402
                    check_output_file, check_positive, memory_format_for, resolve_device, run_main, to_json)
from dataset import load_split, preprocess_pil, random_flip, to_float  # noqa: E402
from diffusion_model import DiffusionConfig, GaussianDiffusion, UNet  # noqa: E402
from fakes import make_celeba  # noqa: E402
from train import add_unet_args, batches, placed  # noqa: E402
from train_throughput import checked_unet_config, make_train_step, sync  # noqa: E402

WARMUP_STEPS = 2          # untimed training steps at the start of each measured run
MIN_CACHE_SECONDS = 0.2   # the cache is timed over whole passes until this much time has gone by


def get_parser():
    p = ArgumentParser(__doc__)
    p.add_argument("--n_images", type=int, default=2000, help="generated CelebA images (60%% form the train split)")
    p.add_argument("--image_size", type=int, default=64, help="training image side in pixels")
    p.add_argument("--batch_size", type=int, default=32, help="images per batch / training step")
    p.add_argument("--num_workers", type=int, default=2,
                   help="DataLoader workers of the JPEG path in part 2 (and processes building the cache)")
    p.add_argument("--device", default="cpu", help="device of the training step: cpu, cuda, cuda:1")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per path per repeat (part 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved JPEG/cache measurements; medians reported")
    add_unet_args(p, base_channels=16, num_res_blocks=1)                                 # the UNet of part 2
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p


class JpegFaces(torch.utils.data.Dataset):
    """The per-image path: file -> uint8 (3, S, S), decoded on every access."""

    def __init__(self, paths: list, image_size: int):
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            x = preprocess_pil(img, self.image_size)                       # (S, S, 3) uint8
        return torch.from_numpy(x).permute(2, 0, 1)                        # -> (3, S, S)


def finish(xb: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The JPEG path's tail, as ``train.batches``'s: uint8 (B,3,S,S) -> float on device, in [-1, 1], flipped."""
    return random_flip(to_float(xb.to(device, non_blocking=True))).contiguous(memory_format=memory_format_for(device))


def cache_batches(split, device: torch.device, bs: int, epoch: int):
    """``train.batches`` over one epoch of ``split`` on ``device``, for one process: (x, attrs) batches."""
    run = SimpleNamespace(device=device, rank=0, world=1, args=SimpleNamespace(batch_size=bs, seed=0))
    return batches(run, *placed(run, split), "diffusion", epoch, 0, len(split) // bs)


def jpeg_pass(ds: JpegFaces, bs: int) -> tuple:
    """One pass over ``ds`` in random order, decoding in this process. -> (images, seconds)"""
    order, cpu, n = torch.randperm(len(ds)), torch.device("cpu"), 0
    t0 = time.perf_counter()
    for i in range(0, len(ds) - bs + 1, bs):
        finish(torch.stack([ds[int(j)] for j in order[i:i + bs]]), cpu)
        n += bs
    return n, time.perf_counter() - t0


def cache_passes(split, bs: int) -> tuple:
    """Epochs of ``train.batches`` over the memory-mapped split until MIN_CACHE_SECONDS. -> (images, seconds)"""
    n, epoch = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < MIN_CACHE_SECONDS:
        for _ in cache_batches(split, torch.device("cpu"), bs, epoch):
            n += bs
        epoch += 1
    return n, time.perf_counter() - t0


def train_run(fetch, step, steps: int, bs: int, device: torch.device) -> tuple:
    """WARMUP_STEPS + ``steps`` training steps on batches from ``fetch()``.
    -> (fraction of the timed step time spent in fetch, training images/s, ms per step)"""
    wait = total = 0.0
    for i in range(WARMUP_STEPS + steps):
        sync(device)
        t0 = time.perf_counter()
        x = fetch()
        sync(device)
        t1 = time.perf_counter()
        step(x)
        sync(device)
        t2 = time.perf_counter()
        if i >= WARMUP_STEPS:
            wait, total = wait + t1 - t0, total + t2 - t0
    return wait / total, steps * bs / total, 1e3 * total / steps


def main() -> int:
    args = get_parser().parse_args()
    for name in ("n_images", "image_size", "batch_size", "steps", "repeats", "base_channels", "num_res_blocks"):
        check_positive("--" + name, getattr(args, name))
    check_positive("--num_workers", args.num_workers, allow_zero=True)
    check_output_file(args.json, "--json")
    cfg = checked_unet_config(args)
    n_train = sum(1 for i in range(args.n_images) if i % 5 < 3)           # make_celeba: split codes 0,0,0,1,2
    if n_train < (WARMUP_STEPS + args.steps) * args.batch_size:        # part 2 takes its batches from one epoch
        raise UserError(f"--n_images {args.n_images} gives {n_train} training images, fewer than {WARMUP_STEPS} + "
                        f"--steps {args.steps} batches of --batch_size {args.batch_size}; raise --n_images or lower "
                        f"--steps or --batch_size")
    device = resolve_device(args.device, "benchmarking")
    bs = args.batch_size
    workers = f"{args.num_workers} worker{'s' if args.num_workers != 1 else ''}" if args.num_workers else "no workers"

    with tempfile.TemporaryDirectory(prefix="guidedemotion_data_path_") as tmp:
        t0 = time.perf_counter()
        img_dir, _, _ = make_celeba(os.path.join(tmp, "data"), "official", args.n_images)
        t_make = time.perf_counter() - t0
        build = dict(dataset="celeba", split="train", image_size=args.image_size, data_root=os.path.join(tmp, "data"),
                     subset_fraction=1.0, seed=0, cache_dir=os.path.join(tmp, "cache"), verbose=False)
        t0 = time.perf_counter()
        load_split(**build, num_workers=args.num_workers)                  # decodes and writes the cache
        t_cache = time.perf_counter() - t0
        split = load_split(**build)                                        # the memmap, as train.py's next run
        jpegs = JpegFaces([os.path.join(img_dir, name) for name in split.names], args.image_size)
        print(f"data_path: {args.n_images} generated 178x218 JPEGs in {t_make:.1f} s; train split {len(split)} "
              f"images decoded into the cache in {t_cache:.1f} s ({workers}); "
              f"{args.image_size}x{args.image_size}, batch {bs}", flush=True)

        # 1. data only
        rate = {"jpeg": [], "cache": []}
        for _ in range(args.repeats):
            n, sec = jpeg_pass(jpegs, bs)
            rate["jpeg"].append(n / sec)
            n, sec = cache_passes(split, bs)
            rate["cache"].append(n / sec)

        # 2. waiting for data inside a training step
        torch.manual_seed(0)
        model = UNet(cfg).to(device, memory_format=memory_format_for(device)).train()
        step = make_train_step(model, GaussianDiffusion(DiffusionConfig()), amp_dtype(device, args.precision), device)
        loader_gen = torch.Generator().manual_seed(0)
        wait = {"jpeg": [], "cache": []}
        train_ips = {"jpeg": [], "cache": []}
        step_ms = {"jpeg": [], "cache": []}
        for repeat in range(args.repeats):
            sampler = torch.utils.data.RandomSampler(jpegs, replacement=True, generator=loader_gen,
                                                     num_samples=(WARMUP_STEPS + args.steps) * bs)
            loader = torch.utils.data.DataLoader(jpegs, batch_size=bs, sampler=sampler, num_workers=args.num_workers,
                                                 pin_memory=device.type == "cuda", drop_last=True)
            it, cached = iter(loader), cache_batches(split, device, bs, repeat)
            results = {
                "jpeg": train_run(lambda: finish(next(it), device), step, args.steps, bs, device),
                "cache": train_run(lambda: next(cached)[0], step, args.steps, bs, device),
            }
            it = loader = cached = None                                    # stops the workers
            for k, (w, ips, ms) in results.items():
                wait[k].append(w)
                train_ips[k].append(ips)
                step_ms[k].append(ms)

    med = statistics.median
    ratio_data = med([c / j for c, j in zip(rate["cache"], rate["jpeg"])])
    ratio_train = med([c / j for c, j in zip(train_ips["cache"], train_ips["jpeg"])])
    print(f"training step: UNet base {args.base_channels} x {tuple(cfg.channel_mult)}, {args.num_res_blocks} res "
          f"blocks, attention at {tuple(cfg.attn_resolutions)}, device {device}; {args.steps} steps x "
          f"{args.repeats} repeats after {WARMUP_STEPS} warm-up; data-only rates in one process")
    print("\n| path | data images/s (1 process) | data wait, % of step | training images/s | ms/step |")
    print("|---|---|---|---|---|")
    rows = (("jpeg", f"JPEG files (PIL + preprocess_pil), DataLoader {workers}"), ("cache", "uint8 cache (memmap)"))
    for k, name in rows:
        print(f"| {name} | {med(rate[k]):.1f} | {100 * med(wait[k]):.1f}% | {med(train_ips[k]):.1f} | "
              f"{med(step_ms[k]):.1f} |")
    print(f"| ratio cache/JPEG | {ratio_data:.2f} | n/a | {ratio_train:.2f} | n/a |")
    print(f"\ncache / JPEG data throughput: {ratio_data:.1f}x "
          f"(target >= 20x: {'met' if ratio_data >= 20 else 'NOT met'})")
    if args.json:
        atomic_save(to_json({"args": vars(args), "n_train": len(split), "data_images_per_s": rate,
                             "data_wait_fraction": wait, "train_images_per_s": train_ips, "ms_per_step": step_ms,
                             "ratio_cache_over_jpeg": {"data": ratio_data, "train": ratio_train}}), args.json)
    return 0


if __name__ == "__main__":
    run_main(main)
