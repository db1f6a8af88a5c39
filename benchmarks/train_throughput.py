"""Training throughput of our UNet against HF diffusers' UNet2DModel built to the same architecture.

    pip install -r benchmarks/requirements.txt
    python benchmarks/train_throughput.py                                   # 64x64, batch 32, CUDA, bf16
    python benchmarks/train_throughput.py --compile --steps 50 --repeats 7
    python benchmarks/train_throughput.py --device cpu --count_only          # parameters and FLOPs only
    python benchmarks/train_throughput.py --device cpu --batch_size 4 --steps 5 --breakdown   # where a step goes

Both networks train in one process with the same data, optimizer (AdamW, fused on CUDA and the CPU, as train.py),
loss (eps-MSE on ``GaussianDiffusion.q_sample``, i.e. ``GaussianDiffusion.training_loss``, DDPM Alg. 1),
gradient clipping at 1.0, bf16 autocast (``common.autocast``) and channels_last on CUDA (``--memory_format``
measures the other layout: on CUDA, GroupNorm returns contiguous NCHW whatever its input). The EMA update and
the data path of ``train.fit`` are left out: they cost the same for both (see benchmarks/data_path.py).
Timing interleaves the two: for each repeat, ``--steps`` steps of ours, then ``--steps`` of diffusers, so
clock and thermal drift hit both alike; the table shows the median images/s and the median of the
per-repeat ratios. FLOPs are the forward pass per image from ``torch.utils.flop_counter.FlopCounterMode``
(a multiply-add counts 2); on CUDA, MFU = 3 x forward FLOPs x images/s / --peak_tflops (3: forward plus
a backward of about twice the forward). ``--breakdown`` then profiles ``--breakdown_steps`` steps of each with
torch.profiler and splits a step by kind of op (self time of each op: CPU time on the CPU, GPU kernel time
on CUDA; "other" is the rest of the wall time: elementwise ops, copies, Python, an idle GPU, and the
profiler's own per-op cost, so a profiled step is slower than a timed one). It also prints the conv-bound
ceiling: the ratio ours would reach if everything but its convolutions took no time (diffusers' timed step
over ours' profiled convolution time), and the convolutions' rate: 3 x forward FLOPs per step over their
time, an upper bound since the count includes the few FLOPs outside convolutions.

How diffusers is configured to match ``UNet(UNetConfig)``:
  block_out_channels = base_channels * channel_mult[i]; layers_per_block = num_res_blocks (its decoder also
  has one more block per level); AttnDownBlock2D / AttnUpBlock2D at the levels whose side is in
  attn_resolutions, DownBlock2D / UpBlock2D elsewhere; UNetMidBlock2D = Res-Attn-Res like ours; time
  embedding = sinusoidal (cos first, freq_shift 0, as ours) -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C);
  ResnetBlock2D = GroupNorm-SiLU-conv3x3, + Linear(SiLU(temb)), GroupNorm-SiLU-dropout-conv3x3, 1x1 skip
  conv when the width changes; attention = GroupNorm, q/k/v/out projections with bias (our qkv 1x1 conv +
  proj 1x1 conv hold the same weights), residual; conv stride-2 downsampling; nearest x2 + conv3x3
  upsampling; GroupNorm-SiLU-conv3x3 head. The skip connections are the same (conv_in, every block, every
  downsampler; concatenated as [h, skip]). So the parameter counts come out equal, and so do the FLOPs
  of the architecture (but see the upsampling below). Each run checks this: ``ours_as_diffusers_state``
  renames our (random) weights to diffusers' names, the twin loads them strictly, and the two outputs must
  agree (printed as "same function"; skipped when a note below says the two differ).
Remaining differences:
  - GroupNorm groups: ours uses gcd(32, C) per layer, diffusers one ``norm_num_groups``; we pass the
    smallest of ours (32 for every default width). Same parameters either way.
  - attention heads: ours has ``num_heads`` per layer (head dim C / 4), diffusers a fixed head dim; we pass
    our head dim, so widths that differ across attention layers get other head counts (not by default).
  - dropout: diffusers' AttnUpBlock2D takes no dropout (0 there); the other blocks get ours (0.1).
  - implementation only: diffusers' attention works on (B, HW, C) with Linear layers, transposes and SDPA;
    ours runs SDPA on a channels_last token view on CUDA and channel-major matrix products with no
    transposes on the CPU (``AttnBlock``); diffusers adds per-call checks and deprecation guards. Our
    dropout draws its CPU mask from raw 15-bit integers, diffusers' ``nn.Dropout`` from ``bernoulli_``.
    On the CPU, at input sides >= 32, our ``Upsample`` computes nearest x2 + 3x3 conv as one transposed
    conv with a folded 4x4 kernel: the same function and weights, 2.25x fewer FLOPs in that layer. The FLOP
    count is of what runs, so it shows ours lower there (-5.7% at the default 64x64 model on the CPU;
    equal on CUDA) and a note says so.
  - initialisation: ours zero-initialises the last conv of each block and the output (speed-neutral).
Without diffusers installed, ours is timed alone (images/s, MFU, --breakdown) and a note says what to install.
--json is written after the timing and again after --breakdown, so a run cut short keeps its timing.
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

from common import (PRECISION_HELP, ArgumentParser, UserError, atomic_write_json, autocast, check_output_file,  # noqa: E402
                    check_positive, memory_format_for, resolve_device, run_main)
from diffusion_model import AttnBlock, DiffusionConfig, GaussianDiffusion, UNet, UNetConfig, Upsample  # noqa: E402
from train import add_unet_args, make_optimizer  # noqa: E402

INSTALL_HINT = "pip install -r benchmarks/requirements.txt"


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=ArgumentParser.summary(__doc__))
    p.add_argument("--image_size", type=int, default=64, help="training image side in pixels")
    p.add_argument("--batch_size", type=int, default=32, help="images per training step")
    add_unet_args(p)
    p.add_argument("--device", default="cuda", help="cuda, cpu, cuda:1 (falls back to cpu without CUDA)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help=PRECISION_HELP)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per model per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per model first (more with --compile)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved ours/diffusers measurements; medians reported")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--memory_format", default="auto", choices=("auto", "channels_last", "contiguous"),
                   help="activation and weight layout: auto is channels_last on CUDA (as train.py), contiguous on the CPU")
    p.add_argument("--peak_tflops", type=float, default=989.0,
                   help="accelerator peak for MFU, TFLOP/s (989: H100/H200 dense bf16; ~495 for their TF32)")
    p.add_argument("--count_only", action="store_true", help="print parameters and FLOPs, skip the timing")
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
        raise UserError(problem + " (--image_size / --channel_mult)")
    problem = cfg.attention_problem()
    if problem:
        raise UserError("--" + problem)
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops_per_image(model: torch.nn.Module, image_size: int, device: torch.device) -> float:
    """Forward FLOPs of one image (batch of 1, no grad; a multiply-add counts 2).

    SDPA (diffusers' attention, and ours off the CPU) runs on the math backend here, so it is counted
    whichever fused kernel a layout would pick (FlopCounterMode has no formula for e.g. the CPU flash
    kernel); our CPU attention is plain matrix products and is counted as they are, the same count. Our
    transposed-conv upsampling (the CPU at input sides >= 32) is counted as it runs, with fewer FLOPs than the
    direct upsample-then-conv it replaces.
    """
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
    attn = [s in cfg.attn_resolutions for s in cfg.sides]
    net = UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=head_dims[-1], norm_num_groups=groups[0], dropout=cfg.dropout,
        flip_sin_to_cos=True, freq_shift=0)
    return DiffusersEps(net), notes


def ours_as_diffusers_state(ours: UNet) -> dict:
    """Our UNet's weights under UNet2DModel's names and shapes (its ``load_state_dict`` then takes them strictly).

    Walks our layout (``down``/``up``: per level, one entry per res block, each [ResBlock(, AttnBlock)],
    then a Down/Upsample; ``mid`` = Res, Attn, Res) in diffusers' order. Our qkv 1x1 conv (3C, C, 1, 1) holds
    q, k, v stacked along its outputs, head-major inside each, as diffusers' to_q, to_k, to_v (C, C)."""
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

    def entry(src, block, j):
        res(f"{src}.0", f"{block}.resnets.{j}")
        if f"{src}.1.qkv.weight" in sd:
            attn(f"{src}.1", f"{block}.attentions.{j}")

    put("conv_in", "conv_in")
    put("temb_mlp.0", "time_embedding.linear_1")
    put("temb_mlp.2", "time_embedding.linear_2")

    def path(ours_list, theirs_blocks, blocks_per_level, sampler):     # an encoder or decoder, level by level
        levels, k = len(cfg.channel_mult), 0
        for i in range(levels):
            for j in range(blocks_per_level):
                entry(f"{ours_list}.{k}", f"{theirs_blocks}.{i}", j)
                k += 1
            if i < levels - 1:
                put(f"{ours_list}.{k}.conv", f"{theirs_blocks}.{i}.{sampler}.0.conv")
                k += 1

    path("down", "down_blocks", cfg.num_res_blocks, "downsamplers")          # encoder, finest level first
    res("mid.0", "mid_block.resnets.0")
    attn("mid.1", "mid_block.attentions.0")
    res("mid.2", "mid_block.resnets.1")
    path("up", "up_blocks", cfg.num_res_blocks + 1, "upsamplers")            # decoder, coarsest level first
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
    ("convolution", ("conv",)),                                   # forward, backward, transposed, cuDNN/oneDNN
    ("matmul and attention", ("mm", "linear", "attention", "softmax")),   # mm, bmm, addmm, SDPA kernels
    ("GroupNorm and SiLU", ("group_norm", "silu")),
    ("dropout", ("dropout", "bernoulli", "random_")),            # CUDA's fused kernel; CPU mask draws
    ("optimizer and clipping", ("adam", "foreach", "norm")),     # fused AdamW, clip_grad_norm_'s norms
)


