"""Train the guiding classifier, the oracle and the diffusion model, in that order.

    python train.py --attribute Smiling --classifier_epochs 10 --diffusion_epochs 50   # CelebA under ./data
    torchrun --nproc_per_node=4 train.py --attribute Smiling                            # several GPUs (README)
    python train.py --resume auto --output_dir runs/toyfaces                            # continue a stopped run
The README's first command trains the toyfaces demo on a CPU.

Writes to --output_dir: classifier_best.pth, oracle_best.pth, diffusion_epoch_{N}.pth, diffusion_final.pth,
last.pth (resumable state), train_log.jsonl, samples/diffusion_epoch_{N}.png.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from classifier import ClassifierConfig, NoisyClassifier, Oracle, OracleConfig
from common import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, PRECISION_HELP, PRECISIONS, ArgumentParser, UserError,
                    amp_dtype, atomic_save, autocast, check_positive, check_seed, ensure_writable_dir, grid_image,
                    load_checkpoint, make_checkpoint, memory_format_for, resolve_device, run_main, to_uint8)
from dataset import DATASETS, attribute_index, attribute_names, load_split, random_flip, to_float
from diffusion_model import DiffusionConfig, GaussianDiffusion, UNet, UNetConfig

STAGES = ("classifier", "oracle", "diffusion")
OUTPUT_FILES = ("classifier_best.pth", "oracle_best.pth", "diffusion_final.pth", "last.pth")
# --resume takes every flag from the checkpoint except these, which say where this run's files are
NOT_RESUMED = ("resume", "overwrite", "output_dir", "cache_dir")
# and a flag given with --resume must equal the saved one, except these: where and how the process runs, and
# how often it samples and saves (sampling during training has its own generator)
ADJUSTABLE_ON_RESUME = ("device", "precision", "num_workers", "data_root", "download", "compile", "save_every",
                        "sample_every", "checkpoint_every")
ORACLE_LR = 1e-3                        # AdamW, weight decay 0.05 (as the guide's); BatchNorm takes the larger rate
GRAD_CLIP = 1.0                         # gradient-norm clipping, every network
LOG_EVERY = 50                          # steps between progress-bar losses, NaN checks and (DDP) stop checks


def int_tuple(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_unet_args(p, base_channels=128, num_res_blocks=2) -> None:
    """The UNet architecture flags, shared with the benchmarks."""
    p.add_argument("--base_channels", type=int, default=base_channels, help="UNet width of the first level")
    p.add_argument("--channel_mult", type=int_tuple, default=(1, 2, 2, 2), help="UNet width multipliers per level")
    p.add_argument("--num_res_blocks", type=int, default=num_res_blocks, help="UNet residual blocks per level")
    p.add_argument("--attn_resolutions", type=int_tuple, default=(16,), help="feature-map sides with self-attention")


def get_parser() -> ArgumentParser:
    p = ArgumentParser(__doc__)
    # data
    p.add_argument("--dataset", default="celeba", choices=DATASETS, help="celeba, or toyfaces (embedded demo data)")
    p.add_argument("--data_root", default="./data", help="CelebA root (official/torchvision or Kaggle layout)")
    p.add_argument("--attribute", default="Smiling", help="attribute the guide steers (a CelebA name); it learns all")
    p.add_argument("--image_size", type=int, default=64, help="training image side in pixels")
    p.add_argument("--subset_fraction", type=float, default=0.5, help="fraction of each split used (seed's 50%%)")
    p.add_argument("--cache_dir", default=None, help="folder for the decoded-image cache (default: <output_dir>/cache)")
    p.add_argument("--download", action="store_true", help="download CelebA with torchvision if not under --data_root")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that decode images into the cache (default: min(8, CPU count); 0: this one)")
    # schedule and models
    p.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T of the linear beta schedule")
    add_unet_args(p)
    p.add_argument("--dropout", type=float, default=0.1, help="UNet dropout")
    p.add_argument("--classifier_channels", type=int, default=64, help="guide width (the oracle's is half of it)")
    # optimisation
    p.add_argument("--batch_size", type=int, default=32, help="batch size per process")
    p.add_argument("--classifier_epochs", type=int, default=10, help="epochs for the guiding classifier (0 skips)")
    p.add_argument("--oracle_epochs", type=int, default=5, help="epochs for the oracle (0 skips)")
    p.add_argument("--diffusion_epochs", type=int, default=50, help="epochs for the diffusion model (0 skips)")
    p.add_argument("--lr", type=float, default=2e-4, help="diffusion learning rate (AdamW), for the global batch")
    p.add_argument("--classifier_lr", type=float, default=3e-4, help="guide learning rate (AdamW)")
    p.add_argument("--warmup_steps", type=int, default=500, help="linear learning-rate warm-up steps")
    p.add_argument("--ema_decay", type=float, default=0.9999,
                   help="EMA decay of the diffusion weights, warmed up as min(decay, (1+step)/(10+step))")
    p.add_argument("--max_steps_per_epoch", type=int, default=None, help="cap optimizer steps per epoch (quick runs)")
    # bookkeeping
    p.add_argument("--output_dir", default=".", help="where checkpoints, logs and sample grids go")
    p.add_argument("--seed", type=int, default=0, help="seed for the data subset, initialisation and noise")
    p.add_argument("--save_every", type=int, default=10, help="write diffusion_epoch_{N}.pth every N epochs")
    p.add_argument("--sample_every", type=int, default=5, help="unguided EMA sample grid every N epochs (0: never)")
    p.add_argument("--checkpoint_every", type=int, default=500, help="write last.pth every N optimizer steps")
    p.add_argument("--resume", help="continue from a last.pth: 'auto' for <output_dir>/last.pth, or a path (the run "
                   "continues in that file's folder)")
    p.add_argument("--overwrite", action="store_true", help="allow starting over in an output_dir with checkpoints")
    p.add_argument("--device", default="cuda", help="cuda, cpu, cuda:1, mps (falls back to cpu without CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks for training (a GPU option)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    return p


def check_args(args, given: set) -> None:
    for name in ("image_size", "batch_size", "timesteps", "base_channels", "num_res_blocks", "classifier_channels",
                 "save_every", "checkpoint_every", "max_steps_per_epoch", "lr", "classifier_lr"):
        check_positive("--" + name, getattr(args, name))
    for name in ("classifier_epochs", "oracle_epochs", "diffusion_epochs", "num_workers", "warmup_steps",
                 "sample_every"):
        check_positive("--" + name, getattr(args, name), allow_zero=True)
    check_seed(args.seed)
    if not 0.0 < args.subset_fraction <= 1.0:
        raise UserError(f"--subset_fraction must be in (0, 1], got {args.subset_fraction}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise UserError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.classifier_channels < 2:
        raise UserError(f"--classifier_channels must be >= 2 (the oracle takes half), got {args.classifier_channels}")
    if args.image_size < 16:
        raise UserError(f"--image_size {args.image_size} is too small; use at least 16")
    if problem := unet_config(args).check():
        raise UserError(problem + " (--image_size / --channel_mult / --attn_resolutions / --dropout)")
    attribute_index(args.dataset, args.attribute)   # raises with the closest name
    if args.dataset == "toyfaces" and (flag := next((f for f in ("download", "data_root") if f in given), None)):
        raise UserError(f"--{flag} is for CelebA, but toyfaces are drawn, not read; drop --{flag}")


def unet_config(args) -> UNetConfig:
    return UNetConfig(image_size=args.image_size, base_channels=args.base_channels, channel_mult=args.channel_mult,
                      num_res_blocks=args.num_res_blocks, attn_resolutions=args.attn_resolutions, dropout=args.dropout)


# ----------------------------------------------------------------------------------------------
# The run: devices, processes, output files, resume state, signals

class Run:
    """What every stage needs: arguments, device, processes, precision, output paths and the resume state."""

    def __init__(self, args, resume_state):
        self.args, self.resume_state = args, resume_state
        want = str(resolve_device(args.device, "training"))     # a bad --device fails here, before any write
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if self.world > 1:
            if want.startswith("cuda"):
                want = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(want)
            dist.init_process_group("nccl" if want.startswith("cuda") else "gloo")
        self.device, self.main = torch.device(want), self.rank == 0
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.amp = amp_dtype(self.device, args.precision)
        self.on_failed_write = f"free disk space, then --resume auto --output_dir {args.output_dir}"
        self.autocast = autocast(self.device, self.amp)

    def say(self, *args, **kwargs) -> None:
        if self.main:
            print(*args, **kwargs)

    def log(self, record: dict) -> None:
        if self.main:
            try:
                with open(os.path.join(self.args.output_dir, "train_log.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")           # a line at a time
            except OSError as e:
                raise UserError(f"could not append to train_log.jsonl ({e.strerror or e}); "
                                f"{self.on_failed_write}") from None
            if not record.get("final"):                          # a stage's final record prints its own line
                print(" | ".join(f"{k} {v}" for k, v in record.items() if not isinstance(v, dict)), flush=True)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def from_main(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank: GPUs can disagree in the last bit, and a best-so-far decision made on
        differing scores would leave one rank alone in ``save``'s barrier."""
        if self.world == 1:
            return x
        y = x.to(self.device, copy=True).contiguous()
        dist.broadcast(y, src=0)
        return y.to(x.device)

    def save(self, obj, name: str) -> None:
        """Rank 0 writes atomically; the others wait so no one reads a half-made checkpoint."""
        if self.main:
            atomic_save(obj, os.path.join(self.args.output_dir, name), self.on_failed_write)
        self.barrier()


