"""CUDA paths: bf16 + channels_last against the CPU in fp32, fused attention, sync-free training steps (bf16, and
fp16 with a GradScaler), and train.py / generate.py end to end on the GPU (with and without --compile). Run on a
GPU machine, e.g. by benchmarks/device_check.sh; without CUDA this module is skipped (the CPU suite covers the
same maths)."""
import copy
import json
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import train
from common import amp_dtype, autocast, memory_format_for
from dataset import load_split
from diffusion_model import AttnBlock, DiffusionConfig, GaussianDiffusion, UNet, UNetConfig
from fakes import TINY, assert_ok, run
from train import make_optimizer, optimizer_step, update_ema

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/device_check.sh)")
CUDA = torch.device("cuda")
TINY_CUDA = [a if a != "cpu" else "cuda" for a in TINY]
CFG = UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                 dropout=0.0)


def random_unet() -> UNet:
    """A UNet whose zero-initialised layers are filled, so every path contributes to the output."""
    torch.manual_seed(0)
    net = UNet(CFG)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_unet_bf16_channels_last_on_cuda_matches_fp32_on_cpu():
    net = random_unet()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        ref = net(x, t)
        gpu = copy.deepcopy(net).to(CUDA, memory_format=torch.channels_last)
        with autocast(CUDA, amp_dtype(CUDA, "bf16")):
            out = gpu(x.to(CUDA, memory_format=torch.channels_last), t.to(CUDA)).float().cpu()
    assert out.shape == ref.shape
    assert ((out - ref).norm() / ref.norm()).item() < 0.03


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_attention_takes_a_fused_kernel(layout):
    """q/k/v reach SDPA contiguous in the head dim in either layout (a view of the channels_last qkv conv's
    output, a copy of an NCHW one); strided q/k/v would leave only the math kernel, and restricting SDPA to
    the fused ones would then raise "No available kernel". The output matches the block in fp32 on the CPU."""
    torch.manual_seed(0)
    blk = AttnBlock(64)
    torch.nn.init.normal_(blk.proj.weight, std=0.1)                 # zero-initialised: would hide the attention
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        ref = blk(x)                                                # softmax(QK^T/sqrt(d))V on the CPU, fp32
        gpu = copy.deepcopy(blk).to(CUDA, memory_format=layout)
        with autocast(CUDA, torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            y = gpu(x.to(CUDA).contiguous(memory_format=layout)).float().cpu()
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert ((y - ref).norm() / (ref - x).norm()).item() < 0.03      # the attention part, in bf16


def train_steps(precision: str, steps: int, sync_debug: str = "default"):
    """The diffusion stage's step as train.fit runs it (autocast, GradScaler for fp16, unscale + clipping, fused
    AdamW, EMA, the on-device NaN check), one warm-up step and then ``steps`` more under CUDA's sync debug mode
    ``sync_debug`` ("error" raises on any host-device synchronisation). -> (net, scaler, first_bad)"""
    torch.manual_seed(0)
    net = UNet(CFG).to(CUDA, memory_format=memory_format_for(CUDA)).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = make_optimizer(net.parameters(), 1e-4, 0.0, CUDA)
    dtype = amp_dtype(CUDA, precision)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=100))
    images = torch.randint(0, 256, (8 * (steps + 1), 3, 16, 16), dtype=torch.uint8, device=CUDA)
    order = torch.randperm(len(images)).to(CUDA)
    first_bad = torch.full((), -1, dtype=torch.long, device=CUDA)

    def step(i):
        nonlocal first_bad
        x = (images[order[8 * i:8 * (i + 1)]].float() / 127.5 - 1).contiguous(memory_format=memory_format_for(CUDA))
        with autocast(CUDA, dtype):
            loss = diffusion.training_loss(net, x)                                       # DDPM Alg. 1
        optimizer_step(net, opt, scaler, loss)
        update_ema(ema, net, 0.999, i)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), i, first_bad)

    step(0)                                                # warm-up: lazy state and one-time table copies
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(sync_debug)
    try:
        for i in range(1, steps + 1):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return net, scaler, first_bad


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_step_never_waits_for_the_gpu(precision):
    """fp16's GradScaler hands its inf check to the fused AdamW on the device, so it adds no sync either."""
    _, _, first_bad = train_steps(precision, 7, sync_debug="error")
    assert first_bad.item() == -1