def op_kind(name: str):
    """The OP_KINDS kind of a profiler event name, or None (counted under "other")."""
    name = name.lower()
    return next((kind for kind, parts in OP_KINDS if any(part in name for part in parts)), None)


def step_breakdown(step, n: int, device: torch.device) -> dict:
    """Profile ``n`` calls of ``step`` -> ms per step of each OP_KINDS kind, "other" and "step" (wall time).

    Self times of the ops: CPU time on the CPU (an op's threads work inside it, so these add up to wall time);
    on CUDA the GPU kernel time each op launched. "other" is the wall time the kinds leave."""
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


def make_train_step(model, diffusion: GaussianDiffusion, amp, device: torch.device, lr: float = 2e-4,
                    grad_clip: float = 1.0):
    """-> step(x0): one optimizer step of the diffusion stage of ``train.fit`` (without EMA) on a batch
    x0 (B,3,S,S) in [-1, 1]."""
    opt = make_optimizer(model.parameters(), lr, 0.0, device)

    def step(x0):
        with amp:
            loss = diffusion.training_loss(model, x0)                                  # DDPM Alg. 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
    return step


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
    except ImportError:                 # ours is still timed (images/s, MFU); the comparison needs diffusers
        have_diffusers = False
    device = resolve_device(args.device, "benchmarking")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp = autocast(device, args.precision)
    with amp:
        bf16 = torch.is_autocast_enabled(device.type)
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
    params = {k: count_params(m) for k, m in models.items()}
    flops = {k: forward_flops_per_image(m, args.image_size, device) for k, m in models.items()}
    difference = output_difference(ours, models["diffusers"], args.image_size) if have_diffusers and not differs \
        else None

    header = (f"{args.image_size}x{args.image_size}, batch {args.batch_size}, base {args.base_channels} x "
              f"{tuple(cfg.channel_mult)}, {args.num_res_blocks} res blocks, attention at {tuple(cfg.attn_resolutions)}, "
              f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
              + f", bf16 autocast {'on' if bf16 else 'off'}, {layout}, compile {'on' if args.compile else 'off'}")
    result = {"args": vars(args), "params": params, "fwd_flops_per_image": flops, "notes": notes,
              "relative_output_difference": difference}
    ratios = {}
    if have_diffusers:
        ratios = {"params": params["ours"] / params["diffusers"], "flops": flops["ours"] / flops["diffusers"]}
        if abs(ratios["params"] - 1) > 0.10:
            notes.append(f"parameter counts differ by {abs(ratios['params'] - 1):.0%} (> 10%): not a like-for-like "
                         f"comparison")
    transposed = [s for s in cfg.sides[1:] if Upsample.takes_transposed(device, s)]   # Upsample input sides
    if transposed:
        notes.append(f"ours computes {len(transposed)} upsampling conv(s) as a transposed conv on the CPU (the same "
                     f"function and weights, 2.25x fewer FLOPs in that layer)"
                     + (f": {ratios['flops'] - 1:+.1%} FLOPs" if ratios else ""))

    def save():                         # after the timing, and again after the breakdown: a timeout loses less
        if args.json:
            atomic_write_json(args.json, result)

    timed = not args.count_only
    ips = {k: [] for k in models}
    med, mfu = {}, None
    if timed:
        diffusion = GaussianDiffusion(DiffusionConfig())
        x0 = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
        x0 = x0.contiguous(memory_format=memory_format)
        steps = {}
        for k, m in models.items():
            m.train().to(memory_format=memory_format)
            steps[k] = partial(make_train_step(torch.compile(m) if args.compile else m, diffusion, amp, device), x0)
            time_steps(steps[k], args.warmup, device)
        for _ in range(args.repeats):                        # interleaved: ours, diffusers, ours, diffusers, ...
            for k in models:
                ips[k].append(args.steps * args.batch_size / time_steps(steps[k], args.steps, device))
        med = {k: statistics.median(v) for k, v in ips.items()}
        if have_diffusers:
            ratios["images_per_s"] = statistics.median([a / b for a, b in zip(ips["ours"], ips["diffusers"])])
        if device.type == "cuda":
            mfu = {k: 3 * flops[k] * med[k] / (args.peak_tflops * 1e12) for k in models}
    result.update(images_per_s=ips if timed else None, median_images_per_s=med, ratio_ours_over_diffusers=ratios,
                  mfu=mfu)
    save()

    print(f"train_throughput: {header}" + (f"; {args.steps} steps x {args.repeats} repeats after {args.warmup} "
                                           f"warm-up" if timed else "; counts only")
          + ("" if mfu is None else f"; MFU against a peak of {args.peak_tflops:g} TFLOP/s"))
    if difference is not None:
        print(f"same function: our (random) weights copied into diffusers' model by name give outputs equal within "
              f"{difference:.1e} of their largest value (float32, CPU)")
    elif have_diffusers:
        print("same function: not checked, the two differ as the note below says")
    for note in notes:
        print(f"note: {note}")
    print("\n| model | parameters | fwd GFLOP/image | images/s (median) | ms/step | MFU |")
    print("|---|---|---|---|---|---|")
    names = {"ours": "ours: UNet", "diffusers": "diffusers: UNet2DModel"}
    for k in models:
        speed = f"{med[k]:.1f} | {1e3 * args.batch_size / med[k]:.1f}" if timed else "n/a | n/a"
        print(f"| {names[k]} | {params[k]:,} | {flops[k] / 1e9:.3f} | {speed} | "
              f"{'n/a' if mfu is None else f'{100 * mfu[k]:.1f}%'} |")
    if have_diffusers:
        speed = f"{ratios['images_per_s']:.3f} | {1 / ratios['images_per_s']:.3f}" if timed else "n/a | n/a"
        mfu_ratio = "n/a" if mfu is None else f"{mfu['ours'] / mfu['diffusers']:.3f}"
        print(f"| ratio ours/diffusers | {ratios['params']:.3f} | {ratios['flops']:.3f} | {speed} | {mfu_ratio} |")
    if args.breakdown:
        result["breakdown_ms_per_step"] = {k: step_breakdown(steps[k], args.breakdown_steps, device) for k in models}
        save()
        print_breakdown(result["breakdown_ms_per_step"],
                        1e3 * args.batch_size / med["diffusers"] if have_diffusers else None,
                        {k: 3 * flops[k] * args.batch_size for k in models})
    return 0


