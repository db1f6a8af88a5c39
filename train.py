"""Train the guiding classifier, the oracle and the diffusion model, in that order.

Demo on the embedded toyfaces data (CPU, about 15 minutes; the README's first command):
    python train.py --dataset toyfaces --image_size 32 --base_channels 32 --channel_mult 1,2,2 --num_res_blocks 1 \
        --attn_resolutions 8 --dropout 0 --classifier_channels 32 --classifier_epochs 5 --oracle_epochs 6 \
        --diffusion_epochs 6 --batch_size 64 --lr 1e-3 --device cpu --output_dir runs/toyfaces
CelebA (GPU; data under ./data in the official or the Kaggle layout, see README):
    python train.py --attribute Smiling --classifier_epochs 10 --diffusion_epochs 50
Several GPUs, one node / several nodes:
    torchrun --nproc_per_node=4 train.py --attribute Smiling
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29400 \
        train.py --attribute Smiling --output_dir runs/celeba     # on the second node: --node_rank=1
Continue a run that was stopped (Ctrl-C, kill, crash):
    python train.py --resume auto --output_dir runs/toyfaces

Writes to --output_dir: classifier_best.pth, oracle_best.pth, diffusion_epoch_{N}.pth, diffusion_final.pth,
last.pth (resumable state), train_log.jsonl, samples/diffusion_epoch_{N}.png.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from classifier import ClassifierConfig, NoisyClassifier, Oracle, OracleConfig
from common import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, PRECISION_HELP, ArgumentParser, UserError, append_line,
                    atomic_torch_save, autocast, check_positive, check_seed, ensure_writable_dir, load_checkpoint,
                    make_checkpoint, memory_format_for, resolve_device, run_main, save_grid)
from dataset import DATASETS, attribute_index, attribute_names, load_split, random_flip, to_float
from diffusion_model import DiffusionConfig, GaussianDiffusion, UNet, UNetConfig

STAGES = ("classifier", "oracle", "diffusion")
OUTPUT_FILES = ("classifier_best.pth", "oracle_best.pth", "diffusion_final.pth", "last.pth")
# --resume takes every flag from the checkpoint except these, which say where this run's files are
NOT_RESUMED = ("resume", "overwrite", "output_dir", "cache_dir")
# and a flag given with --resume must equal the saved one, except these: where and how the process runs, and
# how often it logs, samples and saves (sampling during training has its own generator)
ADJUSTABLE_ON_RESUME = ("device", "num_workers", "data_root", "download", "compile", "save_every", "sample_every",
                        "checkpoint_every", "log_every")


def int_tuple(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_unet_args(p, base_channels=128, num_res_blocks=2) -> None:
    """The UNet architecture flags (shared with the benchmarks)."""
    p.add_argument("--base_channels", type=int, default=base_channels, help="UNet width of the first level")
    p.add_argument("--channel_mult", type=int_tuple, default=(1, 2, 2, 2), help="UNet width multipliers per level")
    p.add_argument("--num_res_blocks", type=int, default=num_res_blocks, help="UNet residual blocks per level")
    p.add_argument("--attn_resolutions", type=int_tuple, default=(16,), help="feature-map sides with self-attention")


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Train the classifier, oracle and diffusion model of GuidedEmotion.")
    # data
    p.add_argument("--dataset", default="celeba", choices=DATASETS, help="celeba, or toyfaces (embedded demo data)")
    p.add_argument("--data_root", default="./data", help="CelebA root (official/torchvision or Kaggle layout)")
    p.add_argument("--attribute", default="Smiling", help="attribute the guiding classifier learns (CelebA name)")
    p.add_argument("--image_size", type=int, default=64, help="training image side in pixels")
    p.add_argument("--subset_fraction", type=float, default=0.5, help="fraction of each split used (seed's 50%%)")
    p.add_argument("--cache_dir", default=None, help="folder for the decoded-image cache (default: <output_dir>/cache)")
    p.add_argument("--download", action="store_true",
                   help="download CelebA with torchvision when it is not found under --data_root")
    p.add_argument("--num_workers", type=int, default=0, help="processes for decoding images into the cache")
    # schedule and models
    p.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T of the linear beta schedule")
    add_unet_args(p)
    p.add_argument("--dropout", type=float, default=0.1, help="UNet dropout")
    p.add_argument("--classifier_channels", type=int, default=64, help="guiding classifier width")
    p.add_argument("--guide_all_attributes", action="store_true",
                   help="the guiding classifier also learns every other attribute (multi-label), so generate.py "
                        "--preserve can hold them fixed while it steers --attribute")
    p.add_argument("--oracle_width", type=int, default=32, help="oracle width of its first stage")
    # optimisation
    p.add_argument("--batch_size", type=int, default=32, help="batch size per process")
    p.add_argument("--classifier_epochs", type=int, default=10, help="epochs for the guiding classifier (0 skips)")
    p.add_argument("--oracle_epochs", type=int, default=5, help="epochs for the oracle (0 skips)")
    p.add_argument("--diffusion_epochs", type=int, default=50, help="epochs for the diffusion model (0 skips)")
    p.add_argument("--lr", type=float, default=2e-4, help="diffusion learning rate (AdamW)")
    p.add_argument("--classifier_lr", type=float, default=3e-4, help="guiding classifier learning rate (AdamW)")
    p.add_argument("--oracle_lr", type=float, default=1e-3, help="oracle learning rate (AdamW; BatchNorm nets take more)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="diffusion AdamW weight decay")
    p.add_argument("--warmup_steps", type=int, default=500, help="linear learning-rate warm-up steps")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--ema_decay", type=float, default=0.9995, help="EMA decay of the diffusion weights")
    p.add_argument("--max_steps_per_epoch", type=int, default=None, help="cap optimizer steps per epoch (quick runs)")
    # bookkeeping
    p.add_argument("--output_dir", default=".", help="where checkpoints, logs and sample grids go")
    p.add_argument("--seed", type=int, default=0, help="seed for the data subset, initialisation and noise")
    p.add_argument("--save_every", type=int, default=10, help="write diffusion_epoch_{N}.pth every N epochs")
    p.add_argument("--sample_every", type=int, default=5, help="unguided EMA sample grid every N epochs (0: never)")
    p.add_argument("--checkpoint_every", type=int, default=500, help="write last.pth every N optimizer steps")
    p.add_argument("--log_every", type=int, default=50, help="refresh the progress bar / check for NaN every N steps")
    p.add_argument("--resume", default=None, help="continue from a last.pth: a path, or 'auto' for <output_dir>/last.pth")
    p.add_argument("--overwrite", action="store_true", help="allow starting over in an output_dir with checkpoints")
    p.add_argument("--device", default="cuda", help="cuda, cpu, cuda:1, mps (falls back to cpu without CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the networks for training (a GPU option: on the CPU it measured no faster)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help=PRECISION_HELP)
    return p


def check_args(args) -> None:
    for name in ("image_size", "batch_size", "timesteps", "base_channels", "num_res_blocks", "classifier_channels",
                 "oracle_width", "save_every", "checkpoint_every", "log_every", "max_steps_per_epoch"):
        check_positive("--" + name, getattr(args, name))
    for name in ("classifier_epochs", "oracle_epochs", "diffusion_epochs", "num_workers", "warmup_steps",
                 "sample_every", "weight_decay"):
        check_positive("--" + name, getattr(args, name), allow_zero=True)
    check_positive("--lr", args.lr)
    check_positive("--classifier_lr", args.classifier_lr)
    check_positive("--oracle_lr", args.oracle_lr)
    check_positive("--grad_clip", args.grad_clip)
    check_seed(args.seed)
    if not 0.0 < args.subset_fraction <= 1.0:
        raise UserError(f"--subset_fraction must be in (0, 1], got {args.subset_fraction}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise UserError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    cfg = unet_config(args)
    problem = cfg.check()
    if problem:
        raise UserError(problem + " (--image_size / --channel_mult)")
    if args.image_size < 16:
        raise UserError(f"--image_size {args.image_size} is too small; use at least 16")
    problem = cfg.attention_problem()
    if problem:
        raise UserError("--" + problem)
    attribute_index(args.dataset, args.attribute)   # raises with the closest name


def unet_config(args) -> UNetConfig:
    return UNetConfig(image_size=args.image_size, base_channels=args.base_channels, channel_mult=args.channel_mult,
                      num_res_blocks=args.num_res_blocks, attn_resolutions=args.attn_resolutions, dropout=args.dropout)


def classifier_config(args, num_attributes: int, attr_idx: int) -> ClassifierConfig:
    levels = max(1, min(4, int(np.log2(args.image_size)) - 1))     # stop at a 4x4 (or larger) map
    every = args.guide_all_attributes
    return ClassifierConfig(image_size=args.image_size, base_channels=args.classifier_channels,
                            channel_mult=(1, 2, 2, 4)[:levels], num_outputs=num_attributes if every else 1,
                            target_index=attr_idx if every else 0)


# ----------------------------------------------------------------------------------------------
# Set-up: devices, processes, RNG


def setup_device(args):
    """Pick the device, start torch.distributed under torchrun. Returns (device, rank, world_size)."""
    want = str(resolve_device(args.device, "training"))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if want.startswith("cuda"):
            torch.cuda.set_device(local)
            want = f"cuda:{local}"
        dist.init_process_group("nccl" if want.startswith("cuda") else "gloo")
    device = torch.device(want)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device, rank, world


def rng_state(device) -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


STOP = {"signal": None}


def _on_signal(signum, frame):
    if STOP["signal"] is not None:      # second Ctrl-C: leave at once
        raise KeyboardInterrupt
    STOP["signal"] = signum
    print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving last.pth", flush=True)


# ----------------------------------------------------------------------------------------------
# The training loop shared by the three stages


class Run:
    """What every stage needs: arguments, device, processes, output paths and the resume state."""

    def __init__(self, args, device, rank, world, resume_state):
        self.args, self.device, self.rank, self.world = args, device, rank, world
        self.main = rank == 0
        self.resume_state = resume_state
        self.log_path = os.path.join(args.output_dir, "train_log.jsonl")
        self.autocast = autocast(device, args.precision)

    def log(self, record: dict) -> None:
        if self.main:
            append_line(self.log_path, json.dumps(record))

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def from_main(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank. Each rank evaluates the whole split itself, and GPUs can disagree in
        the last bit (cuDNN picks kernels per process); a best-so-far decision made on differing scores would
        send one rank into ``save``'s barrier alone, and the run would hang."""
        if self.world == 1:
            return x
        y = x.to(self.device, copy=True).contiguous()
        dist.broadcast(y, src=0)
        return y.to(x.device)

    def save(self, obj, name: str) -> None:
        """Rank 0 writes atomically; the others wait so no one reads a half-made checkpoint."""
        if self.main:
            path = os.path.join(self.args.output_dir, name)
            try:
                atomic_torch_save(obj, path)
            except OSError as e:
                raise UserError(f"could not write {path} ({e.strerror or e}); the previous file is unchanged — "
                                f"free disk space and continue with --resume auto") from None
        self.barrier()