def resumed_args(args, given: set):
    """With --resume: the last.pth to continue, and ``args`` set to the run's own flags (those given on this
    command line must agree, but where and how the process runs). Without it: None."""
    if not args.resume:
        return None
    path = os.path.join(args.output_dir, "last.pth") if args.resume == "auto" else args.resume
    if args.resume == "auto" and not os.path.isfile(path):
        raise UserError(f"--resume auto: no last.pth in '{args.output_dir}'; start a new run without --resume")
    state = load_checkpoint(path, kind="train_state", flag="--resume")
    if (saved := len(state["rng"])) != (world := int(os.environ.get("WORLD_SIZE", 1))):   # shards and batch index
        raise UserError(f"--resume: {path} was written by {saved} process(es), this run has {world}; resume with "
                        f"{saved} (each epoch's data order and batch index depend on it)")
    folder = os.path.dirname(os.path.abspath(path))     # a run continues in its own folder, beside its best files
    if "output_dir" not in given:
        args.output_dir = folder
    elif os.path.realpath(args.output_dir) != os.path.realpath(folder):
        raise UserError(f"--resume {path} continues the run in its own folder '{folder}', not in --output_dir "
                        f"'{args.output_dir}'; drop --output_dir, or copy the run's folder there and resume that")
    for k, v in state["args"].items():
        if k in NOT_RESUMED or not hasattr(args, k):
            continue
        v = tuple(v) if isinstance(v, list) else v
        if k not in given:
            setattr(args, k, v)
        elif getattr(args, k) != v and k not in ADJUSTABLE_ON_RESUME:
            raise UserError(f"--{k} {getattr(args, k)} differs from the resumed run's {v}, and --resume keeps the "
                            f"run's own flags; drop --{k}, or start a new run (--overwrite or another --output_dir)")
    return state


