"""Training throughput of our UNet against HF diffusers' UNet2DModel built to the same architecture.

    pip install -r benchmarks/requirements.txt
    python benchmarks/train_throughput.py                                   # 64x64, batch 32, CUDA
    python benchmarks/train_throughput.py --batch_size 256 --precision fp16 --memory_format contiguous --compile
    python benchmarks/train_throughput.py --device cpu --count_only          # parameters, FLOPs, the twin check
    python benchmarks/train_throughput.py --device cpu --batch_size 4 --steps 5 --breakdown   # where a step goes

Both networks train in one process on the same batch with train.fit's step: the eps-MSE loss
(``GaussianDiffusion.training_loss``, DDPM Alg. 1) under autocast (--precision; fp16 scales the loss with a
GradScaler), gradient clipping, fused AdamW (``train.make_optimizer``). The EMA update and the data path are
left out: they cost the same for both (see benchmarks/data_path.py). Each repeat times --steps steps of ours,
then of diffusers, so drift hits both alike; the table shows median images/s and the median of the per-repeat
ratios. FLOPs are the forward pass of one image (``FlopCounterMode``, a multiply-add counts 2); on CUDA,
MFU = 3 x forward FLOPs x images/s / --peak_tflops (a backward costs about two forwards), and the peak memory is
``torch.cuda.max_memory_allocated`` over a network's timed steps (it includes the other network's weights,
gradients and optimizer state, about 0.6 GB at the default size). ``--breakdown`` profiles a few steps of each
and splits a step by kind of op. --json is written after the timing and again after --breakdown.

diffusers is configured to match ``UNet(UNetConfig)``: block_out_channels = base_channels * channel_mult;
layers_per_block = num_res_blocks (its decoder has one more per level, as ours); Attn{Down,Up}Block2D at the
sides in attn_resolutions; a Res-Attn-Res middle; sinusoidal time embedding (cos first) -> Linear -> SiLU ->
Linear; the embedding as a scale and shift after the ResBlock's second GroupNorm; stride-2 conv downsampling, nearest x2 + conv upsampling; the same skips. ``ours_as_diffusers_state``
renames our weights to diffusers' names; every run gives ours random weights, loads them strictly into the twin
and compares the outputs ("same function"). What still differs: GroupNorm groups (ours gcd(32, C) per layer,
diffusers one count: the smallest of ours) and attention head dims (ours num_heads per layer, diffusers one
head dim); where these differ the check is skipped and a note says why. diffusers' AttnUpBlock2D has no
dropout, and ours zero-initialises each block's last conv (speed-neutral). Without diffusers, ours is timed alone.
"""
import argparse
import copy
import os
import statistics
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("KINETO_LOG_LEVEL", "5")    # --breakdown on a CPU machine: no profiler "GPU not found" errors

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from common import (PRECISION_HELP, PRECISIONS, ArgumentParser, UserError, amp_dtype, atomic_save,  # noqa: E402
                    autocast, check_output_file, check_positive, memory_format_for, resolve_device, run_main, to_json)
from diffusion_model import (AttnBlock, DiffusionConfig, Downsample, GaussianDiffusion, ResBlock, UNet,  # noqa: E402
                             UNetConfig, Upsample)
from train import add_unet_args, make_optimizer, optimizer_step  # noqa: E402

INSTALL_HINT = "pip install -r benchmarks/requirements.txt"


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(__doc__)
    p.add_argument("--image_size", type=int, default=64, help="training image side in pixels")
    p.add_argument("--batch_size", type=int, default=32, help="images per training step")
    add_unet_args(p)
    p.add_argument("--device", default="cuda", help="cuda, cpu, cuda:1 (falls back to cpu without CUDA)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per network per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per network first (more with --compile)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved ours/diffusers measurements; medians reported")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--memory_format", default="auto", choices=("auto", "channels_last", "contiguous"),
                   help="activation and weight layout: auto is channels_last on CUDA, contiguous elsewhere (as "
                        "train.py)")
    p.add_argument("--peak_tflops", type=float, default=989.0,
                   help="accelerator peak for MFU in TFLOP/s; the default is the H100/H200 SXM dense bf16 (and fp16) "
                        "peak")
    p.add_argument("--count_only", action="store_true", help="print parameters, FLOPs and the twin check; no timing")
    p.add_argument("--breakdown", action="store_true",
                   help="also profile --breakdown_steps steps of each network and split a step by kind of op")
    p.add_argument("--breakdown_steps", type=int, default=5, help="profiled steps per network for --breakdown")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p


