"""Shared by the tests: a tiny fake CelebA folder, and running the scripts as a user would."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from common import run_main
from dataset import CELEBA_ATTRIBUTES

N_FAKE = 40  # fake CelebA images; split codes follow i % 5 -> 0, 0, 0, 1, 2: 24 train, 8 valid, 8 test


def make_celeba(root, layout="official", n=N_FAKE):
    """Write a tiny fake CelebA: n JPEGs of 178x218 plus both annotation files, in ``layout``:
    "official" (<root>/celeba/...), "flat" (the official files directly in <root>) or "kaggle".
    Returns (image folder, file names, labels int (n, 40) in -1/1)."""
    rng = np.random.default_rng(123)
    base = os.path.join(root, "celeba") if layout == "official" else str(root)
    img_dir = os.path.join(base, "img_align_celeba", *(["img_align_celeba"] if layout == "kaggle" else []))
    os.makedirs(img_dir)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    labels = rng.choice([-1, 1], size=(n, 40))
    parts = [(0, 0, 0, 1, 2)[i % 5] for i in range(n)]
    yy, xx = np.mgrid[0:218, 0:178]
    for i, name in enumerate(names):  # smooth random colours plus noise, so each image differs
        c = rng.uniform(0, 255, size=(3, 3))
        img = c[0] + np.outer(yy.ravel() / 218, c[1] - c[0]).reshape(218, 178, 3) \
            + np.outer(xx.ravel() / 178, c[2] - c[0]).reshape(218, 178, 3) / 2
        img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(img_dir, name), quality=90)
    header = list(CELEBA_ATTRIBUTES)
    if layout == "kaggle":
        with open(os.path.join(base, "list_attr_celeba.csv"), "w") as f:
            f.write(",".join(["image_id"] + header) + "\n")
            f.writelines(",".join([nm] + [str(v) for v in row]) + "\n" for nm, row in zip(names, labels))
        with open(os.path.join(base, "list_eval_partition.csv"), "w") as f:
            f.write("image_id,partition\n")
            f.writelines(f"{nm},{p}\n" for nm, p in zip(names, parts))
    else:  # the official text format: a count, the names, then values aligned with 1 or 2 spaces
        with open(os.path.join(base, "list_attr_celeba.txt"), "w") as f:
            f.write(f"{n}\n" + " ".join(header) + " \n")
            f.writelines(nm + "".join(f" {v:>2}" for v in row) + "\n" for nm, row in zip(names, labels))
        with open(os.path.join(base, "list_eval_partition.txt"), "w") as f:
            f.writelines(f"{nm} {p}\n" for nm, p in zip(names, parts))
    return img_dir, names, labels


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image_size", "16", "--channel_mult", "1,2", "--attn_resolutions", "8", "--base_channels", "16",
        "--num_res_blocks", "1", "--classifier_channels", "16", "--batch_size", "16",
        "--device", "cpu", "--timesteps", "100", "--warmup_steps", "5"]
SEED_OUTPUTS = ("classifier_best.pth", "diffusion_final.pth")


def run(script, *args, cwd=None, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_here(script, *args, cwd, capsys, monkeypatch):
    """Run a script's main() in this process (no interpreter start-up: fast enough for every bad input);
    returns an object shaped like CompletedProcess. Uncaught exceptions propagate and fail the test."""
    import importlib
    import importlib.util
    if "/" in script:               # a benchmark script: load it from its file, its folder first on sys.path as
        path = os.path.join(ROOT, script)                  # `python benchmarks/x.py` would have it
        monkeypatch.syspath_prepend(os.path.dirname(path))
        spec = importlib.util.spec_from_file_location(script[:-3].replace("/", "_"), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(script[:-3])
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    capsys.readouterr()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}   # train.py installs its own
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_main(module.main)
    finally:                            # so pytest's Ctrl-C (and device_check.sh's SIGINT) still stop the session
        for s, handler in handlers.items():
            signal.signal(s, handler)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_info.value.code, out, err)


def assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def assert_user_error(proc, *fragments):
    """Exit 2, one line on stderr naming the problem, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for frag in fragments:
        assert frag.lower() in lines[0].lower(), (frag, lines[0])


def snapshot(folder):
    """{relative path: bytes} of every file, to prove that nothing was overwritten."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out
