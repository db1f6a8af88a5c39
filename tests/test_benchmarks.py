"""The benchmarks run end to end at tiny sizes on the CPU and print their tables; no timing is asserted."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from classifier import ClassifierConfig, NoisyClassifier
from diffusion_model import UNet, UNetConfig
from fakes import ROOT, assert_ok, assert_user_error, run, run_here

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
TINY_UNET = ["--device", "cpu", "--precision", "fp32", "--image_size", "16", "--base_channels", "16",
             "--channel_mult", "1,2", "--attn_resolutions", "8", "--num_res_blocks", "1", "--batch_size", "8",
             "--steps", "2", "--repeats", "1"]
INSTALL_HINT = "pip install -r benchmarks/requirements.txt"
DEVICE_CHECK = os.path.join(ROOT, "benchmarks", "device_check.sh")


def table(stdout: str) -> tuple:
    """The markdown table in ``stdout`` -> (header cells, {first cell: row cells})."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("|")]
    assert len(rows) >= 3 and set(rows[1][0]) <= set("-:"), stdout
    return rows[0], {r[0]: r for r in rows[2:]}


def check_train_throughput_table(stdout: str, with_diffusers: bool) -> None:
    header, rows = table(stdout)
    assert header == ["model", "parameters", "fwd GFLOP/image", "images/s (median)", "ms/step", "MFU", "peak GiB"]
    ours = rows["ours: UNet"]
    assert int(ours[1].replace(",", "")) > 0 and float(ours[2]) > 0 and float(ours[3]) > 0
    assert ours[5:7] == ["n/a", "n/a"]                    # MFU and peak memory: CUDA only
    ips = float(ours[3])                                  # both printed to 0.1: allow for that rounding
    assert abs(float(ours[4]) - 8e3 / ips) < 0.05 + 0.05 * 8e3 / (ips - 0.05) ** 2 + 1e-6     # ms/step, batch 8
    if not with_diffusers:
        assert list(rows) == ["ours: UNet"]
        return
    theirs = rows["diffusers: UNet2DModel"]
    assert int(theirs[1].replace(",", "")) > 0 and float(theirs[3]) > 0
    ratio = [float(v) for v in rows["ratio ours/diffusers"][1:5]]     # params, FLOPs, images/s, ms/step
    assert ratio[0] == 1.0 and ratio[1] == 1.0                        # the same architecture
    assert ratio[2] > 0 and abs(ratio[2] * ratio[3] - 1) < 0.01


def test_train_throughput(tmp_path):
    """With diffusers (benchmarks/requirements.txt): both networks side by side. Without (CI): ours alone. The
    breakdown's kinds of op and "other" add up to the profiled step."""
    out = tmp_path / "train_throughput.json"
    proc = run("benchmarks/train_throughput.py", *TINY_UNET, "--warmup", "1", "--breakdown", "--breakdown_steps", "2",
               "--json", out)
    assert_ok(proc)
    main_table, breakdown = proc.stdout.split("where a step goes")
    check_train_throughput_table(main_table, HAVE_DIFFUSERS)
    result = json.loads(out.read_text())
    models = ["ours", "diffusers"] if HAVE_DIFFUSERS else ["ours"]
    assert list(result["images_per_s"]) == models and len(result["images_per_s"]["ours"]) == 1
    assert result["precision"] == "fp32" and result["mfu"] is None and result["peak_memory_gib"] is None
    header, rows = table(breakdown)
    assert header == ["kind of op"] + [f"{m} {c}" for m in models for c in ("ms", "share")]
    kinds = ["convolution", "matmul and attention", "GroupNorm and SiLU", "dropout", "optimizer and clipping"]
    assert list(rows) == kinds + ["other", "step"] and list(result["breakdown_ms_per_step"]) == models
    for model in models:
        ms = result["breakdown_ms_per_step"][model]
        assert ms["convolution"] > 0 and ms["matmul and attention"] > 0 and ms["optimizer and clipping"] > 0
        assert abs(sum(ms[k] for k in kinds + ["other"]) - ms["step"]) < 1e-6 * ms["step"]
    if HAVE_DIFFUSERS:
        assert "same function: not checked, the two differ" in proc.stdout      # TINY_UNET: groups 16 and 32
    else:
        assert f"diffusers is not installed, so ours is timed alone; {INSTALL_HINT}" in proc.stdout
        assert result["ratio_ours_over_diffusers"] == {}