def check_output_dir(args, resuming: bool) -> None:
    ensure_writable_dir(args.output_dir)
    found = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(args.output_dir, f))]
    if found and not resuming and not args.overwrite:
        raise UserError(f"'{args.output_dir}' already holds {', '.join(found)}; pass --resume auto to continue that "
                        f"run or --overwrite to start over (or choose another --output_dir)")


def forget_earlier_run(run) -> None:
    """--overwrite, once the input has loaded: the earlier run's last.pth and log go, so that a crash before this
    run's first save cannot resume that run instead; its checkpoints are replaced as this run writes its own."""
    stale = [f for f in ("last.pth", "train_log.jsonl") if os.path.exists(os.path.join(run.args.output_dir, f))]
    for f in stale:
        os.remove(os.path.join(run.args.output_dir, f))
    if stale:
        print(f"--overwrite: removed the earlier run's {' and '.join(stale)}; its checkpoints are replaced as this "
              f"run's stages write theirs (a stage given 0 epochs keeps the earlier one)")


STOP = {"signal": None}


def _on_signal(signum, frame):
    if STOP["signal"] is not None:      # second Ctrl-C: leave at once
        raise KeyboardInterrupt
    STOP["signal"] = signum
    print(f"\n{signal.Signals(signum).name} received: saving last.pth after this step (under torchrun: at the next "
          f"log step or epoch end)", flush=True)


