"""The benchmarks run end to end at tiny sizes on the CPU and print their tables; no timing is asserted."""
import importlib.util
import json
import os
import subprocess
import sys

from fakes import ROOT, assert_ok, assert_user_error, run, run_here

HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
TINY_UNET = ["--device", "cpu", "--precision", "fp32", "--image_size", "16", "--base_channels", "16",
             "--channel_mult", "1,2", "--attn_resolutions", "8", "--num_res_blocks", "1", "--batch_size", "8",
             "--steps", "2", "--repeats", "1"]
INSTALL_HINT = "pip install -r benchmarks/requirements.txt"


def table(stdout: str) -> tuple:
    """The markdown table in ``stdout`` -> (header cells, {first cell: row cells})."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("|")]
    assert len(rows) >= 3 and set(rows[1][0]) <= set("-:"), stdout
    return rows[0], {r[0]: r for r in rows[2:]}


def check_train_throughput_table(stdout: str, with_diffusers: bool) -> None:
    header, rows = table(stdout)
    assert header == ["model", "parameters", "fwd GFLOP/image", "images/s (median)", "ms/step", "MFU"]
    ours = rows["ours: UNet"]
    assert int(ours[1].replace(",", "")) > 0 and float(ours[2]) > 0 and float(ours[3]) > 0
    ips = float(ours[3])                                  # both printed to 0.1: allow for that rounding
    assert abs(float(ours[4]) - 8e3 / ips) < 0.05 + 0.05 * 8e3 / (ips - 0.05) ** 2 + 1e-6     # ms/step, batch 8
    if not with_diffusers:
        assert list(rows) == ["ours: UNet"]
        return
    theirs = rows["diffusers: UNet2DModel"]
    assert int(theirs[1].replace(",", "")) > 0 and float(theirs[3]) > 0
    ratio = [float(v) for v in rows["ratio ours/diffusers"][1:5]]     # params, FLOPs, images/s, ms/step
    assert abs(ratio[0] - 1) <= 0.10 and abs(ratio[1] - 1) <= 0.10    # the same architecture
    assert ratio[2] > 0 and abs(ratio[2] * ratio[3] - 1) < 0.01


def check_breakdown(breakdown: str, result: dict, models: list) -> None:
    """Every kind of op has a row, the kinds and "other" add up to the profiled step, per model."""
    header, rows = table(breakdown)
    assert header == ["kind of op"] + [f"{m} {c}" for m in models for c in ("ms", "share")]
    kinds = ["convolution", "matmul and attention", "GroupNorm and SiLU", "dropout", "optimizer and clipping"]
    assert list(rows) == kinds + ["other", "step"]
    assert list(result["breakdown_ms_per_step"]) == models
    for model in models:
        ms = result["breakdown_ms_per_step"][model]
        assert ms["convolution"] > 0 and ms["matmul and attention"] > 0 and ms["optimizer and clipping"] > 0
        assert abs(sum(ms[k] for k in kinds + ["other"]) - ms["step"]) < 1e-6 * ms["step"]
    assert all(rows["step"][i] == "100.0%" for i in range(2, 2 * len(models) + 1, 2))
    assert "convolution rate, at most" in breakdown and "GFLOP/s" in breakdown
    assert ("conv-bound ceiling" in breakdown) == ("diffusers" in models)
    if "diffusers" in models:
        assert float(breakdown.split("ours would run at ")[1].split("x")[0]) > 0


def test_train_throughput(tmp_path):
    """With diffusers (benchmarks/requirements.txt): both networks side by side. Without (CI): ours alone."""
    out = tmp_path / "train_throughput.json"
    proc = run("benchmarks/train_throughput.py", *TINY_UNET, "--warmup", "1", "--breakdown", "--breakdown_steps", "2",
               "--json", out)
    assert_ok(proc)
    main_table, breakdown = proc.stdout.split("where a step goes")
    check_train_throughput_table(main_table, HAVE_DIFFUSERS)
    result = json.loads(out.read_text())
    models = ["ours", "diffusers"] if HAVE_DIFFUSERS else ["ours"]
    assert list(result["images_per_s"]) == models and len(result["images_per_s"]["ours"]) == 1
    check_breakdown(breakdown, result, models)
    if HAVE_DIFFUSERS:
        assert "same function: not checked, the two differ" in proc.stdout      # TINY_UNET: groups 16 and 32
        assert result["params"]["ours"] == result["params"]["diffusers"]
    else:
        assert f"diffusers is not installed, so ours is timed alone; {INSTALL_HINT}" in proc.stdout
        assert result["ratio_ours_over_diffusers"] == {}


def test_train_throughput_in_either_layout(tmp_path):
    out = tmp_path / "contiguous.json"
    proc = run("benchmarks/train_throughput.py", *TINY_UNET, "--warmup", "0", "--memory_format", "channels_last",
               "--json", out)
    assert_ok(proc)
    assert ", channels_last, compile off" in proc.stdout
    assert json.loads(out.read_text())["args"]["memory_format"] == "channels_last"
    assert_user_error(run("benchmarks/train_throughput.py", "--memory_format", "nhwc"), "--memory_format")


def test_train_throughput_breakdown_needs_the_timing():
    proc = run("benchmarks/train_throughput.py", "--device", "cpu", "--count_only", "--breakdown")
    assert_user_error(proc, "--breakdown profiles training steps, which --count_only skips")


def test_train_throughput_without_diffusers(tmp_path):
    """Where diffusers is installed, hide it: ours is still counted (and timed), and a note says what to install."""
    out = tmp_path / "alone.json"
    code = ("import runpy, sys; sys.modules['diffusers'] = None; "
            f"sys.argv = ['train_throughput.py', '--device', 'cpu', '--count_only', '--json', {str(out)!r}]; "
            f"runpy.run_path({os.path.join(ROOT, 'benchmarks', 'train_throughput.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert_ok(proc)
    assert f"note: diffusers is not installed, so ours is timed alone; {INSTALL_HINT}" in proc.stdout
    assert "same function:" not in proc.stdout
    _, rows = table(proc.stdout)
    assert list(rows) == ["ours: UNet"] and rows["ours: UNet"][1] == "35,746,307"       # the default model
    assert json.loads(out.read_text())["params"] == {"ours": 35746307}


def test_train_throughput_counts_the_transposed_upsampling_and_checks_the_twin():
    """At 64x64 the CPU runs our 32 -> 64 upsampling as a transposed conv: the count shows it and says why.
    With one GroupNorm group count and one head dim, the diffusers twin computes the same function: our
    weights, copied in by name, give the same outputs (through that transposed conv, too)."""
    proc = run("benchmarks/train_throughput.py", "--device", "cpu", "--image_size", "64", "--base_channels", "32",
               "--channel_mult", "1,2", "--attn_resolutions", "32", "--num_res_blocks", "1", "--count_only")
    assert_ok(proc)
    assert "1 upsampling conv(s) as a transposed conv on the CPU" in proc.stdout
    if not HAVE_DIFFUSERS:
        return
    difference = float(proc.stdout.split("give outputs equal within ")[1].split()[0])
    assert difference < 1e-5
    params, flops = (float(v) for v in table(proc.stdout)[1]["ratio ours/diffusers"][1:3])
    assert params == 1.0 and 0.9 < flops < 1.0


def test_layer_paths():
    proc = run("benchmarks/layer_paths.py", "--device", "cpu", "--batch_size", "1", "--iters", "1", "--repeats", "1")
    assert_ok(proc)
    header, _ = table(proc.stdout)
    assert header == ["layer", "size", "path A", "path B", "A ms", "B ms", "A / B"]
    body = [[c.strip() for c in line.strip().strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("|")][2:]                        # table() keys rows by layer; upsample has three
    assert [r[0] for r in body] == ["attention", "upsample", "upsample", "upsample", "dropout"]
    assert all(float(v) > 0 for r in body for v in r[4:7])
    assert_user_error(run("benchmarks/layer_paths.py", "--iters", "0"), "--iters must be > 0")


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
    assert_user_error(proc, "--n_images", "--batch_size")


def test_counterfactuals_benchmark_with_toyfaces_ground_truth(toy_run, tmp_path):
    out, _ = toy_run
    proc = run("benchmarks/counterfactuals.py", "--run_dir", out, "--device", "cpu", "--n", 3, "--strengths", 0.3,
               "--scales", 5, 20, "--steps", 10, "--targets", 1, "--localize", "--seed", 3,
               "--json", tmp_path / "cf.json")
    assert_ok(proc)
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("|")]
    assert rows[0] == ["target", "strength", "scale", "flip rate (oracle)", "flip rate (guide)", "MNAC",
                       "L1 mean ± std", "L1 to truth", "mask area"]
    truth, *edits = rows[2:]
    assert truth[:3] == ["Smiling=1", "truth", "-"] and truth[7] == "0.000"     # the truth is its own truth
    assert [r[2] for r in edits] == ["5", "20"] and all(float(r[7]) > 0 for r in edits)
    report = json.loads((tmp_path / "cf.json").read_text())
    assert report["args"]["seed"] == 3
    result = report["rows"]
    assert [r["strength"] for r in result] == ["truth", 0.3, 0.3]
    assert all(0 <= r["mask_area"] <= 1 for r in result[1:]) and result[0]["n"] == 3


def test_sampling_benchmark(toy_run, tmp_path):
    """Every config row, the per-step guided/unguided timing, and the oracle rates are fractions."""
    out, _ = toy_run
    proc = run("benchmarks/sampling.py", "--run_dir", out, "--device", "cpu", "--configs", "ddpm:10", "ddim:5",
               "--num_samples", 2, "--batch_size", 2, "--step_repeats", 2, "--json", tmp_path / "s.json")
    assert_ok(proc)
    header, rows = table(proc.stdout)
    assert header[:4] == ["sampler", "s/image guided", "s/image unguided", "guided/unguided time"]
    assert list(rows) == ["DDPM-10", "DDIM-5"]
    assert rows["DDPM-10"][4] == "1.0x" and float(rows["DDIM-5"][4].rstrip("x")) > 0     # speed-up vs the first
    assert all(0 <= float(c.rstrip("%")) <= 100 for r in rows.values() for c in r[5:8])
    assert "guided/unguided" in proc.stdout and "interleaved pairs" in proc.stdout
    result = json.loads((tmp_path / "s.json").read_text())
    step = result["step"]
    assert step["repeats"] == 2 and step["guided_s"] > 0 and step["unguided_s"] > 0 and step["ratio"] > 0
    assert 0 <= result["base_rate"] <= 1 and len(result["rows"]) == 2


def test_sampling_and_counterfactual_benchmarks_reject_bad_input(toy_run, tmp_path, capsys, monkeypatch):
    out, _ = toy_run

    def bad(script, *args):
        return run_here(script, "--device", "cpu", *args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)

    assert_user_error(bad("benchmarks/sampling.py", "--run_dir", out, "--configs", "ddpm-10"), "--configs", "ddpm:1000")
    assert_user_error(bad("benchmarks/sampling.py", "--run_dir", out, "--configs", "ddpm:5000"), "ddpm:5000",
                      "at most 100")
    assert_user_error(bad("benchmarks/sampling.py", "--run_dir", tmp_path), "diffusion_final.pth")
    assert_user_error(bad("benchmarks/counterfactuals.py", "--run_dir", out, "--strengths", 1.5), "--strengths", "[0, 1]")
    assert_user_error(bad("benchmarks/counterfactuals.py", "--run_dir", out, "--targets", 2), "--targets")
    assert_user_error(bad("benchmarks/counterfactuals.py", "--run_dir", out, "--mask_threshold", "nan"),
                      "--mask_threshold must be in [0, 1)")
    assert_user_error(bad("benchmarks/counterfactuals.py", "--run_dir", out, "--scales", 10, "inf"),
                      "--scales must be >= 0, got inf")
    assert_user_error(bad("benchmarks/counterfactuals.py", "--run_dir", out, "--resample", 0), "--resample must be > 0")
    assert_user_error(bad("benchmarks/counterfactuals.py", "--run_dir", out, "--invert"), "--invert", "--sampler ddim")
    assert_user_error(bad("benchmarks/counterfactuals.py", "--run_dir", out, "--preserve", -1), "--preserve must be >= 0")
    assert_user_error(bad("benchmarks/counterfactuals.py", "--run_dir", out, "--preserve", 0.1),
                      "--preserve needs a guide that knows every attribute")
    (tmp_path / "afile").write_text("x")
    assert_user_error(bad("benchmarks/sampling.py", "--run_dir", out, "--json", tmp_path), "--json", "is a folder")
    assert_user_error(bad("benchmarks/counterfactuals.py", "--run_dir", out, "--json", tmp_path / "afile" / "r.json"),
                      "cannot write", "afile")
    assert_user_error(bad("benchmarks/train_throughput.py", "--json", tmp_path / "afile" / "r.json"),
                      "cannot write", "afile")
    assert_user_error(bad("benchmarks/train_throughput.py", "--attn_resolutions", "12", "--count_only"),
                      "--attn_resolutions 12 is not a feature-map side", "64, 32, 16, 8")


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
