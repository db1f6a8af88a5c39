"""Face data with binary attributes: CelebA, and "toyfaces", procedural cartoon faces for the demo.

A split is decoded once into uint8 ``images`` (N, 3, S, S) and ``attrs`` (N, A) in {0, 1}; with ``cache_dir`` the
decoded split is saved as a ``.npy`` that later runs memory-map. Networks see ``to_float(images)`` in [-1, 1].

Preprocessing (``preprocess_pil``), the same for CelebA, toyfaces and any user image: the centre square of side
min(w, h) -- 178x178 for the aligned 178x218 CelebA images, dropping 20 rows at the top and 20 at the bottom --
resized to S x S with PIL's LANCZOS filter (antialiased), RGB; transparent images are composited on white.

CelebA (Liu et al. 2015, https://arxiv.org/abs/1411.7766): 202,599 aligned faces, 40 attributes (-1/1 in the files,
0/1 here), official split 162,770 / 19,867 / 19,962. Two folder layouts are read:
  official / torchvision: <root>/celeba/{img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt},
                          or the same three directly in <root>
  Kaggle:                 <root>/{img_align_celeba/img_align_celeba/, list_attr_celeba.csv, list_eval_partition.csv}

toyfaces: cartoon faces drawn with PIL, no download. Five CelebA attributes, each an independent coin flip with one
clear, local visual effect (see ``draw_toyface``). Image i of a split is drawn from ``np.random.default_rng((seed,
split_code, i))``, so it does not depend on how many images are made or by how many workers.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import sys
import warnings
import zlib
from dataclasses import dataclass
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

from common import UserError, atomic_save, ensure_writable_dir, to_json

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male "
    "Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()
assert len(CELEBA_ATTRIBUTES) == 40
TOYFACES_ATTRIBUTES = ["Smiling", "Eyeglasses", "Bangs", "Mouth_Slightly_Open", "Goatee"]
TOYFACES_PRIORS = [0.5, 0.3, 0.35, 0.4, 0.3]  # P(attribute = 1), in TOYFACES_ATTRIBUTES order
TOYFACES_SPLIT_SIZES = {"train": 20_000, "valid": 2_000, "test": 2_000}
DATASETS = ("celeba", "toyfaces")
SPLITS = ("train", "valid", "test")  # split codes 0, 1, 2, as in list_eval_partition.txt
MAX_UNREADABLE = 0.01  # more unreadable images than this fraction of a split is an error
CACHE_VERSION = 2  # bump when decoding or the toyface drawing changes, so old caches are not reused

CELEBA_LAYOUTS = ("expected <root>/celeba/{img_align_celeba/,list_attr_celeba.txt,list_eval_partition.txt} "
                  "(official/torchvision) or <root>/{img_align_celeba/img_align_celeba/,list_attr_celeba.csv,"
                  "list_eval_partition.csv} (Kaggle)")


class DataError(UserError):
    """A problem with the data the user pointed us to; the message says how to fix it."""


def attribute_names(dataset: str) -> list[str]:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset '{dataset}'; choose one of: {', '.join(DATASETS)}")
    return list(CELEBA_ATTRIBUTES if dataset == "celeba" else TOYFACES_ATTRIBUTES)


def attribute_index(dataset: str, attribute: str) -> int:
    """Column of ``attribute`` in ``attrs``; an unknown name suggests the closest valid one."""
    names = attribute_names(dataset)
    if attribute in names:
        return names.index(attribute)
    close = difflib.get_close_matches(attribute, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    raise DataError(f"unknown attribute '{attribute}' for {dataset}{hint} (valid: {', '.join(names)})")


@dataclass(eq=False, repr=False)
class ImageSplit(torch.utils.data.Dataset):
    """A decoded split; items are (float32 (3, S, S) in [-1, 1], uint8 (A,))."""
    images: torch.Tensor  # uint8 (N, 3, S, S), contiguous, possibly memory-mapped from the cache
    attrs: torch.Tensor  # uint8 (N, A) in {0, 1}
    attr_names: list[str]
    names: list[str]  # image file names (celeba) or "toyface_000123" ids, len N
    split: str  # "train" | "valid" | "test"
    n_original: int  # size of the whole split before subsetting
    n_skipped: int  # unreadable images dropped

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i) -> tuple[torch.Tensor, torch.Tensor]:
        return to_float(self.images[i]), self.attrs[i]


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], any leading shape, on the input's device."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images_uint8.dtype}")
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of a (B, C, H, W) batch left-right with probability 1/2."""
    device = generator.device if generator is not None else x.device
    flip = torch.rand(x.shape[0], generator=generator, device=device) < 0.5  # (B,)
    flip = flip.to(x.device).view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def preprocess_pil(img: Image.Image, image_size: int) -> np.ndarray:
    """The one crop + resize used everywhere (see the module docstring): any PIL image -> uint8 (S, S, 3)."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS, box=(left, top, left + s, top + s))
    return np.array(img, dtype=np.uint8)  # a writable copy


def _decode_file(job: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    """(path, S) -> (uint8 (3, S, S), None), or (None, one-line reason). Truncated JPEGs raise in ``load()`` (we
    leave ``LOAD_TRUNCATED_IMAGES`` off) and any warning while decoding, e.g. corrupt data, is an error too."""
    path, image_size = job
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with Image.open(path) as img:
                img.load()
                ImageOps.exif_transpose(img, in_place=True)  # phone photos: upright as shown
                x = preprocess_pil(img, image_size)
    except Exception as e:  # OSError, SyntaxError, ValueError, warnings, decompression bombs
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        return None, f"{type(e).__name__}: {reason}" if reason else type(e).__name__
    return np.ascontiguousarray(x.transpose(2, 0, 1)), None  # (S, S, 3) -> (3, S, S)


def load_image_file(path: str, image_size: int) -> torch.Tensor:
    """One image file (PNG/JPEG, any size, RGB/RGBA/L) -> uint8 (3, S, S), prepared like the data."""
    if not os.path.isfile(path):
        raise DataError(f"image '{path}' not found; pass the path of a PNG or JPEG file")
    x, reason = _decode_file((path, image_size))
    if x is None:
        raise DataError(f"cannot read image '{path}' ({reason}); pass a valid PNG or JPEG file")
    return torch.from_numpy(x)


def _map(fn, jobs: list, num_workers: int, desc: str, verbose: bool):
    """Yield ``fn(job)`` for each job in order, in a pool of ``num_workers`` processes if > 0."""
    with (Pool(num_workers) if num_workers else contextlib.nullcontext()) as pool:
        chunksize = max(1, min(256, len(jobs) // (8 * max(1, num_workers))))
        results = pool.imap(fn, jobs, chunksize=chunksize) if pool else map(fn, jobs)
        yield from tqdm(results, total=len(jobs), desc=desc, unit="img", disable=not verbose, leave=False)


def _image_array(n: int, image_size: int) -> np.ndarray:
    """uint8 (n, 3, S, S) for a decoded split, or a DataError that says what it would take."""
    try:
        return np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    except MemoryError:
        raise DataError(f"{n:,} images at {image_size}x{image_size} need {n * 3 * image_size ** 2 / 2 ** 30:,.1f} "
                        f"GiB, more memory than this machine gives; lower --image_size or --subset_fraction") from None


def _subset(n: int, fraction: float, seed: int, split: str) -> np.ndarray:
    """Sorted indices of a reproducible random subset of round(n * fraction) (>= 1) of range(n)."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])  # independent per split
    return np.sort(rng.choice(n, size=max(1, round(n * fraction)), replace=False))