def unwrap(model):
    model = getattr(model, "module", model)            # DistributedDataParallel
    return getattr(model, "_orig_mod", model)          # torch.compile


def wrap(model, run: Run):
    """The device's layout (channels_last on CUDA) + optional torch.compile + DDP around the plain module
    (which is what gets saved)."""
    model = model.to(memory_format=memory_format_for(run.device))
    if run.args.compile:
        model = torch.compile(model)
    if run.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return model


def make_optimizer(params, lr, weight_decay, device):
    """AdamW, with the fused kernel (one pass over all parameters) on CUDA and the CPU, PyTorch's default
    elsewhere. (A run resumed from a ``last.pth`` keeps the setting its optimizer state was saved with.)"""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def epoch_order(n: int, seed: int, stage: str, epoch: int, rank: int, world: int) -> torch.Tensor:
    """This rank's indices for one epoch: DistributedSampler's shard of a permutation seeded by (seed, stage)
    and ``set_epoch(epoch)``, so the order is the same after a resume and disjoint across ranks (the tail
    that does not divide evenly is dropped, so every rank takes the same number of steps)."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, drop_last=True,
                                 seed=seed * 1009 + STAGES.index(stage))
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def fit(run: Run, stage: str, modules: dict, optimizer, split, epochs: int, lr: float, step_fn,
        end_of_epoch, state: dict):
    """Train ``modules['model']`` for ``epochs`` epochs with ``step_fn(x, attrs) -> loss``.

    ``modules`` are what last.pth stores for this stage (the model, and the EMA for diffusion);
    ``end_of_epoch(epoch, mean_loss, seconds)`` evaluates / saves; ``state`` is stage-specific data
    (best accuracy, ...) that is kept in last.pth too. Resumes from ``run.resume_state`` when it is
    this stage's.
    """
    args, device = run.args, run.device
    model = modules["model"]
    start_epoch, start_batch, step = 0, 0, 0
    rs = run.resume_state
    if rs is not None and rs["stage"] == stage:
        for name, m in modules.items():
            unwrap(m).load_state_dict(rs["modules"][name])
        optimizer.load_state_dict(rs["optimizer"])
        start_epoch, start_batch, step = rs["epoch"], rs["batch"], rs["step"]
        state.update(rs["state"])
        set_rng_state(rs["rng"][run.rank] if run.rank < len(rs["rng"]) else rs["rng"][0], device)
        if run.main:
            print(f"resuming {stage} at epoch {start_epoch + 1}, batch {start_batch}, step {step}")
        run.resume_state = None

    images = split.images
    on_device = device.type == "cuda" and images.numel() < 0.25 * torch.cuda.get_device_properties(device).total_memory
    images = images.to(device) if on_device else images
    attrs = split.attrs.to(device)
    bs = args.batch_size
    steps_per_epoch = (len(split) // run.world) // bs                   # epoch_order's shard size, drop_last
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise UserError(f"{stage}: {len(split)} training images are fewer than one batch of {bs} per process; "
                        f"lower --batch_size")

    def save_last(epoch, batch):
        check_finite()
        obj = make_checkpoint_state(run, stage, modules, optimizer, epoch, batch, step, state)
        run.save(obj, "last.pth")

    first_bad = torch.full((), -1, dtype=torch.long, device=device)   # first step with a non-finite loss

    def check_finite():
        bad = int(first_bad.item())                                     # host sync: only at log/save points
        if run.world > 1:
            t = torch.tensor([bad], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            bad = int(t.item())
        if bad >= 0:
            raise UserError(f"{stage}: the loss became NaN/Inf at epoch {epoch + 1}, step {bad}; stopped without "
                            f"saving, so the last good checkpoint is kept; check the data or start again with a "
                            f"lower --lr")

    for epoch in range(start_epoch, epochs):
        model.train()
        order = epoch_order(len(split), args.seed, stage, epoch, run.rank, run.world)
        # the epoch's indices where the images and the labels live, copied once: no host-device copy per step
        order_images, order_attrs = order.to(images.device), order.to(attrs.device)
        t0, loss_sum, n_loss = time.time(), torch.zeros((), device=device), 0
        bar = tqdm(range(start_batch, steps_per_epoch), desc=f"{stage} {epoch + 1}/{epochs}", disable=not run.main,
                   initial=start_batch, total=steps_per_epoch, leave=False)
        seen = []                                                         # data indices this rank used
        for b in bar:
            batch = slice(b * bs, (b + 1) * bs)
            if run.world > 1:
                seen.append(order[batch])
            xb = images[order_images[batch]]
            if device.type == "cuda" and not on_device:
                xb = xb.pin_memory()                                       # lets the copy below overlap
            xb = xb.to(device, non_blocking=True)
            x = random_flip(to_float(xb)).contiguous(memory_format=memory_format_for(device))
            for group in optimizer.param_groups:                           # linear warm-up
                group["lr"] = lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
            with run.autocast:
                loss = step_fn(x, attrs[order_attrs[batch]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            if "ema" in modules:
                update_ema(unwrap(modules["ema"]), unwrap(model), args.ema_decay, step)
            loss = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            loss_sum += torch.nan_to_num(loss)
            n_loss += 1
            step += 1
            at_log = step % args.log_every == 0 or device.type == "cpu"
            if at_log:
                check_finite()
                bar.set_postfix(loss=f"{(loss_sum / n_loss).item():.4f}")
            stop = STOP["signal"] is not None
            if run.world > 1 and at_log:
                flag = torch.tensor([int(stop)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            elif run.world > 1:
                stop = False
            if stop:
                save_last(epoch, b + 1)
                if run.main:
                    print(f"stopped by signal; resumable state saved to {os.path.join(args.output_dir, 'last.pth')}\n"
                          f"continue with: python train.py --resume auto --output_dir {args.output_dir}", flush=True)
                sys.exit(128 + (STOP["signal"] or signal.SIGTERM))
            if step % args.checkpoint_every == 0:
                save_last(epoch, b + 1)
        bar.close()
        check_finite()
        seconds = time.time() - t0
        n_done = steps_per_epoch - start_batch
        mean_loss = (loss_sum / max(1, n_loss)).item()
        if run.world > 1:
            t = torch.tensor([mean_loss], device=device)
            dist.all_reduce(t)
            mean_loss = t.item() / run.world
        start_batch = 0
        model.eval()
        record = {"stage": stage, "epoch": epoch + 1, "step": step, "loss": round(mean_loss, 6),
                  "seconds": round(seconds, 2), "images_per_s": round(n_done * bs * run.world / max(seconds, 1e-9), 1)}
        if run.world > 1:                     # proof that the ranks trained on disjoint shards of the data
            shards = [None] * run.world
            dist.all_gather_object(shards, torch.cat(seen).tolist() if seen else [])
            record["rank_samples"] = [len(sh) for sh in shards]
            record["ranks_disjoint"] = len(set().union(*map(set, shards))) == sum(map(len, shards))
        record.update(end_of_epoch(epoch + 1, record) or {})
        run.log(record)
        if run.main:
            print(" | ".join(f"{k} {v}" for k, v in record.items()), flush=True)
        save_last(epoch + 1, 0)
    return step


def make_checkpoint_state(run, stage, modules, optimizer, epoch, batch, step, state) -> dict:
    rngs = [rng_state(run.device)]
    if run.world > 1:                                  # every rank's RNG, so each continues its own stream
        buf = io.BytesIO()
        torch.save(rngs[0], buf)
        gathered = [None] * run.world
        dist.all_gather_object(gathered, buf.getvalue())
        rngs = [torch.load(io.BytesIO(b), weights_only=True) for b in gathered]
    return {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "kind": "train_state", "stage": stage,
            "epoch": epoch, "batch": batch, "step": step, "state": dict(state),
            "modules": {k: unwrap(m).state_dict() for k, m in modules.items()},
            "optimizer": optimizer.state_dict(), "rng": rngs, "args": vars(run.args)}


@torch.no_grad()
def update_ema(ema, model, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * theta, with d warmed up as min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1 + step) / (10 + step))
    ema_p, model_p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, model_p, 1 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def classifier_accuracy(model, diffusion, split, attr_idx, t_value, run, batch_size=256) -> torch.Tensor:
    """Per-output accuracy of the noise-aware classifier on q_sample(x_0, t) with fixed noise; at t = 0 on the clean
    x_0 itself (the first step's noise, std 0.01, is left out: this is the accuracy on clean images).

    -> (A,) for an all-attribute guide, (1,) for one that learns only the attribute ``attr_idx``."""
    columns = slice(None) if model.cfg.num_outputs > 1 else [attr_idx]
    g = torch.Generator(device="cpu").manual_seed(1234 + t_value)
    correct = 0
    for i in range(0, len(split), batch_size):
        x0 = to_float(split.images[i:i + batch_size]).to(run.device)
        y = split.attrs[i:i + batch_size][:, columns]                                 # (B, A) or (B, 1)
        t = torch.full((x0.shape[0],), t_value, device=run.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=g).to(run.device)
        x_t = diffusion.q_sample(x0, t, noise) if t_value > 0 else x0
        with run.autocast:
            logits = model(x_t, t, all_outputs=True).float().cpu()
        correct = correct + ((logits > 0) == y.bool()).float().sum(0)
    return run.from_main(correct / len(split))


@torch.no_grad()
def oracle_accuracy(model, split, run, batch_size=256) -> torch.Tensor:
    """Per-attribute accuracy of the oracle on clean images. -> (A,)"""
    correct = torch.zeros(split.attrs.shape[1])
    for i in range(0, len(split), batch_size):
        x = to_float(split.images[i:i + batch_size]).to(run.device)
        with run.autocast:
            pred = (model(x).float() > 0).cpu()
        correct += (pred == split.attrs[i:i + batch_size].bool()).float().sum(0)
    return run.from_main(correct / len(split))


def eval_timesteps(T: int) -> tuple:
    """Clean images and the noisy ones at T/4, T/2, 3T/4 (t = 250, 500, 750 for T = 1000)."""
    return (0, T // 4, T // 2, 3 * T // 4)


# ----------------------------------------------------------------------------------------------


def main() -> int:
    parser = get_parser()
    args = parser.parse_args()
    resume_state = None
    if args.resume:
        path = os.path.join(args.output_dir, "last.pth") if args.resume == "auto" else args.resume
        if args.resume == "auto" and not os.path.isfile(path):
            raise UserError(f"--resume auto: no last.pth in '{args.output_dir}'; start a new run without --resume")
        resume_state = load_checkpoint(path, kind="train_state", flag="--resume")
        given = parser.given()
        for k, v in resume_state["args"].items():        # the run continues with the flags it started with
            if k in NOT_RESUMED or not hasattr(args, k):
                continue
            v = tuple(v) if isinstance(v, list) else v
            if k not in given:
                setattr(args, k, v)
            elif getattr(args, k) != v and k not in ADJUSTABLE_ON_RESUME:
                raise UserError(f"--{k} {getattr(args, k)} differs from the resumed run's {v}, and --resume keeps "
                                f"the run's own flags; drop --{k}, or start a new run (--overwrite or another "
                                f"--output_dir)")
    check_args(args)
    device, rank, world = setup_device(args)          # a bad --device fails here, before anything is written
    ensure_writable_dir(args.output_dir)
    if resume_state is None and not args.overwrite:
        found = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(args.output_dir, f))]
        if found:
            raise UserError(f"'{args.output_dir}' already holds {', '.join(found)}; pass --resume auto to continue "
                            f"that run or --overwrite to start over (or choose another --output_dir)")
    args.cache_dir = args.cache_dir or os.path.join(args.output_dir, "cache")
    run = Run(args, device, rank, world, resume_state)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if run.main:
        print(f"GuidedEmotion training on {device}" + (f" x {world} processes" if world > 1 else "")
              + f"; writing to {os.path.abspath(args.output_dir)}")

    # data: rank 0 builds the cache, the others then read it
    def split(name):
        if run.main:
            s = load_split(args.dataset, name, args.image_size, args.data_root, args.subset_fraction, args.seed,
                           args.cache_dir, args.download, args.num_workers, verbose=True)
        run.barrier()
        if not run.main:
            s = load_split(args.dataset, name, args.image_size, args.data_root, args.subset_fraction, args.seed,
                           args.cache_dir, False, 0, verbose=False)
        return s

    train_set, valid_set, test_set = split("train"), split("valid"), split("test")
    names = attribute_names(args.dataset)
    attr_idx = attribute_index(args.dataset, args.attribute)
    if args.overwrite and resume_state is None and run.main:   # the input is good: now the earlier run's state goes
        stale = [f for f in ("last.pth", "train_log.jsonl") if os.path.exists(os.path.join(args.output_dir, f))]
        for f in stale:                 # so a crash before this run's first save cannot resume that run instead
            os.remove(os.path.join(args.output_dir, f))
        if stale:
            print(f"--overwrite: removed the earlier run's {' and '.join(stale)}; its checkpoints are replaced as "
                  f"this run's stages write theirs (a stage given 0 epochs keeps the earlier one)")
    diffusion_cfg = DiffusionConfig(timesteps=args.timesteps)
    diffusion = GaussianDiffusion(diffusion_cfg)
    if run.main:
        rate = train_set.attrs[:, attr_idx].float().mean().item()
        print(f"attribute {args.attribute}: {rate:.1%} of training images have it")
    done = set() if resume_state is None else set(STAGES[:STAGES.index(resume_state["stage"])])
    meta = {"dataset": args.dataset, "attribute": args.attribute, "attribute_index": attr_idx,
              "attr_names": names, "image_size": args.image_size, "args": vars(args)}

    # 1. guiding classifier p_phi(y | x_t, t), trained on q_sample(x_0, t) with t uniform
    if args.classifier_epochs > 0 and "classifier" not in done:
        seed_everything(args.seed)
        cfg = classifier_config(args, len(names), attr_idx)
        net = NoisyClassifier(cfg).to(device)
        model = wrap(net, run)
        opt = make_optimizer(net.parameters(), args.classifier_lr, 0.05, device)
        state = {"best_acc": -1.0}
        if run.main:
            print(f"classifier: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters")

        def classifier_step(x0, attrs):
            t = torch.randint(0, args.timesteps, (x0.shape[0],), device=device)
            x_t = diffusion.q_sample(x0, t, torch.randn_like(x0))                    # DDPM Eq. 4
            if args.guide_all_attributes:                                              # every attribute
                return F.binary_cross_entropy_with_logits(model(x_t, t, all_outputs=True).float(), attrs.float())
            return F.binary_cross_entropy_with_logits(model(x_t, t).float(), attrs[:, attr_idx].float())

        def guide_accuracy(split):
            """{t: per-output accuracy} at the evaluation timesteps, one pass over ``split`` each."""
            return {t: classifier_accuracy(net, diffusion, split, attr_idx, t, run)
                    for t in eval_timesteps(args.timesteps)}

        k = 0 if cfg.num_outputs == 1 else cfg.target_index          # the steered attribute's column
        every_head = eval_timesteps(args.timesteps)[:2]               # t = 0 and T/4

        def classifier_epoch_end(epoch, record):
            acc = guide_accuracy(valid_set)
            accs = {f"valid_acc_t{t}": round(a[k].item(), 4) for t, a in acc.items()}
            score = accs["valid_acc_t0"]
            if args.guide_all_attributes:     # every head matters for --preserve; clean accuracy saturates early
                score = accs["valid_mean_acc_all"] = round(torch.cat([acc[t] for t in every_head]).mean().item(), 4)
            if score > state["best_acc"]:
                state["best_acc"] = score
                run.save(make_checkpoint("classifier", cfg, net.state_dict(), diffusion=asdict(diffusion_cfg),
                                         optimizer=opt.state_dict(), epoch=epoch, step=record["step"],
                                         valid_acc=accs, **meta), "classifier_best.pth")
                accs["saved"] = "classifier_best.pth"
            return accs

        fit(run, "classifier", {"model": model}, opt, train_set, args.classifier_epochs, args.classifier_lr,
            classifier_step, classifier_epoch_end, state)
        best = load_checkpoint(os.path.join(args.output_dir, "classifier_best.pth"), "classifier")
        net.load_state_dict(best["model"])
        acc = guide_accuracy(test_set)
        test = {f"test_acc_t{t}": round(a[k].item(), 4) for t, a in acc.items()}
        heads = {f"test_acc_all_t{t}": {n: round(a, 4) for n, a in zip(names, acc[t].tolist())}
                 for t in every_head} if args.guide_all_attributes else {}     # which heads are weak
        run.log({"stage": "classifier", "final": True, **test, **heads})
        if run.main:
            print("classifier test accuracy: "
                  + ", ".join(f"t={key.split('_t')[1]}: {v:.1%}" for key, v in test.items()))
            for key, v in heads.items():
                print(f"  every attribute at t={key.split('_t')[-1]}: "
                      + ", ".join(f"{n} {a:.1%}" for n, a in v.items()))
        del model, net, opt

    # 2. oracle: clean images, all attributes, other architecture and seed; never used for guidance
    if args.oracle_epochs > 0 and "oracle" not in done:
        seed_everything(args.seed + 7919)
        cfg = OracleConfig(image_size=args.image_size, num_attributes=len(names), width=args.oracle_width)
        net = Oracle(cfg).to(device)
        if world > 1:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net) if device.type == "cuda" else net
        model = wrap(net, run)
        opt = make_optimizer(net.parameters(), args.oracle_lr, 0.05, device)
        state = {"best_acc": -1.0}

        def oracle_step(x, attrs):
            return F.binary_cross_entropy_with_logits(model(x).float(), attrs.float())

        def oracle_epoch_end(epoch, record):
            acc = oracle_accuracy(net, valid_set, run)
            out = {"valid_mean_acc": round(acc.mean().item(), 4)}
            if out["valid_mean_acc"] > state["best_acc"]:
                state["best_acc"] = out["valid_mean_acc"]
                run.save(make_checkpoint("oracle", cfg, net.state_dict(), optimizer=opt.state_dict(), epoch=epoch,
                                         step=record["step"], valid_acc=dict(zip(names, acc.tolist())), **meta),
                         "oracle_best.pth")
                out["saved"] = "oracle_best.pth"
            return out

        fit(run, "oracle", {"model": model}, opt, train_set, args.oracle_epochs, args.oracle_lr,
            oracle_step, oracle_epoch_end, state)
        best = load_checkpoint(os.path.join(args.output_dir, "oracle_best.pth"), "oracle")
        net.load_state_dict(best["model"])
        acc = oracle_accuracy(net, test_set, run)
        per_attr = {n: round(a, 4) for n, a in zip(names, acc.tolist())}
        run.log({"stage": "oracle", "final": True, "test_mean_acc": round(acc.mean().item(), 4),
                 "test_acc": per_attr})
        if run.main:
            print(f"oracle test accuracy: mean {acc.mean().item():.1%}; "
                  + ", ".join(f"{n} {a:.1%}" for n, a in per_attr.items()))
        best["test_acc"] = per_attr                                       # keep the test accuracy in the file
        run.save(best, "oracle_best.pth")
        del model, net, opt

    # 3. diffusion model eps_theta(x_t, t), DDPM Alg. 1, with an EMA of the weights for sampling
    if args.diffusion_epochs > 0:
        seed_everything(args.seed + 104729)
        cfg = unet_config(args)
        net = UNet(cfg).to(device)
        ema = UNet(cfg).to(device).eval().requires_grad_(False)
        ema.load_state_dict(net.state_dict())
        model = wrap(net, run)
        ema.to(memory_format=memory_format_for(device))   # as the model's: update_ema's foreach lerp stays on
                                                          # its fast path, and sampling uses fused SDPA
        opt = make_optimizer(net.parameters(), args.lr, args.weight_decay, device)
        if run.main:
            print(f"diffusion UNet: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters")
        sample_noise = torch.randn((16, 3, args.image_size, args.image_size),
                                   generator=torch.Generator().manual_seed(args.seed)).to(device)

        def diffusion_step(x0, attrs):
            return diffusion.training_loss(model, x0)                                    # DDPM Alg. 1

        def diffusion_checkpoint(epoch, step):
            return make_checkpoint("diffusion", cfg, net.state_dict(), ema=ema.state_dict(),
                                   diffusion=asdict(diffusion_cfg), optimizer=opt.state_dict(),
                                   epoch=epoch, step=step, **meta)

        def diffusion_epoch_end(epoch, record):
            out = {}
            if args.sample_every and (epoch % args.sample_every == 0 or epoch == args.diffusion_epochs) and run.main:
                g = torch.Generator(device=device).manual_seed(args.seed)         # leaves the global RNG alone
                with run.autocast:
                    x = diffusion.sample(ema, sample_noise.shape, sampler="ddpm", steps=50, x_t=sample_noise.clone(),
                                         generator=g, progress=False)
                os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
                path = os.path.join(args.output_dir, "samples", f"diffusion_epoch_{epoch}.png")
                save_grid(x.float().cpu(), path, nrow=4)
                out["samples"] = os.path.relpath(path, args.output_dir)
            if epoch % args.save_every == 0:
                run.save(diffusion_checkpoint(epoch, record["step"]), f"diffusion_epoch_{epoch}.pth")
                out["saved"] = f"diffusion_epoch_{epoch}.pth"
            return out

        step = fit(run, "diffusion", {"model": model, "ema": ema}, opt, train_set, args.diffusion_epochs, args.lr,
                   diffusion_step, diffusion_epoch_end, {})
        run.save(diffusion_checkpoint(args.diffusion_epochs, step), "diffusion_final.pth")
        if run.main:
            print(f"saved {os.path.join(args.output_dir, 'diffusion_final.pth')}")

    if run.main:
        print(f"done; files are in {os.path.abspath(args.output_dir)}")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_main(main)