def test_train_throughput_fp16_with_a_grad_scaler_in_channels_last(tmp_path):
    out = tmp_path / "fp16.json"
    proc = run("benchmarks/train_throughput.py", *TINY_UNET, "--warmup", "0", "--precision", "fp16",
               "--memory_format", "channels_last", "--json", out)
    assert_ok(proc)
    assert ", fp16 autocast + GradScaler, channels_last, compile off;" in proc.stdout
    result = json.loads(out.read_text())
    assert result["precision"] == "fp16 autocast + GradScaler" and result["memory_format"] == "channels_last"
    assert result["median_images_per_s"]["ours"] > 0


def test_train_throughput_without_diffusers(tmp_path):
    """Where diffusers is installed, hide it: ours is still timed, and a note says what to install."""
    out = tmp_path / "alone.json"
    code = ("import runpy, sys; sys.modules['diffusers'] = None; "
            f"sys.argv = ['train_throughput.py', *{TINY_UNET!r}, '--warmup', '0', '--json', {str(out)!r}]; "
            f"runpy.run_path({os.path.join(ROOT, 'benchmarks', 'train_throughput.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert_ok(proc)
    assert f"note: diffusers is not installed, so ours is timed alone; {INSTALL_HINT}" in proc.stdout
    assert "same function:" not in proc.stdout
    check_train_throughput_table(proc.stdout, with_diffusers=False)
    result = json.loads(out.read_text())
    assert list(result["params"]) == ["ours"] and result["ratio_ours_over_diffusers"] == {}


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason=f"diffusers is not installed ({INSTALL_HINT})")
def test_train_throughput_twin_is_the_same_function(monkeypatch):
    """Our random weights, renamed by ours_as_diffusers_state, load strictly into the diffusers twin and give the
    same outputs (two res blocks per level, a level with attention and one without: every kind of entry of the
    mapping); a mapping that swaps one attention's q and k does not, so the check would catch a wrong one."""
    spec = importlib.util.spec_from_file_location("train_throughput", os.path.join(ROOT, "benchmarks",
                                                                             "train_throughput.py"))
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)
    cfg = UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8,))
    torch.manual_seed(0)
    ours = UNet(cfg)
    twin, notes = tt.diffusers_twin(cfg, ours)
    assert notes == [] and sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in ours.parameters())
    same = tt.output_difference(ours, twin, 16)
    assert same < 1e-5
    right = tt.ours_as_diffusers_state

    def q_and_k_swapped(net):
        sd, key = right(net), "up_blocks.0.attentions.2.to_{}.weight"
        sd[key.format("q")], sd[key.format("k")] = sd[key.format("k")], sd[key.format("q")]
        return sd
    monkeypatch.setattr(tt, "ours_as_diffusers_state", q_and_k_swapped)
    assert tt.output_difference(ours, twin, 16) > max(1e-5, 100 * same)     # fails the bound the right one meets
    proc = run("benchmarks/train_throughput.py", "--device", "cpu", "--image_size", "32", "--base_channels", "32",
               "--channel_mult", "1,2,2", "--attn_resolutions", "16", "--count_only")     # the README's small model
    assert_ok(proc)
    assert float(re.search(r"outputs equal within (\S+) of", proc.stdout).group(1)) < 1e-5
    _, rows = table(proc.stdout)
    assert rows["ours: UNet"][1] == rows["diffusers: UNet2DModel"][1] == "1,624,323"
    assert rows["ratio ours/diffusers"][1:3] == ["1.000", "1.000"]


def test_train_throughput_rejects_bad_input(tmp_path, capsys, monkeypatch):
    def bad(*args):
        return run_here("benchmarks/train_throughput.py", "--device", "cpu", *args, cwd=tmp_path, capsys=capsys,
                        monkeypatch=monkeypatch)

    assert_user_error(bad("--memory_format", "nhwc"), "--memory_format")
    assert_user_error(bad("--precision", "fp8"), "--precision")
    assert_user_error(bad("--steps", "0"), "--steps must be > 0")
    assert_user_error(bad("--peak_tflops", "nan"), "--peak_tflops must be > 0")
    assert_user_error(bad("--count_only", "--breakdown"),
                      "--breakdown profiles training steps, which --count_only skips")
    assert_user_error(bad("--attn_resolutions", "12", "--count_only"), "attn_resolutions 12 is not a feature-map side",
                      "64, 32, 16, 8", "--attn_resolutions")
    (tmp_path / "afile").write_text("x")
    assert_user_error(bad("--json", tmp_path / "afile" / "r.json"), "cannot write", "afile")
    assert_user_error(bad("--json", tmp_path), "--json", "is a folder")