# ----------------------------------------------------------------------------------------------
# toyfaces

def draw_toyface(key, size: int, attrs_override: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one cartoon face: -> (uint8 (S, S, 3) image, uint8 (5,) attributes).

    ``key`` seeds ``np.random.default_rng``, e.g. ``(seed, split_code, i)``. The attributes are drawn first, then
    every nuisance number, always the same count, so ``attrs_override`` (e.g. ``{"Smiling": 1}``) redraws the same
    face with only that attribute changed. Drawn at max(4S, 64) pixels, then downsampled by ``preprocess_pil``.
      Smiling              wide U-shaped mouth, corners up (else a short, flat, slightly sad line)
      Mouth_Slightly_Open  a dark opening in the mouth (with Smiling: an open half-moon grin)
      Eyeglasses           two dark rings round the eyes and a bridge
      Bangs                hair fringe over the forehead down to the eyebrows (else bare forehead)
      Goatee               a dark patch on the chin below the mouth
    """
    rng = np.random.default_rng(key)
    a = dict(zip(TOYFACES_ATTRIBUTES, (rng.random(5) < TOYFACES_PRIORS).astype(int)))
    for name, value in (attrs_override or {}).items():
        attribute_index("toyfaces", name)
        a[name] = int(bool(value))
    u = rng.random(24)  # nuisance variables, each uniform in [0, 1)
    D = max(4 * size, 64)
    # geometry in units of the canvas side: head centre, height and width
    cx, cy = 0.5 + 0.08 * (u[0] - 0.5), 0.54 + 0.06 * (u[1] - 0.5)
    h = 0.55 + 0.20 * u[2]
    w, top = h * (0.74 + 0.10 * u[3]), cy - h / 2
    eye_y, eye_dx = cy - h * (0.03 + 0.04 * u[4]), w * (0.19 + 0.05 * u[5])  # eye_dx: half the eyes' distance
    brow_y = eye_y - 0.12 * h
    mouth_y, mouth_w = cy + h * (0.22 + 0.03 * u[6]), w * (0.30 + 0.05 * u[7])  # mouth_w: a smile's half-width
    lw = max(1, round(max(0.045 * h * D, 0.8 * D / size)))  # line width in canvas pixels, >= ~1 px out
    hair_len, hairline = 0.1 + 0.35 * u[20], top + h * (0.07 + 0.05 * u[21])  # hair_len: below the centre, in h
    bg, skin, ears, nose, hair, dark, lips, frame = _toyface_colours(u)

    def px(*v):  # canvas coordinates from fractions
        return [float(t) * D for t in v]

    img = Image.new("RGB", (D, D), bg)
    draw = ImageDraw.Draw(img)
    # hair behind the head, ears, head
    draw.rounded_rectangle(px(cx - 0.56 * w, top - 0.05 * h, cx + 0.56 * w, cy + hair_len * h),
                           radius=0.5 * w * D, fill=hair)
    for side in (-1, 1):
        ex = cx + side * 0.49 * w
        draw.ellipse(px(ex - 0.07 * w, eye_y - 0.04 * h, ex + 0.07 * w, eye_y + 0.13 * h), fill=ears)
    head = px(cx - w / 2, top, cx + w / 2, cy + h / 2)
    draw.ellipse(head, fill=skin)
    # hair on the head = the head minus the face: a bare forehead, or a fringe cut above the brows
    mask = Image.new("L", (D, D), 0)
    mdraw = ImageDraw.Draw(mask)
    mdraw.ellipse(head, fill=255)
    if a["Bangs"]:
        mdraw.rectangle(px(cx - 0.47 * w, brow_y - 0.04 * h, cx + 0.47 * w, 1.0), fill=0)
    else:
        mdraw.ellipse(px(cx - 0.47 * w, hairline, cx + 0.47 * w, hairline + 1.3 * h), fill=0)
    img.paste(hair, (0, 0, D, D), mask)
    _draw_eyes(draw, a, px, cx, eye_y, eye_dx, brow_y, w, lw, 0.01 * h * (u[22] - 0.5), dark, frame)
    ny = (eye_y + mouth_y) / 2 + 0.03 * h  # a hint of a nose
    draw.arc(px(cx - 0.05 * w, ny - 0.04 * h, cx + 0.05 * w, ny + 0.03 * h), 20, 160, fill=nose, width=max(1, lw // 2))
    if a["Goatee"]:  # below the mouth
        draw.ellipse(px(cx - 0.15 * w, mouth_y + 0.11 * h, cx + 0.15 * w, cy + 0.49 * h), fill=dark)
    _draw_mouth(draw, a, px, cx, mouth_y, mouth_w, h, lw, 0.02 * h * u[23], lips)
    return preprocess_pil(img, size), np.array([a[name] for name in TOYFACES_ATTRIBUTES], dtype=np.uint8)


def _toyface_colours(u: np.ndarray) -> list[tuple]:
    """RGB tuples (background, skin, ears, nose, hair, dark, lips, frame) from the nuisance variables: skin between
    light and dark, hair from a palette, background far from the skin."""
    skin = np.array([245, 214, 184]) * (1 - u[8]) + np.array([110, 72, 50]) * u[8] + 20 * (u[9:12] - 0.5)
    palette = np.array([[30, 24, 22], [75, 48, 30], [125, 80, 45], [160, 70, 35], [225, 190, 110], [150, 150, 155]])
    hair = palette[int(u[12] * len(palette))] * (0.8 + 0.4 * u[13])
    if abs(hair.mean() - skin.mean()) < 60:  # keep the hair visible: darker, or lighter on dark skin
        hair = hair * 0.45 if skin.mean() > 100 else 255 - (255 - hair) * 0.45
    dark = 0.45 * np.minimum(hair, skin)  # eyebrows and goatee
    bg = 30 + 200 * u[14:17]
    if np.abs(bg - skin).sum() < 150:
        bg = 255 - bg
    lips = skin * np.array([0.35, 0.15, 0.18]) + np.array([30, 0, 0])
    frame = 20 + 50 * u[17:20]  # glasses: dark frames, or light ones on dark skin
    if skin.mean() < 110:
        frame = 255 - frame
    return [tuple(int(t) for t in np.clip(c, 0, 255))
            for c in (bg, skin, skin * 0.92, skin * 0.75, hair, dark, lips, frame)]


def _draw_eyes(draw, a: dict, px, cx, eye_y, eye_dx, brow_y, w, lw, tilt, dark, frame) -> None:
    """Eyebrows (one end ``tilt`` off level), eyes (dark dots with a white highlight), and glasses if worn."""
    r, g = 0.055 * w, 0.13 * w  # eye and glasses radius
    for side in (-1, 1):
        ex = cx + side * eye_dx
        draw.line(px(ex - 0.09 * w, brow_y + side * tilt, ex + 0.09 * w, brow_y), fill=dark, width=lw)
        draw.ellipse(px(ex - r, eye_y - r, ex + r, eye_y + r), fill=(25, 20, 20))
        draw.ellipse(px(ex + 0.1 * r, eye_y - 0.6 * r, ex + 0.5 * r, eye_y - 0.2 * r), fill=(255,) * 3)
        if a["Eyeglasses"]:
            draw.ellipse(px(ex - g, eye_y - 0.85 * g, ex + g, eye_y + 0.85 * g), outline=frame, width=lw)
            draw.line(px(ex + side * g, eye_y - 0.2 * g, cx + side * 0.5 * w, eye_y - 0.3 * g), fill=frame, width=lw)
    if a["Eyeglasses"]:
        draw.line(px(cx - eye_dx + g, eye_y, cx + eye_dx - g, eye_y), fill=frame, width=lw)


def _draw_mouth(draw, a: dict, px, cx, mouth_y, mouth_w, h, lw, droop, lips) -> None:
    """The toyface mouth: a wide smile or a short flat line, open (dark, with teeth) or closed."""
    mouth_hole, teeth = (45, 12, 18), (240, 240, 235)
    if a["Smiling"]:
        box = px(cx - mouth_w, mouth_y - 0.16 * h, cx + mouth_w, mouth_y + 0.10 * h)
        if a["Mouth_Slightly_Open"]:  # an open grin: dark inside, a row of teeth on top
            draw.chord(box, 0, 180, fill=mouth_hole)
            teeth_y = mouth_y - 0.025 * h
            draw.rectangle(px(cx - 0.8 * mouth_w, teeth_y, cx + 0.8 * mouth_w, teeth_y + 0.04 * h), fill=teeth)
        draw.arc(box, 0, 180, fill=lips, width=round(2.6 * lw))   # thick: visible through noise at 32 px
    elif a["Mouth_Slightly_Open"]:  # an "o" with the upper teeth showing
        box = px(cx - 0.4 * mouth_w, mouth_y - 0.06 * h, cx + 0.4 * mouth_w, mouth_y + 0.09 * h)
        draw.ellipse(box, fill=mouth_hole)
        draw.chord(box, 205, 335, fill=teeth)
        draw.ellipse(box, outline=lips, width=max(1, lw // 2))
    else:  # a short line, its corners ``droop`` below its middle
        mw = 0.5 * mouth_w
        draw.line(px(cx - mw, mouth_y + droop, cx, mouth_y, cx + mw, mouth_y + droop), fill=lips, width=lw,
                  joint="curve")


def _toyface_job(job: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, split_code, i, size = job
    img, attrs = draw_toyface((seed, split_code, i), size)
    return np.ascontiguousarray(img.transpose(2, 0, 1)), attrs  # (3, S, S), (5,)


def toyface_counterfactuals(names: list, split: str, image_size: int, seed: int, attribute: str,
                            value: int) -> np.ndarray:
    """The exact counterfactuals of toyfaces images, which real data lacks: each face of ``names`` ("toyface_000123")
    redrawn with only ``attribute`` set to ``value``. -> uint8 (N, 3, S, S)"""
    keys = [(seed, SPLITS.index(split), int(name.rsplit("_", 1)[1].split(".")[0])) for name in names]
    faces = np.stack([draw_toyface(key, image_size, {attribute: value})[0] for key in keys])   # (N, S, S, 3)
    return np.ascontiguousarray(faces.transpose(0, 3, 1, 2))


def _build_toyfaces(split, image_size, fraction, seed, num_workers, verbose):
    n = TOYFACES_SPLIT_SIZES[split]
    idx = _subset(n, fraction, seed, split)
    jobs = [(seed, SPLITS.index(split), int(i), image_size) for i in idx]
    images = _image_array(len(jobs), image_size)
    attrs = np.empty((len(jobs), len(TOYFACES_ATTRIBUTES)), dtype=np.uint8)
    for k, (img, a) in enumerate(_map(_toyface_job, jobs, num_workers, f"toyfaces {split}", verbose)):
        images[k], attrs[k] = img, a
    return images, attrs, [f"toyface_{i:06d}" for i in idx], n, 0


# ----------------------------------------------------------------------------------------------
# CelebA

def _find_celeba(root: str, download: bool) -> dict:
    """Paths of the attribute file, partition file and image folder under ``root``, either layout."""
    best = {}
    for base in (os.path.join(root, "celeba"), root):
        found = {}
        for key, options in (("attr", ["list_attr_celeba.txt", "list_attr_celeba.csv"]),
                             ("partition", ["list_eval_partition.txt", "list_eval_partition.csv"]),
                             ("images", ["img_align_celeba/img_align_celeba", "img_align_celeba"])):
            for option in options:
                path = os.path.join(base, option)
                if os.path.isdir(path) if key == "images" else os.path.isfile(path):
                    found[key] = path
                    break
        if len(found) == 3:
            return found
        best = max(best, found, key=len)  # the first of the fullest, for the error message
    if download:
        try:
            import torchvision.datasets
            torchvision.datasets.CelebA(root, split="all", target_type="attr", download=True)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise DataError(f"downloading CelebA failed ({reason}); Google Drive often refuses (daily quota): get "
                            f"img_align_celeba.zip, list_attr_celeba.txt and list_eval_partition.txt by hand from "
                            f"https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (or the Kaggle copy "
                            f"'jessicali9530/celeba-dataset'), unzip them into '{os.path.join(root, 'celeba')}' "
                            f"and run again without --download, or use --dataset toyfaces") from None
        return _find_celeba(root, download=False)
    names = {"attr": "list_attr_celeba.txt", "partition": "list_eval_partition.txt", "images": "img_align_celeba/"}
    missing = ", ".join(name for key, name in names.items() if key not in best)
    where = "" if os.path.isdir(root) else " (the folder does not exist)"
    raise DataError(f"CelebA not found under '{root}'{where}: missing {missing}; {CELEBA_LAYOUTS}; "
                    f"or pass --download, or --dataset toyfaces")


def _read_rows(path: str) -> tuple[list[str] | None, list[list[str]]]:
    """A CelebA annotation file -> (column names or None, rows of fields). .txt or Kaggle .csv."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f"'{path}' is not text (byte {e.start} is not UTF-8); download the CelebA annotation "
                        f"files again") from None
    if not lines:
        raise DataError(f"'{path}' is empty; download the CelebA annotation files again")
    if path.endswith(".csv"):
        return lines[0].split(",")[1:], [line.split(",") for line in lines[1:]]
    if os.path.basename(path).startswith("list_attr"):  # line 1: image count, line 2: names
        if len(lines) < 2 or not lines[0].strip().isdigit() or int(lines[0]) != len(lines) - 2:
            raise DataError(f"'{path}' is damaged (line 1 must be the image count, "
                            f"{max(0, len(lines) - 2)} rows follow); download it again")
        return lines[1].split(), [line.split() for line in lines[2:]]
    return None, [line.split() for line in lines]