def test_fp16_training_steps_are_finite_with_a_grad_scaler():
    """fp16 autocast with the GradScaler train.fit uses: every loss finite, the weights trained and finite, and the
    scale a finite power of two (it halves on an overflowing step and skips it, so the run never sees an inf)."""
    torch.manual_seed(0)                                   # train_steps's initial weights
    start = UNet(CFG).state_dict()
    net, scaler, first_bad = train_steps("fp16", 20)
    assert first_bad.item() == -1 and scaler.is_enabled()
    scale = scaler.get_scale()
    assert 0 < scale < float("inf") and scale == 2.0 ** round(torch.log2(torch.tensor(scale)).item())
    weights = {k: v.float().cpu() for k, v in net.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(weights[k], v) for k, v in start.items())          # some steps were taken


def fit_syncs(out, steps: int) -> int:
    """Host-device syncs that CUDA's sync debug mode reports while ``train.fit`` itself trains the diffusion
    stage for 2 epochs of ``steps`` steps, logging and checkpointing only at the epoch ends."""
    out.mkdir()
    args = train.get_parser().parse_args([*TINY_CUDA, "--output_dir", str(out), "--checkpoint_every", "100000",
                                          "--max_steps_per_epoch", str(steps)])
    assert steps * 2 < train.LOG_EVERY                     # no log point inside the run
    run_ = train.Run(args, None)
    split = load_split("toyfaces", "train", 16, subset_fraction=0.05, verbose=False)       # 1,000 images
    torch.manual_seed(0)
    net = UNet(CFG).to(CUDA, memory_format=memory_format_for(CUDA))                 # as train.py
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = make_optimizer(net.parameters(), 1e-4, 0.0, CUDA)
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=100))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train.fit(run_, "diffusion", net, opt, split, 2, 1e-4, lambda x0, attrs: diffusion.training_loss(net, x0),
                      lambda epoch, record: {}, {}, ema=ema)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert (out / "last.pth").is_file()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def test_fit_syncs_do_not_grow_with_the_steps(tmp_path):
    """train.fit's hot loop as it is (data indexing, flips, lr writes, loss sums, EMA, NaN check): syncs happen
    at epoch ends and log points only, so 12 steps per epoch sync exactly as often as 4."""
    fit_syncs(tmp_path / "warm", 1)                        # one-time work: cuBLAS/cuDNN handles, schedule tables
    few, many = fit_syncs(tmp_path / "few", 4), fit_syncs(tmp_path / "many", 12)
    assert few > 0 and many == few, (few, many)            # > 0: the debug mode does report the epoch-end syncs


@pytest.mark.parametrize("compile_flag", [[], ["--compile"]], ids=["eager", "compile"])
def test_train_and_generate_on_cuda(tmp_path, compile_flag):
    out = tmp_path / "run"
    proc = run("train.py", "--dataset", "toyfaces", *TINY_CUDA, *compile_flag, "--classifier_epochs", 1,
               "--oracle_epochs", 1, "--diffusion_epochs", 1, "--max_steps_per_epoch", 8, "--subset_fraction", 0.05,
               "--output_dir", out, timeout=140)
    assert_ok(proc)
    for name in ("diffusion_final.pth", "classifier_best.pth", "oracle_best.pth"):
        ckpt = torch.load(out / name, weights_only=True, map_location="cpu")
        keys = list(ckpt["model"])
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys), keys[:3]    # the plain module
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(r["images_per_s"] > 0 for r in log if "epoch" in r)
    gen = run("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
              out / "classifier_best.pth", "--device", "cuda", "--num_samples", 8, "--steps", 10,
              "--guidance_scale", 3, 10, "--output", tmp_path / "g.png")
    assert_ok(gen)
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["steps"] == 10 and report["unet_calls_per_image"] == 10 and (tmp_path / "g.png").is_file()
    cf = run("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
             out / "classifier_best.pth", "--device", "cuda", "--from_dataset", 4, "--steps", 10,
             "--guidance_scale", 10, "--output", tmp_path / "cf.png")
    assert_ok(cf)
    assert len(list((tmp_path / "cf").glob("*.png"))) == 4
    assert json.loads((tmp_path / "cf.json").read_text())["mode"] == "counterfactual"