def print_breakdown(ms: dict, theirs_step_ms: float | None, flops_per_step: dict) -> None:
    """The --breakdown table, one row per kind of op and a column pair per model; the convolutions' rate; with
    diffusers, the conv-bound ceiling against its timed step (``theirs_step_ms``)."""
    print(f"\nwhere a step goes (profiled {', '.join(ms)}; ms per step and share of the step):\n")
    print("| kind of op | " + " | ".join(f"{k} ms | {k} share" for k in ms) + " |")
    print("|---|" + "---|---|" * len(ms))
    for kind in [kind for kind, _ in OP_KINDS] + ["other", "step"]:
        cells = " | ".join(f"{ms[k][kind]:.1f} | {100 * ms[k][kind] / ms[k]['step']:.1f}%" for k in ms)
        print(f"| {kind} | {cells} |")
    rate = {k: flops_per_step[k] / (ms[k]["convolution"] / 1e3) / 1e9 for k in ms}
    print("\nconvolution rate, at most (3 x forward FLOPs per step / convolution time): "
          + ", ".join(f"{k} {rate[k]:.0f}" for k in ms) + " GFLOP/s")
    if theirs_step_ms is not None:
        ceiling = theirs_step_ms / ms["ours"]["convolution"]
        print(f"\nconv-bound ceiling: ours would run at {ceiling:.2f}x diffusers' images/s if everything but its "
              f"convolutions took no time")


if __name__ == "__main__":
    run_main(main)