def test_data_path(tmp_path):
    out = tmp_path / "data_path.json"
    proc = run("benchmarks/data_path.py", *TINY_UNET, "--n_images", "200", "--num_workers", "1", "--json", out)
    assert_ok(proc)
    header, rows = table(proc.stdout)
    assert header == ["path", "data images/s (1 process)", "data wait, % of step", "training images/s", "ms/step"]
    jpeg = next(r for name, r in rows.items() if name.startswith("JPEG files"))
    cache = rows["uint8 cache (memmap)"]
    for row in (jpeg, cache):
        assert float(row[1]) > 0 and 0 <= float(row[2].rstrip("%")) <= 100 and float(row[3]) > 0
    ratio = rows["ratio cache/JPEG"]
    assert float(ratio[1]) > 0 and float(ratio[3]) > 0
    assert "cache / JPEG data throughput:" in proc.stdout
    result = json.loads(out.read_text())
    assert result["n_train"] == 120 and len(result["data_wait_fraction"]["cache"]) == 1


def test_data_path_rejects_too_few_images():
    proc = run("benchmarks/data_path.py", "--n_images", "10", "--batch_size", "32", "--device", "cpu")
    assert_user_error(proc, "--n_images 10 gives 6 training images", "--steps", "--batch_size")


def test_device_check_plan_and_unknown_steps(tmp_path):
    """The plan fits one 10-minute device call with room for the machine's start; a step name it does not know
    is refused before anything is written."""
    plan = subprocess.run(["bash", DEVICE_CHECK, "--plan"], capture_output=True, text=True, timeout=30)
    assert_ok(plan)
    limits = dict(line.split()[:2] for line in plan.stdout.splitlines())
    total = int(limits.pop("total"))
    assert list(limits)[:2] == ["machine", "tests"] and list(limits)[-1] == "summary"
    assert sum(map(int, limits.values())) == total <= 420
    out = tmp_path / "out"
    proc = subprocess.run(["bash", DEVICE_CHECK, "tests", "nosuch"], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, OUT=str(out)))
    assert_user_error(proc, "unknown step 'nosuch'", "machine tests")
    assert not out.exists()


def test_sampling_benchmark(toy_run, tmp_path):
    """A row per sampler config, precision, scale and direction from the same noise; rates are fractions; the
    Fréchet distances are finite; a second precision reports its difference from the first."""
    out, _ = toy_run
    proc = run("benchmarks/sampling.py", "--run_dir", out, "--device", "cpu", "--configs", "ddpm:10", "dpmpp2m:5",
               "--scales", 5, "--num_samples", 3, "--fd_samples", 4, "--batch_size", 4, "--precisions", "fp32", "bf16",
               "--json", tmp_path / "s.json")
    assert_ok(proc)
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [(r["sampler"], r["precision"], r["scale"], r["target"]) for r in rows] == [
        (s, p, sc, t) for s in ("ddpm", "dpmpp2m") for p in ("fp32", "bf16") for sc, t in ((0, None), (5, 1), (5, 0))]
    assert all(0 <= r["oracle_rate"] <= 1 and 0 <= r["guide_rate"] <= 1 and r["s_per_image"] > 0 for r in rows)
    assert all(r["fd_oracle_features"] >= 0 for r in rows)
    bf16 = [r for r in rows if r["precision"] == "bf16"]
    assert all(0 < r["mean_abs_diff_to_first_precision"] < 0.5 for r in bf16)     # same noise: close, not equal
    table = [line for line in proc.stdout.splitlines() if line.startswith("| DDPM-10") or line.startswith("| DPMPP2M-5")]
    assert len(table) == len(rows)
    # a guide of another attribute: the oracle judges that attribute too, in the rows and the table's header
    guide = torch.load(out / "classifier_best.pth", weights_only=True)
    k = guide["attr_names"].index("Eyeglasses")
    guide["attribute"], guide["attribute_index"], guide["config"]["target_index"] = "Eyeglasses", k, k
    torch.save(guide, tmp_path / "eyeglasses.pth")
    proc = run("benchmarks/sampling.py", "--run_dir", out, "--device", "cpu", "--configs", "ddim:4", "--scales", 5,
               "--num_samples", 3, "--targets", 1, "--classifier_model", tmp_path / "eyeglasses.pth")
    assert_ok(proc)
    assert "oracle: Eyeglasses rate" in proc.stdout and "Smiling" not in proc.stdout