def checked_unet_config(args) -> UNetConfig:
    """The UNet of the --image_size, --base_channels, --channel_mult, --num_res_blocks, --attn_resolutions flags."""
    cfg = UNetConfig(image_size=args.image_size, base_channels=args.base_channels, channel_mult=args.channel_mult,
                     num_res_blocks=args.num_res_blocks, attn_resolutions=args.attn_resolutions)
    problem = cfg.check()
    if problem:
        raise UserError(problem + " (--image_size / --channel_mult / --attn_resolutions)")
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops_per_image(model: torch.nn.Module, image_size: int, device: torch.device) -> float:
    """Forward FLOPs of one image (no grad; a multiply-add counts 2). SDPA runs on its math backend here, which
    FlopCounterMode counts whichever fused kernel a device would pick."""
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t)
    model.train(was_training)
    return float(counter.get_total_flops())


class DiffusersEps(torch.nn.Module):
    """UNet2DModel behind our call signature: (x_t (B,3,S,S), t (B,)) -> eps (B,3,S,S)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t, return_dict=False)[0]


def diffusers_twin(cfg: UNetConfig, ours: UNet):
    """A diffusers UNet2DModel with the architecture of ``ours`` -> (module, notes on what differs)."""
    from diffusers import UNet2DModel

    notes = []
    groups = sorted({m.num_groups for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)})
    if len(groups) > 1:
        notes.append(f"ours uses GroupNorm groups {groups} by width, diffusers {groups[0]} everywhere")
    head_dims = sorted({m.qkv.out_channels // 3 // m.num_heads for m in ours.modules() if isinstance(m, AttnBlock)})
    if len(head_dims) > 1:
        notes.append(f"ours has attention head dims {head_dims}, diffusers {head_dims[-1]} everywhere")
    attn = [cfg.image_size // 2 ** i in cfg.attn_resolutions for i in range(len(cfg.channel_mult))]
    net = UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=head_dims[-1], norm_num_groups=groups[0], dropout=cfg.dropout,
        flip_sin_to_cos=True, freq_shift=0, resnet_time_scale_shift="scale_shift")
    return DiffusersEps(net), notes


def ours_as_diffusers_state(ours: UNet) -> dict:
    """Our UNet's weights under UNet2DModel's names and shapes (its ``load_state_dict`` then takes them strictly).

    Ours: ``down`` holds, per level, num_res_blocks TimestepSequentials [ResBlock(, AttnBlock)], then one
    [Downsample] (not after the last level); ``up`` holds num_res_blocks + 1 per level, coarsest first, the last
    of each level (but the finest) ending in an Upsample; ``mid`` = Res, Attn, Res. Our qkv 1x1 conv (3C, C, 1, 1)
    stacks q, k, v along its outputs, as diffusers' to_q, to_k, to_v (C, C)."""
    cfg, sd, out = ours.cfg, ours.state_dict(), {}

    def put(src, dst, flatten=False):
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = sd[f"{src}.{p}"].flatten(1) if flatten and p == "weight" else sd[f"{src}.{p}"]

    def res(src, dst):
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("temb", "time_emb_proj"), ("norm2", "norm2"),
                     ("conv2", "conv2")) + ((("skip", "conv_shortcut"),) if f"{src}.skip.weight" in sd else ()):
            put(f"{src}.{a}", f"{dst}.{b}")

    def attn(src, dst):
        put(f"{src}.norm", f"{dst}.group_norm")
        w, b = sd[f"{src}.qkv.weight"].flatten(1), sd[f"{src}.qkv.bias"]          # (3C, C, 1, 1) -> (3C, C)
        for name, w_i, b_i in zip("qkv", w.chunk(3), b.chunk(3)):                  # 3 x (C, C)
            out[f"{dst}.to_{name}.weight"], out[f"{dst}.to_{name}.bias"] = w_i, b_i
        put(f"{src}.proj", f"{dst}.to_out.0", flatten=True)

    def block(src, dst, j):             # one of our TimestepSequentials -> the j-th entry of diffusers' block dst
        for i, layer in enumerate(ours.get_submodule(src)):
            name = f"{src}.{i}"
            if isinstance(layer, ResBlock):
                res(name, f"{dst}.resnets.{j}")
            elif isinstance(layer, AttnBlock):
                attn(name, f"{dst}.attentions.{j}")
            elif isinstance(layer, Downsample):
                put(name, f"{dst}.downsamplers.0.conv")
            elif isinstance(layer, Upsample):
                put(f"{name}.conv", f"{dst}.upsamplers.0.conv")
            else:
                raise TypeError(f"no diffusers counterpart for {name} ({type(layer).__name__})")

    put("conv_in", "conv_in")
    put("temb_mlp.0", "time_embedding.linear_1")
    put("temb_mlp.2", "time_embedding.linear_2")
    n, k = cfg.num_res_blocks, 0
    for level in range(len(cfg.channel_mult)):                               # encoder, finest level first
        for j in range(n + (level < len(cfg.channel_mult) - 1)):              # the last entry: the Downsample
            block(f"down.{k}", f"down_blocks.{level}", j)
            k += 1
    res("mid.0", "mid_block.resnets.0")
    attn("mid.1", "mid_block.attentions.0")
    res("mid.2", "mid_block.resnets.1")
    for k in range(len(ours.up)):                                             # decoder, coarsest level first
        block(f"up.{k}", f"up_blocks.{k // (n + 1)}", k % (n + 1))
    put("norm_out", "conv_norm_out")
    put("conv_out", "conv_out")
    return out


