"""CUDA paths: bf16 + channels_last against the CPU in fp32, fused attention, a sync-free training step, and
train.py / generate.py end to end on the GPU (with and without --compile). Run on a GPU machine, e.g. by
benchmarks/device_check.sh; without CUDA this module is skipped (the CPU suite covers the same maths)."""
import copy
import json
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import train
from common import memory_format_for
from dataset import load_split
from diffusion_model import AttnBlock, DiffusionConfig, GaussianDiffusion, UNet, UNetConfig
from fakes import TINY, assert_ok, run
from train import make_optimizer, update_ema

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/device_check.sh)")
CUDA = [a if a != "cpu" else "cuda" for a in TINY]
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
        gpu = copy.deepcopy(net).cuda().to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(x.cuda().contiguous(memory_format=torch.channels_last), t.cuda()).float().cpu()
    assert out.shape == ref.shape
    assert ((out - ref).norm() / ref.norm()).item() < 0.03


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_attention_takes_a_fused_kernel(layout):
    """q/k/v reach SDPA contiguous in the head dim in either layout (a view of the channels_last qkv conv's
    output, a copy of an NCHW one); strided q/k/v would leave only the math kernel, and restricting SDPA to
    the fused ones would then raise "No available kernel". Both layouts give the same output."""
    torch.manual_seed(0)
    blk = AttnBlock(64).cuda()
    torch.nn.init.normal_(blk.proj.weight, std=0.1)                 # zero-initialised: would hide the attention
    blk.to(memory_format=layout)
    x = torch.randn(2, 64, 8, 8, device="cuda").contiguous(memory_format=layout)
    with torch.autocast("cuda", dtype=torch.bfloat16), \
            sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        y = blk(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    ref = blk.float().to(memory_format=torch.contiguous_format).forward_matmul(x.float().contiguous())
    assert ((y.float() - ref).norm() / (ref - x).norm()).item() < 0.03      # the attention part, in bf16


def test_training_step_never_waits_for_the_gpu():
    """The diffusion stage's step as train.fit runs it (bf16 loss, backward, clipping, fused AdamW, EMA, the
    on-device NaN check) with CUDA's sync debug mode set to raise on any host-device synchronisation."""
    device = torch.device("cuda")
    net = UNet(CFG).to(device).to(memory_format=torch.channels_last).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = make_optimizer(net.parameters(), 1e-4, 0.0, device)
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=100))
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, device=device)
    order = torch.randperm(64).to(device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def step(i):
        nonlocal first_bad
        x = (images[order[8 * i:8 * (i + 1)]].float() / 127.5 - 1).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = diffusion.training_loss(net, x)                                       # DDPM Alg. 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        update_ema(ema, net, 0.999, i)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), i, first_bad)

    step(0)                                                # warm-up: lazy state and one-time table copies
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 8):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first_bad.item() == -1


def fit_syncs(out, steps: int, device=torch.device("cuda")) -> int:
    """Host-device syncs that CUDA's sync debug mode reports while ``train.fit`` itself trains the diffusion
    stage for 2 epochs of ``steps`` steps, logging and checkpointing only at the epoch ends."""
    out.mkdir()
    args = train.get_parser().parse_args([*TINY, "--device", str(device), "--output_dir", str(out), "--log_every",
                                          "100000", "--checkpoint_every", "100000", "--max_steps_per_epoch", str(steps)])
    run_ = train.Run(args, device, 0, 1, None)
    split = load_split("toyfaces", "train", 16, subset_fraction=0.05, verbose=False)       # 1,000 images
    torch.manual_seed(0)
    net = UNet(CFG).to(device, memory_format=memory_format_for(device))             # as train.py
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = make_optimizer(net.parameters(), 1e-4, 0.0, device)
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=100))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            train.fit(run_, "diffusion", {"model": net, "ema": ema}, opt, split, 2, 1e-4,
                      lambda x0, attrs: diffusion.training_loss(net, x0), lambda epoch, record: {}, {})
        finally:
            if device.type == "cuda":
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
    proc = run("train.py", "--dataset", "toyfaces", *CUDA, *compile_flag, "--classifier_epochs", 1,
               "--oracle_epochs", 1, "--diffusion_epochs", 1, "--max_steps_per_epoch", 8, "--subset_fraction", 0.05,
               "--output_dir", out, timeout=140)                       # under device_check.sh's limits
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
    assert report["steps"] == 10 and (tmp_path / "g.png").is_file()
    cf = run("generate.py", "--diffusion_model", out / "diffusion_final.pth", "--classifier_model",
             out / "classifier_best.pth", "--device", "cuda", "--from_dataset", 4, "--steps", 10, "--localize",
             "--guidance_scale", 10, "--output", tmp_path / "cf.png")
    assert_ok(cf)
    assert len(list((tmp_path / "cf").glob("*.png"))) == 4