def _read_celeba(files: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The annotations -> (file names (N,), uint8 (N, 40) in {0, 1} in CELEBA_ATTRIBUTES order, split codes (N,))."""
    path = files["attr"]
    header, rows = _read_rows(path)
    if sorted(header) != sorted(CELEBA_ATTRIBUTES):
        raise DataError(f"'{path}' does not list the 40 CelebA attributes in its header "
                        f"(found {len(header)} names); download the annotation file again")
    if not rows:
        raise DataError(f"'{path}' lists no images; download the annotation file again")
    try:
        values = np.array([row[1:] for row in rows], dtype=np.int8)  # (N, 40) of -1/1
        ok = values.shape == (len(rows), 40) and np.isin(values, (-1, 1)).all()
    except (ValueError, OverflowError):                 # ragged rows, words, numbers beyond int8
        ok = False
    if not ok:                                          # the slow scan runs only to name the first bad row
        bad = next(row for row in rows if len(row) != 41 or any(v not in ("1", "-1") for v in row[1:]))
        what = (f"got {len(bad) - 1} values" if len(bad) != 41 else
                next(f"{header[k]} is '{v}'" for k, v in enumerate(bad[1:]) if v not in ("1", "-1")))
        raise DataError(f"'{path}': bad row for '{bad[0]}' (expected a name and 40 values -1/1; {what}); "
                        f"download the annotation file again")
    names = [row[0] for row in rows]
    attrs = (values[:, [header.index(name) for name in CELEBA_ATTRIBUTES]] > 0).astype(np.uint8)
    path = files["partition"]
    table = {row[0]: row[-1] for row in _read_rows(path)[1]}
    if (missing := next((name for name in names if name not in table), None)) is not None:
        raise DataError(f"'{path}' has no line for {missing}, which list_attr_celeba lists; download both "
                        f"annotation files again")
    if (bad := next((name for name in names if table[name] not in ("0", "1", "2")), None)) is not None:
        raise DataError(f"'{path}' gives {bad} the split '{table[bad]}' (expected 0, 1 or 2); download it again")
    return names, attrs, np.array([int(table[name]) for name in names])


def _build_celeba(files, split, image_size, fraction, seed, num_workers, verbose):
    names, attrs, codes = _read_celeba(files)
    in_split = np.flatnonzero(codes == SPLITS.index(split))
    if (n := len(in_split)) == 0:
        raise DataError(f"'{files['partition']}' puts no image in split '{split}'; download it again")
    idx = in_split[_subset(n, fraction, seed, split)]
    jobs = [(os.path.join(files["images"], names[i]), image_size) for i in idx]
    images = _image_array(len(jobs), image_size)
    ok, bad = np.ones(len(jobs), dtype=bool), []
    for k, (x, reason) in enumerate(_map(_decode_file, jobs, num_workers, f"celeba {split}", verbose)):
        if x is not None:
            images[k] = x
            continue
        ok[k] = False
        bad.append(jobs[k][0])
        if len(bad) > MAX_UNREADABLE * len(jobs):       # too many already: stop decoding, say so once
            raise DataError(f"more than {MAX_UNREADABLE:.0%} of the {len(jobs)} images of celeba {split} are "
                            f"unreadable, e.g. {', '.join(bad[:3])} ({reason}); download or unzip "
                            f"img_align_celeba again")
        tqdm.write(f"warning: skipping unreadable image {jobs[k][0]} ({reason})", file=sys.stderr)
    keep = idx[ok]
    return images[ok], attrs[keep], [names[i] for i in keep], n, len(bad)


# ----------------------------------------------------------------------------------------------
# The cache and the entry point

def _file_sha1(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()
    except OSError as e:
        raise DataError(f"cannot read '{path}' ({e.strerror}); check its permissions, or download it again") from None


def _load_cache(stem: str, key: dict):
    """<stem>.npy and .json -> (images, attrs, names, n_original, n_skipped), or None if there is no valid cache."""
    if not (os.path.isfile(stem + ".npy") and os.path.isfile(stem + ".json")):
        return None
    try:
        with open(stem + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        images = np.load(stem + ".npy", mmap_mode="c")  # copy-on-write: pages are read on demand
        n, S = len(meta["names"]), key["image_size"]
        assert meta["key"] == key and images.shape == (n, 3, S, S) and images.dtype == np.uint8
        attrs = (np.frombuffer("".join(meta["attrs"]).encode(), dtype=np.uint8) - ord("0")).reshape(n, -1)
    except (OSError, EOFError, ValueError, KeyError, TypeError, AssertionError) as e:     # EOFError: an empty .npy
        print(f"warning: ignoring damaged cache {stem}.npy ({type(e).__name__}); rebuilding", file=sys.stderr)
        return None
    return images, attrs, meta["names"], meta["n_original"], meta["n_skipped"]


def _save_cache(stem, key, images, attrs, names, n_original, n_skipped):
    atomic_save(images, stem + ".npy")  # the .json goes last: it marks the cache as complete
    atomic_save(to_json({"key": key, "n_original": n_original, "n_skipped": n_skipped, "names": names,
                         "attrs": [bytes(row + ord("0")).decode() for row in attrs]}), stem + ".json")


def load_split(dataset: str, split: str, image_size: int, data_root: str = "./data",
               subset_fraction: float = 0.5, seed: int = 0, cache_dir: str | None = None,
               download: bool = False, num_workers: int = 0, verbose: bool = True) -> ImageSplit:
    """Decode a random ``subset_fraction`` of one split, or load it from ``cache_dir`` (.npy + .json, named by a hash
    of everything that changes the result; ``None``: no cache). toyfaces ignores ``data_root`` and ``download``;
    ``num_workers`` decoding processes, 0 decodes in this process."""
    attr_names = attribute_names(dataset)
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    if int(image_size) != image_size or image_size < 8:
        raise DataError(f"--image_size must be an integer >= 8, got {image_size}")
    if not 0 < subset_fraction <= 1:
        raise DataError(f"--subset_fraction must be in (0, 1], got {subset_fraction}; "
                        f"pass e.g. 0.5, or 1 for the whole split")
    if int(seed) != seed or seed < 0:
        raise DataError(f"--seed must be an integer >= 0, got {seed}")
    image_size, seed = int(image_size), int(seed)
    if num_workers < 0:
        raise DataError(f"--num_workers must be >= 0, got {num_workers}")

    key = {"dataset": dataset, "split": split, "image_size": image_size,
           "subset_fraction": subset_fraction, "seed": seed, "version": CACHE_VERSION}
    if dataset == "celeba":
        files = _find_celeba(data_root, download)
        # a changed label or split (the annotation files' bytes) is a new key; an image edited in place under its
        # old name is not (docs/reliability.md says so)
        if cache_dir is not None:
            key.update(root=os.path.abspath(data_root), attr_sha1=_file_sha1(files["attr"]),
                       partition_sha1=_file_sha1(files["partition"]))
    else:
        key.update(sizes=TOYFACES_SPLIT_SIZES)

    cached = note = None
    if cache_dir is not None:
        try:
            ensure_writable_dir(cache_dir, "cache folder")
        except UserError:
            raise DataError(f"cannot create or write the cache folder '{cache_dir}'; pass a writable --cache_dir, "
                            f"or none to decode without caching") from None
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        stem = os.path.join(cache_dir, f"{dataset}_{split}_{image_size}px_{digest}")
        cached, note = _load_cache(stem, key), f"using cache {stem}.npy"
    if cached is None:
        if dataset == "celeba":
            cached = _build_celeba(files, split, image_size, subset_fraction, seed, num_workers, verbose)
        else:
            cached = _build_toyfaces(split, image_size, subset_fraction, seed, num_workers, verbose)
        if cache_dir is not None:
            _save_cache(stem, key, *cached)
            note = f"saved cache {stem}.npy"
    images, attrs, names, n_original, n_skipped = cached
    if verbose:
        print(f"{dataset} {split}: {n_original:,} images in split, using {len(names) + n_skipped:,} "
              f"({100 * subset_fraction:g}%)" + (f"\n{note}" if note else ""))
    return ImageSplit(images=torch.from_numpy(images), attrs=torch.from_numpy(np.array(attrs)), attr_names=attr_names,
                      names=list(names), split=split, n_original=n_original, n_skipped=n_skipped)