def stop_requested(run, at_log: bool) -> bool:
    """Whether SIGINT/SIGTERM asked to stop; under DDP every rank agrees, at log steps only (one all-reduce)."""
    if run.world == 1:
        return STOP["signal"] is not None
    if not at_log:
        return False
    flag = torch.tensor([int(STOP["signal"] is not None)], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def check_finite(run, stage: str, first_bad: torch.Tensor) -> None:
    """Stop on the first non-finite loss (``first_bad``: its step, -1 if none), before anything is saved after it."""
    if run.world > 1:
        first_bad = first_bad.clone()
        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
    if (bad := int(first_bad.item())) >= 0:
        raise UserError(f"{stage}: the loss became NaN/Inf at step {bad}; stopped without saving, so the last good "
                        f"checkpoint is kept; check the data or start again with a lower learning rate")


def save_last(run, stage, modules, optimizer, scaler, epoch, batch, step, state) -> None:
    """last.pth: everything to continue exactly here, with every rank's RNGs (shuffling, noise, timesteps, flips)."""
    cuda = run.device.type == "cuda"
    rng = {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(run.device)} if cuda else {})}
    rngs = [rng] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, rng)
    run.save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "kind": "train_state",
              "stage": stage, "epoch": epoch, "batch": batch, "step": step, "state": dict(state),
              "modules": {k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
              "scaler": scaler.state_dict(), "rng": rngs, "args": vars(run.args)}, "last.pth")


def restore(run, stage, modules, optimizer, scaler, state) -> tuple:
    """Continue from last.pth when it stopped in this stage: -> (epoch, batch, step) to start at."""
    rs = run.resume_state
    if rs is None or rs["stage"] != stage:
        return 0, 0, 0
    for name, m in modules.items():
        m.load_state_dict(rs["modules"][name])
    optimizer.load_state_dict(rs["optimizer"])
    if scaler.is_enabled() and rs["scaler"]:            # fp16 before and now (--precision may resolve otherwise here)
        scaler.load_state_dict(rs["scaler"])
    state.update(rs["state"])
    rng = rs["rng"][run.rank]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and run.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    run.say(f"resuming {stage} at epoch {rs['epoch'] + 1}, batch {rs['batch']}, step {rs['step']}")
    run.resume_state = None
    return rs["epoch"], rs["batch"], rs["step"]


# ----------------------------------------------------------------------------------------------
# The training loop shared by the three stages

def wrap(model, run: Run):
    """The device's layout, torch.compile in place (its state dict stays the plain module's), then DDP around it
    (compiling the inner module, as PyTorch's "Where to apply torch.compile?" advises)."""
    model = model.to(run.device, memory_format=memory_format_for(run.device))
    if run.rank:                  # the same initial weights everywhere, then each rank its own t, eps, flips, dropout
        torch.manual_seed(torch.initial_seed() + 1_000_003 * run.rank)
    if run.args.compile:
        model.compile()
    if run.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return model


def make_optimizer(params, lr: float, weight_decay: float, device):
    """AdamW, fused (one pass over all parameters) on CUDA and the CPU, PyTorch's default elsewhere."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cuda", "cpu"))


def epoch_order(n: int, seed: int, stage: str, epoch: int, rank: int, world: int) -> torch.Tensor:
    """This rank's indices for one epoch: DistributedSampler's shard of a permutation seeded by (seed, stage) and
    ``set_epoch(epoch)``: the same after a resume, disjoint across ranks, the uneven tail dropped (equal steps)."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, drop_last=True,
                                 seed=seed * 1009 + STAGES.index(stage))
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def placed(run, split) -> tuple:
    """The split's images and labels where training reads them: the images on the GPU when they take under a
    quarter of its memory (else each batch is copied from pinned memory), the labels on the device."""
    images, device = split.images, run.device
    if device.type == "cuda" and images.numel() < 0.25 * torch.cuda.get_device_properties(device).total_memory:
        images = images.to(device)
    return images, split.attrs.to(device)


