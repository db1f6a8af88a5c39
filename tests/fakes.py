"""Fakes shared by the tests: a tiny CelebA folder in either layout."""
import os

import numpy as np
from PIL import Image

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
