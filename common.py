"""Shared plumbing: one-line user errors, atomic writes, self-describing checkpoints, precision, image grids."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import sys
import tempfile
from dataclasses import asdict
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

CHECKPOINT_FORMAT = "guidedemotion"
CHECKPOINT_VERSION = 3


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's ``main``; a ``UserError`` becomes ``error: <message>`` on stderr and exit 2."""
    try:
        rc = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(rc or 0)


def resolve_device(name: str, doing: str = "running") -> torch.device:
    """The --device flag as a torch.device; CUDA on a machine without it falls back to the CPU with a warning."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: this tool runs on cpu, cuda, cuda:N or mps; pick one of those")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"warning: CUDA is not available, {doing} on the CPU (slow); pass --device cpu to silence this")
        return torch.device("cpu")
    if device.type == "cuda" and device.index is not None and device.index >= (n := torch.cuda.device_count()):
        raise UserError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}; pick one")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps is not available on this machine; use --device cpu")
    return device


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    """A flag's number, or each in a list, must be finite and > 0 (or >= 0): a NaN or inf passes every comparison."""
    for v in value if isinstance(value, list) else [value]:
        if v is not None and ((isinstance(v, float) and not math.isfinite(v)) or v < 0 or (v == 0 and not allow_zero)):
            bound = ">= 0" if allow_zero else "> 0"
            raise UserError(f"{name} must be {bound}, got {v}; pass a value {bound}")


def check_scales(name: str, scales) -> None:
    """Guidance scales: finite, >= 0, each given once (a repeated scale would run twice and be reported once)."""
    check_positive(name, scales, allow_zero=True)
    if isinstance(scales, list) and len({f"{s + 0.0:g}" for s in scales}) < len(scales):       # -0.0 + 0.0 is 0.0
        raise UserError(f"{name} {' '.join(f'{s:g}' for s in scales)} repeats a scale; give each once")


MAX_SEED = 2 ** 32 - 104730   # NumPy seeds are < 2^32 and train.py's largest per-stage offset is 104729


def check_seed(value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"--seed must be an integer in [0, {MAX_SEED}], got {value}; pass e.g. 0")


def refuse_folder(path: str, flag: str) -> None:
    """A file a run will write must not be an existing folder (checked before the work, without writing)."""
    if os.path.isdir(path):
        raise UserError(f"{flag} '{path}' is a folder; give a file name (in it or elsewhere)")


def check_output_file(path: str | None, flag: str) -> None:
    """A file a run writes when it ends (e.g. --json): refuse a folder or an unwritable place before the work."""
    if path is not None:
        refuse_folder(path, flag)
        ensure_writable_dir(os.path.dirname(os.path.abspath(path)), f"{flag} folder")


def ensure_writable_dir(path: str, what: str = "output folder") -> str:
    """Create ``path`` if needed and prove we can write there (before any long work starts)."""
    path = path or "."
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {what} '{path}' ({e.strerror or e}); choose a writable folder") from None
    return path


UMASK = os.umask(0o022)
os.umask(UMASK)                                                # read the process's umask (os.umask sets it)


def atomic_save(obj: Any, path: str, fix: str = "free disk space, or choose a shorter name or another folder") -> None:
    """Write ``obj`` to a temporary file beside ``path``, fsync, then ``os.replace``, so a crash or a kill at any
    moment leaves the previous file intact; the file gets 0o666 less the umask, not mkstemp's private 0o600. By kind:
    a PIL image (format from the extension), a NumPy array (.npy), text (``to_json``), else ``torch.save``. A failed
    write (a full disk, a name too long) is a ``UserError`` that ends with ``fix``."""
    tmp = None
    try:               # a short temporary name: any name the file system takes for ``path`` fits
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if isinstance(obj, Image.Image):
                obj.save(f, format=Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG"))
            elif isinstance(obj, np.ndarray):
                np.save(f, obj, allow_pickle=False)
            elif isinstance(obj, str):
                f.write(obj.encode("utf-8"))
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(f"could not write {path} ({e.strerror or e}); the previous file, if any, is unchanged: "
                            f"{fix}") from None
        raise


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=lambda o: o.tolist()) + "\n"          # tensors and NumPy scalars too


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and builtins, so ``torch.load(weights_only=True)`` reads them.

def make_checkpoint(kind: str, config, model_state: dict, **fields) -> dict:
    assert kind in ("diffusion", "classifier", "oracle", "train_state"), kind
    return {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "kind": kind, "config": asdict(config),
            "model": model_state, **fields}