def batches(run, images, attrs, stage: str, epoch: int, start: int, stop: int):
    """This rank's batches start..stop-1 of one epoch of ``placed`` data: (x (B,3,S,S) in [-1, 1], flipped at random,
    in the device's layout; attrs (B,A)). The epoch's order is copied once, so a step makes no host-device copy."""
    device, bs = run.device, run.args.batch_size
    order = epoch_order(len(images), run.args.seed, stage, epoch, run.rank, run.world)
    order_images, order_attrs = order.to(images.device), order.to(device)
    for b in range(start, stop):
        xb = images[order_images[b * bs:(b + 1) * bs]]
        if xb.device != device:
            xb = (xb.pin_memory() if device.type == "cuda" else xb).to(device, non_blocking=True)
        yield random_flip(to_float(xb)).contiguous(memory_format=memory_format_for(device)), \
            attrs[order_attrs[b * bs:(b + 1) * bs]]


def fit(run, stage, model, optimizer, split, epochs, lr, loss_fn, end_of_epoch, state, ema=None) -> int:
    """Train ``model`` for ``epochs`` epochs on ``loss_fn(x, attrs) -> loss``; returns the optimizer steps taken.
    ``end_of_epoch(epoch, record) -> dict`` evaluates and saves; ``state`` (best scores) is kept in last.pth."""
    args, device = run.args, run.device
    net = getattr(model, "module", model)               # the plain module inside DistributedDataParallel
    modules = {"model": net, **({"ema": ema} if ema is not None else {})}
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp == torch.float16)   # fp16 needs loss scaling
    start_epoch, start_batch, step = restore(run, stage, modules, optimizer, scaler, state)
    steps_per_epoch = min((len(split) // run.world) // args.batch_size, args.max_steps_per_epoch or float("inf"))
    first_bad, data = torch.full((), -1, dtype=torch.long, device=device), placed(run, split)  # first NaN step
    for epoch in range(start_epoch, epochs):
        model.train()
        s0, n0 = state.get("epoch_loss", (0.0, 0)) if start_batch else (0.0, 0)   # this epoch's, before a resume
        t0, loss_sum, n = time.time(), torch.full((), s0, device=device), n0
        bar = tqdm(batches(run, *data, stage, epoch, start_batch, steps_per_epoch), desc=f"{stage} {epoch + 1}/"
                   f"{epochs}", initial=start_batch, total=steps_per_epoch, disable=not run.main, leave=False)
        for b, (x, attrs) in enumerate(bar, start_batch):
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / max(1, args.warmup_steps))       # linear warm-up
            with run.autocast:
                loss = loss_fn(x, attrs)
            optimizer_step(model, optimizer, scaler, loss)
            if ema is not None:
                update_ema(ema, net, args.ema_decay, step)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            loss_sum, n, step = loss_sum + torch.nan_to_num(loss.detach()), n + 1, step + 1
            at_log = step % LOG_EVERY == 0
            stop = stop_requested(run, at_log)
            save = stop or step % args.checkpoint_every == 0
            if at_log or save:                                  # one host sync, at log and save points only
                check_finite(run, stage, first_bad)
            if at_log:
                bar.set_postfix(loss=f"{(loss_sum / n).item():.4f}")
            if save:
                state["epoch_loss"] = (loss_sum.item(), n)
                save_last(run, stage, modules, optimizer, scaler, epoch, b + 1, step, state)
            if stop:
                stop_here(run)
        bar.close()
        check_finite(run, stage, first_bad)
        model.eval()
        record = {"stage": stage, "epoch": epoch + 1, "step": step, "loss": round((loss_sum / max(n, 1)).item(), 6),
                  "images_per_s": round((n - n0) * args.batch_size * run.world / (time.time() - t0), 1)}   # rank 0's
        start_batch = 0
        record.update(end_of_epoch(epoch + 1, record))
        run.log(record)
        save_last(run, stage, modules, optimizer, scaler, epoch + 1, 0, step, state)
        if stop_requested(run, at_log=True):          # under DDP the checks above are at log steps only
            stop_here(run)
    return step


def optimizer_step(model, optimizer, scaler, loss) -> None:
    """Backward, gradient-norm clipping and the AdamW step, through the fp16 loss scale (a no-op scaler otherwise)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)                          # clip the true gradient, not the scaled one
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    scaler.step(optimizer)                              # skipped when the scaled gradient overflowed
    scaler.update()


def stop_here(run) -> None:
    run.say(f"stopped by signal; resumable state saved to {os.path.join(run.args.output_dir, 'last.pth')}\n"
            f"continue with: python train.py --resume auto --output_dir {run.args.output_dir}", flush=True)
    sys.exit(128 + STOP["signal"])


@torch.no_grad()
def update_ema(ema, model, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * theta, with d warmed up as min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ----------------------------------------------------------------------------------------------
# The three stages

def eval_timesteps(T: int) -> tuple:
    """Clean images and the noisy ones at T/4, T/2, 3T/4 (t = 250, 500, 750 for T = 1000)."""
    return (0, T // 4, T // 2, 3 * T // 4)


@torch.no_grad()
def accuracy(run, split, predict, batch_size=256) -> torch.Tensor:
    """Per-attribute accuracy of ``predict(x0) -> logits (B,A)``, given the clean images of ``split``. -> (A,)"""
    correct = 0
    for i in range(0, len(split), batch_size):
        with run.autocast:
            logits = predict(to_float(split.images[i:i + batch_size]).to(run.device)).float().cpu()
        correct = correct + ((logits > 0) == split.attrs[i:i + batch_size].bool()).float().sum(0)
    return run.from_main(correct / len(split))


def guide_accuracy(run, net, diffusion, split) -> dict:
    """{t: accuracy (A,)} of the guide on q_sample(x_0, t) with fixed noise, t in ``eval_timesteps`` (0: clean x_0)."""
    def at(t_value):
        g = torch.Generator().manual_seed(1234 + t_value)

        def predict(x0):
            t = torch.full((x0.shape[0],), t_value, device=run.device, dtype=torch.long)
            x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g).to(run.device)) if t_value else x0
            return net(x_t, t)
        return accuracy(run, split, predict)
    return {t: at(t) for t in eval_timesteps(diffusion.num_timesteps)}


def train_guide(run, data, diffusion) -> None:
    """1. The guide p_phi(a | x_t, t) over every attribute, on q_sample(x_0, t) with t uniform (DDPM Eq. 4). Its best
    epoch is the best on the steered attribute over noisy validation images (mean over ``eval_timesteps``):
    guidance reads it at every noise level, and clean accuracy saturates early."""
    args, k = run.args, data["attr_idx"]
    torch.manual_seed(args.seed)
    levels = max(1, min(4, args.image_size.bit_length() - 2))          # stop at a 4x4 (or larger) map
    cfg = ClassifierConfig(image_size=args.image_size, base_channels=args.classifier_channels,
                           channel_mult=(1, 2, 2, 4)[:levels], num_outputs=len(data["names"]), target_index=k)
    net = NoisyClassifier(cfg).to(run.device)
    model, state = wrap(net, run), {"best": -1.}
    opt = make_optimizer(net.parameters(), args.classifier_lr, 0.05, run.device)
    run.say(f"classifier: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters")

    def loss_fn(x0, attrs):
        t = torch.randint(0, args.timesteps, (x0.shape[0],), device=run.device)
        x_t = diffusion.q_sample(x0, t, torch.randn_like(x0))
        return F.binary_cross_entropy_with_logits(model(x_t, t).float(), attrs.float())

    def end_of_epoch(epoch, record):
        acc = {t: round(a[k].item(), 4) for t, a in guide_accuracy(run, net, diffusion, data["valid"]).items()}
        out = {"valid_acc": acc, "valid_noisy_mean": round(sum(acc.values()) / len(acc), 4)}
        if out["valid_noisy_mean"] > state["best"]:
            state["best"] = out["valid_noisy_mean"]
            run.save(make_checkpoint("classifier", cfg, net.state_dict(), diffusion=asdict(diffusion.cfg), epoch=epoch,
                                     valid_acc=acc, **data["meta"]), "classifier_best.pth")
            out["saved"] = "classifier_best.pth"
        return out

    fit(run, "classifier", model, opt, data["train"], args.classifier_epochs, args.classifier_lr, loss_fn,
        end_of_epoch, state)
    best = load_checkpoint(os.path.join(args.output_dir, "classifier_best.pth"), "classifier")
    net.load_state_dict(best["model"])
    acc = guide_accuracy(run, net, diffusion, data["test"])
    best["test_acc"] = {t: dict(zip(data["names"], (round(v, 4) for v in a.tolist()))) for t, a in acc.items()}
    run.log({"stage": "classifier", "final": True, "test_acc": best["test_acc"]})
    run.say(f"classifier test accuracy on {args.attribute}: "
            + ", ".join(f"t={t}: {a[k].item():.1%}" for t, a in acc.items()) + "; every attribute, clean: "
            + ", ".join(f"{n} {a:.1%}" for n, a in best["test_acc"][0].items()))
    run.save(best, "classifier_best.pth")                               # with its test accuracy


def train_oracle(run, data) -> None:
    """2. The oracle: clean images, every attribute, another architecture and seed; it never steers."""
    args = run.args
    torch.manual_seed(args.seed + 7919)
    cfg = OracleConfig(image_size=args.image_size, num_attributes=len(data["names"]),
                       width=args.classifier_channels // 2)
    net = Oracle(cfg).to(run.device)
    if run.world > 1 and run.device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    model, opt, state = wrap(net, run), make_optimizer(net.parameters(), ORACLE_LR, 0.05, run.device), {"best": -1.}

    def end_of_epoch(epoch, record):
        acc = accuracy(run, data["valid"], net)
        out = {"valid_mean_acc": round(acc.mean().item(), 4)}
        if out["valid_mean_acc"] > state["best"]:
            state["best"] = out["valid_mean_acc"]
            run.save(make_checkpoint("oracle", cfg, net.state_dict(), epoch=epoch, **data["meta"]), "oracle_best.pth")
            out["saved"] = "oracle_best.pth"
        return out

    fit(run, "oracle", model, opt, data["train"], args.oracle_epochs, ORACLE_LR,
        lambda x, attrs: F.binary_cross_entropy_with_logits(model(x).float(), attrs.float()), end_of_epoch, state)
    best = load_checkpoint(os.path.join(args.output_dir, "oracle_best.pth"), "oracle")
    net.load_state_dict(best["model"])
    acc = accuracy(run, data["test"], net)
    best["test_acc"] = dict(zip(data["names"], (round(a, 4) for a in acc.tolist())))
    run.log({"stage": "oracle", "final": True, "test_mean_acc": round(acc.mean().item(), 4),
             "test_acc": best["test_acc"]})
    run.say(f"oracle test accuracy: mean {acc.mean().item():.1%}; "
            + ", ".join(f"{n} {a:.1%}" for n, a in best["test_acc"].items()))
    run.save(best, "oracle_best.pth")                                   # with its test accuracy


def train_diffusion(run, data, diffusion) -> None:
    """3. The denoiser eps_theta(x_t, t) (DDPM Alg. 1) with an EMA of its weights; only last.pth has the optimizer."""
    args = run.args
    torch.manual_seed(args.seed + 104729)
    cfg = unet_config(args)
    net = UNet(cfg).to(run.device)
    ema = UNet(cfg).to(run.device, memory_format=memory_format_for(run.device)).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    model, opt = wrap(net, run), make_optimizer(net.parameters(), args.lr, 0.0, run.device)
    run.say(f"diffusion UNet: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters")
    noise = torch.randn((16, 3, args.image_size, args.image_size), generator=torch.Generator().manual_seed(args.seed))

    def checkpoint(epoch, step):
        return make_checkpoint("diffusion", cfg, net.state_dict(), ema=ema.state_dict(),
                               diffusion=asdict(diffusion.cfg), epoch=epoch, step=step, **data["meta"])

    def end_of_epoch(epoch, record):
        out = {}
        if args.sample_every and (epoch % args.sample_every == 0 or epoch == args.diffusion_epochs) and run.main:
            with run.autocast:
                x = diffusion.sample(ema, noise.shape, steps=50, x_t=noise.to(run.device),
                                     generator=torch.Generator(run.device).manual_seed(args.seed), progress=False)
            path = os.path.join(args.output_dir, "samples", f"diffusion_epoch_{epoch}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_save(grid_image(to_uint8(x), nrow=4), path, run.on_failed_write)
            out["samples"] = os.path.relpath(path, args.output_dir)
        if epoch % args.save_every == 0:
            run.save(checkpoint(epoch, record["step"]), f"diffusion_epoch_{epoch}.pth")
            out["saved"] = f"diffusion_epoch_{epoch}.pth"
        return out

    step = fit(run, "diffusion", model, opt, data["train"], args.diffusion_epochs, args.lr, lambda x, a:
               diffusion.training_loss(model, x), end_of_epoch, {}, ema=ema)
    run.save(checkpoint(args.diffusion_epochs, step), "diffusion_final.pth")
    run.say(f"saved {os.path.join(args.output_dir, 'diffusion_final.pth')}")


def load_data(run) -> dict:
    """The three splits (rank 0 builds the cache, the others then read it), attribute names and checkpoint metadata."""
    args = run.args

    def split(name):
        if not run.main:                                # wait for rank 0's cache
            run.barrier()
        s = load_split(args.dataset, name, args.image_size, args.data_root, args.subset_fraction, args.seed,
                       args.cache_dir, args.download and run.main, args.num_workers if run.main else 0, run.main)
        if run.main:
            run.barrier()
        return s

    names, k = attribute_names(args.dataset), attribute_index(args.dataset, args.attribute)
    data = {s: split(s) for s in ("train", "valid", "test")}
    run.say(f"attribute {args.attribute}: {data['train'].attrs[:, k].float().mean().item():.1%} of training "
            f"images have it")
    meta = {"dataset": args.dataset, "attribute": args.attribute, "attribute_index": k, "attr_names": names,
            "image_size": args.image_size, "args": vars(args)}
    return {**data, "names": names, "attr_idx": k, "meta": meta}


def main() -> int:
    parser = get_parser()
    args = parser.parse_args()
    given = parser.given()                                  # the flags on the command line
    resume_state = resumed_args(args, given)
    check_args(args, given)
    run = Run(args, resume_state)
    check_output_dir(args, resuming=resume_state is not None)
    args.cache_dir = args.cache_dir or os.path.join(args.output_dir, "cache")
    run.say(f"GuidedEmotion training on {run.device}" + (f" x {run.world} processes" if run.world > 1 else "")
            + f", {str(run.amp).replace('torch.', '') if run.amp else 'fp32'}; writing to "
            f"{os.path.abspath(args.output_dir)}")
    data = load_data(run)
    if (n := len(data["train"])) // run.world < args.batch_size:     # before --overwrite removes anything
        raise UserError(f"{n} training images are fewer than one batch of {args.batch_size} per process; lower "
                        f"--batch_size or raise --subset_fraction")
    signal.signal(signal.SIGINT, _on_signal)      # after the decoding workers have gone: they would inherit it
    signal.signal(signal.SIGTERM, _on_signal)
    if args.overwrite and resume_state is None and run.main:
        forget_earlier_run(run)
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=args.timesteps))
    done = STAGES[:STAGES.index(resume_state["stage"])] if resume_state else ()
    if args.classifier_epochs > 0 and "classifier" not in done:
        train_guide(run, data, diffusion)
    if args.oracle_epochs > 0 and "oracle" not in done:
        train_oracle(run, data)
    if args.diffusion_epochs > 0:
        train_diffusion(run, data, diffusion)
    run.say(f"done; files are in {os.path.abspath(args.output_dir)}")
    if run.world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_main(main)
