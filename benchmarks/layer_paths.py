"""The two implementations of each layer that has two, timed side by side: the figures behind the choices
``diffusion_model.py`` makes per device.

    python benchmarks/layer_paths.py --device cpu            # about 1 min on 2 cores
    python benchmarks/layer_paths.py --device cuda           # decides whether the GPU should take a path too

Each row times forward plus backward of one layer at the default 64x64 model's sizes (batch --batch_size,
bf16 autocast as in training), the two paths interleaved over --repeats repeats of --iters calls; the table
shows the median milliseconds per call and the median of the per-repeat ratios (> 1: the second path is
faster). The paths compute the same function (tests/test_diffusion.py checks each pair). On CUDA the layers,
inputs and gradients are channels_last, as train.py makes them there, and the dropout row is left out: off
the CPU ``diffusion_model.dropout`` is ``F.dropout``.
  attention  ``AttnBlock.forward_sdpa`` (SDPA; CUDA's path)  vs  ``forward_matmul`` (the CPU's path)
  upsample   ``Upsample.forward_direct`` (nearest x2, 3x3 conv)  vs  ``forward_transposed`` (one transposed conv)
  dropout    ``F.dropout`` (bernoulli mask)  vs  ``diffusion_model.dropout`` (15-bit integer mask on the CPU)
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import ArgumentParser, autocast, check_positive, memory_format_for, resolve_device, run_main  # noqa: E402
from diffusion_model import AttnBlock, Upsample, dropout  # noqa: E402


def get_parser():
    p = ArgumentParser(description=ArgumentParser.summary(__doc__))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--batch_size", type=int, default=4, help="feature maps per call")
    p.add_argument("--iters", type=int, default=5, help="calls per path per repeat")
    p.add_argument("--repeats", type=int, default=7, help="interleaved measurements; medians reported")
    return p


def cases(batch: int):
    """-> [(layer, size, first path name, second path name, first fn, second fn, input shape)]."""
    torch.manual_seed(0)
    attn, up = AttnBlock(256, num_heads=4), Upsample(256)
    return [
        ("attention", "256 ch, 16x16", "sdpa", "matmul", attn.forward_sdpa, attn.forward_matmul, (batch, 256, 16, 16)),
        ("upsample", "256 ch, 32 -> 64", "direct", "transposed", up.forward_direct, up.forward_transposed, (batch, 256, 32, 32)),
        ("upsample", "256 ch, 16 -> 32", "direct", "transposed", up.forward_direct, up.forward_transposed, (batch, 256, 16, 16)),
        ("upsample", "256 ch, 8 -> 16", "direct", "transposed", up.forward_direct, up.forward_transposed, (batch, 256, 8, 8)),
        ("dropout", "p 0.1, 128 ch, 64x64", "F.dropout", "ours", lambda x: F.dropout(x, 0.1, True),
         lambda x: dropout(x, 0.1, True), (batch, 128, 64, 64)),
    ], (attn, up)


def main() -> int:
    args = get_parser().parse_args()
    for name in ("batch_size", "iters", "repeats"):
        check_positive("--" + name, getattr(args, name))
    device = resolve_device(args.device, "benchmarking")
    amp = autocast(device)
    rows, modules = cases(args.batch_size)
    layout = memory_format_for(device)                                                       # as train.py
    for m in modules:
        m.to(device, memory_format=layout)
    with amp:
        dtype = torch.bfloat16 if torch.is_autocast_enabled(device.type) else torch.float32

    def fwd_bwd(fn, x, grad):
        with amp:
            y = fn(x)
        y.backward(grad)

    def timed(fn, x, grad):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fwd_bwd(fn, x, grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / args.iters * 1e3

    print(f"layer_paths: device {device}, batch {args.batch_size}, forward + backward, {args.iters} calls x "
          f"{args.repeats} repeats\n")
    print("| layer | size | path A | path B | A ms | B ms | A / B |")
    print("|---|---|---|---|---|---|---|")
    for layer, size, name_a, name_b, fn_a, fn_b, shape in rows:
        if layer == "dropout" and device.type != "cpu":
            continue                                         # both paths are F.dropout there
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
        with amp:                                            # bf16 under autocast, as in training
            out_shape = fn_a(x).shape
        grad = torch.randn(out_shape, device=device, dtype=dtype).contiguous(memory_format=layout)
        for fn in (fn_a, fn_b):                                                      # warm-up
            fwd_bwd(fn, x, grad)
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(fn_a, x, grad))
            b.append(timed(fn_b, x, grad))
        ratio = statistics.median(p / q for p, q in zip(a, b))
        print(f"| {layer} | {size} | {name_a} | {name_b} | {statistics.median(a):.2f} | {statistics.median(b):.2f} | "
              f"{ratio:.2f} |")
    return 0


if __name__ == "__main__":
    run_main(main)