def load_checkpoint(path: str, kind: str | None = None, flag: str = "checkpoint") -> dict:
    """Load one of our checkpoints with ``weights_only=True`` (nothing in it runs); a bad file is a ``UserError``."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} '{path}' not found; train one with train.py or pass the right path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if found := [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]:   # names code to run: refused
            raise UserError(f"{flag} '{path}' was refused by the safe loader (weights_only=True): "
                            f"{found[0][:160]} — it may run code on load; use only checkpoints written by "
                            f"this project's train.py") from None
        raise UserError(f"{flag} '{path}' is corrupt or not a checkpoint (unreadable pickle); "
                        f"re-save it or use an earlier checkpoint") from None
    except Exception as e:     # whatever else an unreadable file raises inside the unpickler
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{flag} '{path}' is corrupt or truncated ({msg[:160]}); "
                        f"re-save it or use an earlier checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{flag} '{path}' is not a GuidedEmotion checkpoint; "
                        f"pass a file written by this project's train.py")
    if (version := ckpt.get("format_version")) != CHECKPOINT_VERSION:
        raise UserError(f"{flag} '{path}' has checkpoint format version {version}, this code reads "
                        f"version {CHECKPOINT_VERSION}; retrain, or use the release that wrote it")
    if kind is not None and ckpt.get("kind") != kind:
        raise UserError(f"{flag} '{path}' is a {ckpt.get('kind')} checkpoint, expected a {kind} "
                        f"checkpoint; check which file you passed to {flag}")
    return ckpt


def memory_format_for(device: torch.device) -> torch.memory_format:
    """The networks' and batches' layout: channels_last on CUDA (cuDNN's native one), NCHW elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PRECISION_HELP = ("autocast dtype: auto is bf16 on GPUs with native bf16 (Ampere and later) and on CPUs with AMX, fp16 "
                  "on older GPUs (T4, V100; training adds a gradient scaler), fp32 elsewhere")


def amp_dtype(device: torch.device, precision: str = "auto"):
    """The autocast dtype that --precision names on ``device``, or None for fp32."""
    if precision == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if precision == "auto":
        # AMX multiplies bf16 tiles in hardware; with AVX512-BF16 alone, bf16 trains slower than fp32 (docs/results.md)
        return torch.bfloat16 if device.type == "cpu" and torch.cpu._is_amx_tile_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, dtype) -> torch.autocast:
    """Autocast to ``dtype`` (from ``amp_dtype``) on ``device``; None runs in fp32."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# ----------------------------------------------------------------------------------------------
# Command lines: argparse errors as one line, exit 2

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...; see --help``), exit status 2, and which takes no abbreviated
    flags (``--n`` is not ``--num_samples``)."""

    def __init__(self, description: str | None = None, **kwargs):     # --help: the docstring's first paragraph
        description = description and " ".join(description.split("\n\n")[0].split())
        super().__init__(description=description, allow_abbrev=False, **kwargs)

    def error(self, message):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)

    def given(self, argv: list | None = None) -> set:
        """The dests of the flags written on the command line. argparse fills a default only into a dest the
        namespace lacks, so a namespace pre-filled with a marker keeps it wherever no flag was given."""
        unset = object()
        namespace = argparse.Namespace(**dict.fromkeys(vars(self.parse_args([])), unset))
        return {k for k, v in vars(self.parse_args(argv, namespace=namespace)).items() if v is not unset}


# ----------------------------------------------------------------------------------------------
# Images: [-1, 1] tensors to uint8 pictures and grids

def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) float in [-1, 1] -> (B,H,W,3) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid_image(tiles: np.ndarray, nrow: int, pad: int = 2, min_tile: int = 64) -> Image.Image:
    """Tile (N,H,W,3) uint8 images ``nrow`` to a row, with white padding; small tiles are enlarged
    (nearest neighbour, integer factor) to at least ``min_tile`` pixels so a 32x32 sample is visible."""
    n, h, w, _ = tiles.shape
    k = max(1, -(-min_tile // h))
    H, W = h * k + pad, w * k + pad                                         # a tile and its padding
    canvas = np.full((-(-n // nrow) * H + pad, nrow * W + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        y, x = pad + i // nrow * H, pad + i % nrow * W
        canvas[y:y + H - pad, x:x + W - pad] = tile.repeat(k, 0).repeat(k, 1)
    return Image.fromarray(canvas)