def output_difference(ours: UNet, theirs: DiffusersEps, image_size: int) -> float:
    """Give our UNet random weights (ours zero-initialises its output convs, which would hide any mismatch),
    copy them into the diffusers model and compare outputs on a random batch: the largest absolute
    difference over the largest output, in float32 on the CPU. About 1e-7 means the same function."""
    a, b = copy.deepcopy(ours).cpu().eval(), copy.deepcopy(theirs).cpu().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in a.parameters():     # weights of about 1.5 / sqrt(fan-in): attention logits of a few units,
            fan_in = p[0].numel() if p.dim() > 1 else 1            # so a swapped q/k or a wrong head shows
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in ** 0.5 if p.dim() > 1 else 0.1))
        b.net.load_state_dict(ours_as_diffusers_state(a), strict=True)
        x = torch.randn(2, 3, image_size, image_size, generator=g)
        t = torch.tensor([10, 900])
        y_a, y_b = a(x, t), b(x, t)
    return ((y_a - y_b).abs().max() / y_a.abs().max()).item()


def make_train_step(model, diffusion: GaussianDiffusion, dtype, device: torch.device, lr: float = 2e-4):
    """-> step(x0): one optimizer step of train.fit's diffusion stage (without the EMA) on x0 (B,3,S,S) in
    [-1, 1], under autocast to ``dtype`` (``common.amp_dtype``), with a GradScaler for fp16 as fit has."""
    opt = make_optimizer(model.parameters(), lr, 0.0, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    amp = autocast(device, dtype)

    def step(x0):
        with amp:
            loss = diffusion.training_loss(model, x0)                                  # DDPM Alg. 1
        optimizer_step(model, opt, scaler, loss)
    return step


def time_steps(step, n: int, device: torch.device) -> float:
    """Seconds for ``n`` calls of ``step``, the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return time.perf_counter() - t0


# --breakdown: kinds of op, each by substrings of the lower-cased profiler name; the first match wins
OP_KINDS = (
    ("convolution", ("conv",)),                                           # forward and backward, cuDNN/oneDNN
    ("matmul and attention", ("mm", "linear", "attention", "softmax")),   # mm, bmm, addmm, SDPA kernels
    ("GroupNorm and SiLU", ("group_norm", "silu")),
    ("dropout", ("dropout", "bernoulli")),
    ("optimizer and clipping", ("adam", "foreach", "norm", "amp_")),      # fused AdamW, clipping, GradScaler
)


def op_kind(name: str):
    """The OP_KINDS kind of a profiler event name, or None (counted under "other")."""
    name = name.lower()
    return next((kind for kind, parts in OP_KINDS if any(part in name for part in parts)), None)


def step_breakdown(step, n: int, device: torch.device) -> dict:
    """Profile ``n`` calls of ``step`` -> ms per step of each OP_KINDS kind, "other" and "step" (wall time).

    Self times of the ops: CPU time on the CPU, the GPU time of the kernels each op launched on CUDA. "other" is
    the rest of the wall time (elementwise ops, copies, Python, an idle GPU, the profiler's own cost)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = time_steps(step, n, device)
    ms = dict.fromkeys([kind for kind, _ in OP_KINDS], 0.0)
    for evt in prof.key_averages():
        kind = op_kind(evt.key)
        if kind is not None and evt.device_type == DeviceType.CPU:      # kernels count through their op
            us = evt.self_device_time_total if device.type == "cuda" else evt.self_cpu_time_total
            ms[kind] += us / 1e3 / n
    ms["step"] = 1e3 * seconds / n
    ms["other"] = ms["step"] - sum(ms[kind] for kind, _ in OP_KINDS)
    return ms


def main() -> int:
    args = get_parser().parse_args()
    for name in ("image_size", "batch_size", "base_channels", "num_res_blocks", "steps", "repeats", "peak_tflops",
                 "breakdown_steps"):
        check_positive("--" + name, getattr(args, name))
    check_positive("--warmup", args.warmup, allow_zero=True)
    if args.breakdown and args.count_only:
        raise UserError("--breakdown profiles training steps, which --count_only skips; drop one of them")
    check_output_file(args.json, "--json")
    cfg = checked_unet_config(args)
    try:
        import diffusers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False
    device = resolve_device(args.device, "benchmarking")
    if device.type == "cuda":                                                   # as train.py
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dtype = amp_dtype(device, args.precision)
    precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler", None: "fp32"}[dtype]
    memory_format = {"auto": memory_format_for(device), "channels_last": torch.channels_last,
                     "contiguous": torch.contiguous_format}[args.memory_format]
    layout = "channels_last" if memory_format == torch.channels_last else "contiguous"

    torch.manual_seed(0)
    ours = UNet(cfg).to(device)
    models, notes, differs = {"ours": ours}, [], []
    if have_diffusers:
        torch.manual_seed(0)
        theirs, differs = diffusers_twin(cfg, ours)
        models["diffusers"] = theirs.to(device)
        notes += differs
    else:
        notes.append(f"diffusers is not installed, so ours is timed alone; {INSTALL_HINT} for the comparison")
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    flops = {k: forward_flops_per_image(m, args.image_size, device) for k, m in models.items()}
    difference = output_difference(ours, models["diffusers"], args.image_size) if have_diffusers and not differs \
        else None
    ratios = {"params": params["ours"] / params["diffusers"], "flops": flops["ours"] / flops["diffusers"]} \
        if have_diffusers else {}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result = {"args": vars(args), "device": gpu or str(device), "precision": precision, "memory_format": layout,
              "params": params, "fwd_flops_per_image": flops, "notes": notes, "relative_output_difference": difference}

    def save():                         # after the timing, and again after the breakdown: a timeout loses less
        if args.json:
            atomic_save(to_json(result), args.json)

    timed = not args.count_only
    ips, peak = {k: [] for k in models}, {k: 0.0 for k in models}
    med, mfu = {}, None
    if timed:
        diffusion = GaussianDiffusion(DiffusionConfig())
        x0 = (torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1)
        x0 = x0.contiguous(memory_format=memory_format)
        steps = {}
        for k, m in models.items():
            m.train().to(memory_format=memory_format)
            steps[k] = partial(make_train_step(torch.compile(m) if args.compile else m, diffusion, dtype, device), x0)
            time_steps(steps[k], args.warmup, device)
        for _ in range(args.repeats):                        # interleaved: ours, diffusers, ours, diffusers, ...
            for k in models:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                ips[k].append(args.steps * args.batch_size / time_steps(steps[k], args.steps, device))
                if device.type == "cuda":
                    peak[k] = max(peak[k], torch.cuda.max_memory_allocated(device) / 2 ** 30)
        med = {k: statistics.median(v) for k, v in ips.items()}
        if have_diffusers:
            ratios["images_per_s"] = statistics.median([a / b for a, b in zip(ips["ours"], ips["diffusers"])])
        if device.type == "cuda":
            mfu = {k: 3 * flops[k] * med[k] / (args.peak_tflops * 1e12) for k in models}
    result.update(images_per_s=ips if timed else None, median_images_per_s=med, ratio_ours_over_diffusers=ratios,
                  mfu=mfu, peak_memory_gib=peak if mfu is not None else None)
    save()

    print(f"train_throughput: {args.image_size}x{args.image_size}, batch {args.batch_size}, base "
          f"{args.base_channels} x {tuple(cfg.channel_mult)}, {args.num_res_blocks} res blocks, attention at "
          f"{tuple(cfg.attn_resolutions)}, device {device}" + (f" ({gpu})" if gpu else "")
          + f", {precision}, {layout}, compile {'on' if args.compile else 'off'}"
          + (f"; {args.steps} steps x {args.repeats} repeats after {args.warmup} warm-up" if timed else "; counts only")
          + ("" if mfu is None else f"; MFU against a peak of {args.peak_tflops:g} TFLOP/s"))
    if difference is not None:
        print(f"same function: our (random) weights copied into diffusers' model by name give outputs equal within "
              f"{difference:.1e} of their largest value (float32, CPU)")
    elif have_diffusers:
        print("same function: not checked, the two differ as the note below says")
    for note in notes:
        print(f"note: {note}")
    print("\n| model | parameters | fwd GFLOP/image | images/s (median) | ms/step | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    names = {"ours": "ours: UNet", "diffusers": "diffusers: UNet2DModel"}
    for k in models:
        speed = f"{med[k]:.1f} | {1e3 * args.batch_size / med[k]:.1f}" if timed else "n/a | n/a"
        gpu_cells = "n/a | n/a" if mfu is None else f"{100 * mfu[k]:.1f}% | {peak[k]:.2f}"
        print(f"| {names[k]} | {params[k]:,} | {flops[k] / 1e9:.3f} | {speed} | {gpu_cells} |")
    if have_diffusers:
        speed = f"{ratios['images_per_s']:.3f} | {1 / ratios['images_per_s']:.3f}" if timed else "n/a | n/a"
        gpu_cells = "n/a | n/a" if mfu is None else f"{mfu['ours'] / mfu['diffusers']:.3f} | " \
                                                     f"{peak['ours'] / peak['diffusers']:.3f}"
        print(f"| ratio ours/diffusers | {ratios['params']:.3f} | {ratios['flops']:.3f} | {speed} | {gpu_cells} |")
    if args.breakdown:
        ms = result["breakdown_ms_per_step"] = {k: step_breakdown(steps[k], args.breakdown_steps, device)
                                                for k in models}
        save()
        print(f"\nwhere a step goes (profiled {', '.join(ms)}; ms per step and share of the step):\n")
        print("| kind of op | " + " | ".join(f"{k} ms | {k} share" for k in ms) + " |")
        print("|---|" + "---|---|" * len(ms))
        for kind in [kind for kind, _ in OP_KINDS] + ["other", "step"]:
            cells = " | ".join(f"{ms[k][kind]:.1f} | {100 * ms[k][kind] / ms[k]['step']:.1f}%" for k in ms)
            print(f"| {kind} | {cells} |")
    return 0


if __name__ == "__main__":
    run_main(main)