def test_sampling_benchmark_variants_are_their_formulas():
    """--order shift_then_clip: x0_hat = clip(predict_x0(eps - sqrt(1 - abar) g)), eps recomputed from it;
    --normalize: each sample's guidance has root mean square s."""
    spec = importlib.util.spec_from_file_location("sampling_bench", os.path.join(ROOT, "benchmarks", "sampling.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    d = bench.ShiftThenClip()
    x_t, t, eps, g = torch.randn(2, 3, 4, 4), torch.tensor([900, 100]), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    net = lambda x, tt: eps                                                      # noqa: E731
    eps_hat, x0 = d.guided_eps_x0(net, x_t, t, lambda x, tt: 3 * g)
    want = d.predict_x0(x_t, t, eps - (1 - d.alpha_bar(t)).sqrt().float() * 3 * g).clamp(-1, 1)
    assert torch.allclose(x0, want, atol=1e-5) and x0.abs().max() <= 1
    assert torch.allclose(eps_hat, d.predict_eps(x_t, t, want), atol=1e-4)
    guide = NoisyClassifier(ClassifierConfig(image_size=8, base_channels=8, channel_mult=(1, 2), num_outputs=3,
                                             target_index=1))
    cond = bench.normalized_cond_fn(guide, 1, 0.25)(torch.randn(2, 3, 8, 8), torch.tensor([10, 500]))
    assert torch.allclose(cond.flatten(1).square().mean(1).sqrt(), torch.full((2,), 0.25), atol=1e-5)


def test_sampling_benchmark_rejects_bad_input(toy_run, tmp_path, capsys, monkeypatch):
    out, _ = toy_run

    def bad(*args):
        return run_here("benchmarks/sampling.py", "--device", "cpu", *args, cwd=tmp_path, capsys=capsys,
                        monkeypatch=monkeypatch)

    assert_user_error(bad("--run_dir", out, "--configs", "ddpm-10"), "--configs", "ddpm:100")
    assert_user_error(bad("--run_dir", out, "--configs", "euler:10"), "--configs", "dpmpp2m")
    assert_user_error(bad("--run_dir", tmp_path), "diffusion_final.pth")
    assert_user_error(bad("--run_dir", tmp_path / "nowhere"), "--run_dir", "not a folder")
    assert_user_error(bad("--run_dir", out, "--scales", 10, "inf"), "--scales must be >= 0, got inf")
    assert_user_error(bad("--run_dir", out, "--fd_samples", -1), "--fd_samples must be >= 0")
    assert_user_error(bad("--run_dir", out, "--json", tmp_path), "--json", "is a folder")


def test_stage_device_site(tmp_path):
    """Copies diffusers and what it needs beyond requirements.txt (never torch, never bytecode), and the
    packages import from there. It replaces only a folder it made. Without diffusers (CI) it says what to install."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (tmp_path / "link").symlink_to(mine)
    for taken in (mine, tmp_path / "link", mine / "notes.txt"):          # checked before anything else
        assert_user_error(run("benchmarks/stage_device_site.py", "--out", taken), "not made by this script")
    assert (mine / "notes.txt").read_text() == "keep"
    out = tmp_path / "site"
    proc = run("benchmarks/stage_device_site.py", "--out", out)
    if not HAVE_DIFFUSERS:
        assert_user_error(proc, INSTALL_HINT)
        return
    assert_ok(proc)
    mib = float(re.search(r": ([\d.]+) MiB", proc.stdout).group(1))                # it must travel with the tree
    assert 0 < mib < 64 and sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2 ** 20 == \
        pytest.approx(mib, abs=0.1)
    staged = {p.name for p in out.iterdir()}
    assert {"diffusers", "huggingface_hub", "safetensors"} <= staged
    assert not staged & {"torch", "numpy", "PIL", "hf_xet"} and not list(out.rglob("__pycache__"))
    assert any(name.startswith("diffusers-") and name.endswith(".dist-info") for name in staged)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from diffusers import UNet2DModel; "
            "import diffusers, huggingface_hub, safetensors, yaml; "
            "print(*(m.__file__ for m in (diffusers, huggingface_hub, safetensors, yaml)))")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert_ok(proc)
    assert all(f.startswith(str(out)) for f in proc.stdout.split()), proc.stdout
    assert_ok(run("benchmarks/stage_device_site.py", "--out", out))            # its own folder: replaced
