"""dataset.py: CelebA reading in both folder layouts (on tiny fake copies), subsets, caching,
unreadable images, user images, and the toyfaces generator (determinism, where each attribute shows)."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import dataset as ds
from dataset import CELEBA_ATTRIBUTES, DataError
from fakes import make_celeba

SPLIT_SIZES = {"train": 24, "valid": 8, "test": 8}


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba_root")
    img_dir, names, labels = make_celeba(root)
    return str(root), img_dir, names, labels


def load(root, split="train", size=16, **kw):
    kw.setdefault("verbose", False)
    return ds.load_split("celeba", split, size, data_root=root, **kw)


# ----------------------------------------------------------------------------------------------
# CelebA

def test_attribute_names_and_index():
    assert len(ds.attribute_names("celeba")) == 40 and ds.attribute_names("celeba")[0] == "5_o_Clock_Shadow"
    assert ds.attribute_index("celeba", "Smiling") == 31
    assert ds.attribute_index("toyfaces", "Smiling") == 0
    assert ds.attribute_names("toyfaces") == ds.TOYFACES_ATTRIBUTES
    assert all(name in ds.CELEBA_ATTRIBUTES for name in ds.TOYFACES_ATTRIBUTES)
    with pytest.raises(DataError) as e:
        ds.attribute_index("celeba", "Smilin")
    msg = str(e.value)
    assert "'Smilin'" in msg and "did you mean 'Smiling'?" in msg and "5_o_Clock_Shadow" in msg
    assert "Young" in msg and "\n" not in msg
    with pytest.raises(DataError, match="did you mean 'Eyeglasses'"):
        ds.attribute_index("toyfaces", "Eyeglases")
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        ds.attribute_names("mnist")


@pytest.mark.parametrize("layout", ["official", "flat", "kaggle"])
def test_layouts_sizes_and_labels(tmp_path, layout, capsys):
    img_dir, names, labels = make_celeba(tmp_path, layout)
    for split, code in (("train", 0), ("valid", 1), ("test", 2)):
        s = ds.load_split("celeba", split, 16, data_root=str(tmp_path), verbose=True)
        n = SPLIT_SIZES[split]
        assert (len(s), s.n_original, s.n_skipped, s.split) == (n // 2, n, 0, split)
        assert s.images.shape == (n // 2, 3, 16, 16) and s.images.dtype == torch.uint8
        assert s.images.is_contiguous()
        assert s.attrs.shape == (n // 2, 40) and s.attrs.dtype == torch.uint8
        assert s.names == sorted(s.names)  # kept in file order
        for k, name in enumerate(s.names):
            i = names.index(name)
            assert (0, 0, 0, 1, 2)[i % 5] == code
            assert s.attrs[k].tolist() == [int(v == 1) for v in labels[i]]  # -1/1 -> 0/1
    out = capsys.readouterr().out
    assert "celeba train: 24 images in split, using 12 (50%)" in out


def test_pixels_and_items(celeba):
    root, img_dir, names, _ = celeba
    s = load(root, size=16)
    expected = ds.preprocess_pil(Image.open(os.path.join(img_dir, s.names[0])), 16)  # (S, S, 3)
    assert torch.equal(s.images[0], torch.from_numpy(expected).permute(2, 0, 1))
    x, y = s[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.shape == (40,)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, s.images[0].float() / 127.5 - 1)
    full = ds.to_float(s.images)
    assert full.min() >= -1 and full.max() <= 1 and full.std() > 0.1


def test_preprocess_crops_the_centre_square():
    img = np.zeros((218, 178, 3), np.uint8)
    img[:20] = 255  # the 20 rows dropped at the top and at the bottom
    img[-20:] = 255
    out = ds.preprocess_pil(Image.fromarray(img), 178)
    assert out.shape == (178, 178, 3) and out.max() == 0
    assert ds.preprocess_pil(Image.new("L", (50, 30), 200), 16).shape == (16, 16, 3)


def test_subset_reproducible_and_seeded(celeba):
    root = celeba[0]
    a, b, c = load(root, seed=0), load(root, seed=0), load(root, seed=1)
    assert a.names == b.names and torch.equal(a.images, b.images)
    assert a.names != c.names and len(c) == len(a)
    every = load(root, subset_fraction=1.0)
    assert len(every) == 24 and every.names == sorted(every.names)
    assert len(load(root, subset_fraction=0.01)) == 1  # at least one image


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5])
def test_subset_fraction_out_of_range(celeba, fraction):
    with pytest.raises(DataError, match=r"--subset_fraction must be in \(0, 1\]"):
        load(celeba[0], subset_fraction=fraction)


def test_missing_files_are_named(tmp_path):
    open(tmp_path / "list_attr_celeba.txt", "w").close()
    with pytest.raises(DataError) as e:
        load(str(tmp_path))
    msg = str(e.value)
    assert "missing list_eval_partition.txt, img_align_celeba/;" in msg
    assert "Kaggle" in msg and "--download" in msg and "--dataset toyfaces" in msg and "\n" not in msg
    with pytest.raises(DataError, match="does not exist"):
        load(str(tmp_path / "nowhere"))


def test_bad_annotation_header(tmp_path):
    make_celeba(tmp_path, "flat", n=5)
    path = tmp_path / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + [lines[1].replace("Smiling", "Smile")] + lines[2:]) + "\n")
    with pytest.raises(DataError, match="40 CelebA attributes"):
        load(str(tmp_path))


def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_corrupt_jpeg_is_skipped(tmp_path, monkeypatch, capsys):
    img_dir, names, _ = make_celeba(tmp_path, "flat")
    truncate(os.path.join(img_dir, names[0]))  # a train image
    monkeypatch.setattr(ds, "MAX_UNREADABLE", 0.1)  # 1 of 24 is fine for this test
    s = load(str(tmp_path), subset_fraction=1.0)
    assert (len(s), s.n_skipped, s.n_original) == (23, 1, 24)
    assert names[0] not in s.names and s.attrs.shape == (23, 40)
    assert f"skipping unreadable image {os.path.join(img_dir, names[0])}" in capsys.readouterr().err


def test_too_many_corrupt_jpegs(tmp_path, monkeypatch, capsys):
    img_dir, names, _ = make_celeba(tmp_path, "flat")
    truncate(os.path.join(img_dir, names[0]))                      # a train image
    os.remove(os.path.join(img_dir, names[5]))                     # the next train image
    monkeypatch.setattr(ds, "MAX_UNREADABLE", 0.05)                # 1 of the 24 train images is fine, 2 are not
    decoded = []
    monkeypatch.setattr(ds, "_decode_file", lambda job, decode=ds._decode_file: decoded.append(job) or decode(job))
    with pytest.raises(DataError) as e:
        load(str(tmp_path), subset_fraction=1.0)
    msg = str(e.value)
    assert "more than 5% of the 24 images of celeba train are unreadable" in msg
    assert names[0] in msg and names[5] in msg and "\n" not in msg
    assert len(decoded) == 4                # it stopped at the second bad one (train images are 0-2, 5-7, ...)
    assert capsys.readouterr().err.count("skipping unreadable image") == 1     # no warning per image after it


@pytest.mark.parametrize("edit, fragment", [
    (lambda lines: lines[:2] + [lines[2].split()[0] + " 300 " + lines[2].split(maxsplit=2)[2]] + lines[3:],
     "bad row for '000001.jpg' (expected a name and 40 values -1/1; 5_o_Clock_Shadow is '300')"),
    (lambda lines: lines[:2] + [line.rsplit(" ", 1)[0] for line in lines[2:]],      # every row one value short
     "bad row for '000001.jpg' (expected a name and 40 values -1/1; got 39 values)"),
    (lambda lines: lines[:3] + [lines[3].split()[0] + " yes " + lines[3].split(maxsplit=2)[2]] + lines[4:],
     "bad row for '000002.jpg' (expected a name and 40 values -1/1; 5_o_Clock_Shadow is 'yes')"),
    (lambda lines: ["0", lines[1]], "lists no images"),
])
def test_bad_annotation_rows_are_named(tmp_path, edit, fragment):
    make_celeba(tmp_path, "flat", n=5)
    path = tmp_path / "list_attr_celeba.txt"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(DataError) as e:
        load(str(tmp_path))
    assert fragment in str(e.value) and "download the annotation file again" in str(e.value)


def test_bad_partition_and_non_text_annotations(tmp_path):
    make_celeba(tmp_path, "flat", n=5)
    part = tmp_path / "list_eval_partition.txt"
    good = part.read_text()
    part.write_text(good.replace("000002.jpg 0", "000002.jpg train"))
    with pytest.raises(DataError, match="gives 000002.jpg the split 'train' \\(expected 0, 1 or 2\\)"):
        load(str(tmp_path))
    part.write_text(good.replace("000003.jpg 0\n", ""))
    with pytest.raises(DataError, match="has no line for 000003.jpg, which list_attr_celeba lists"):
        load(str(tmp_path))
    part.write_bytes(good.encode() + b"\xff\xfe")
    with pytest.raises(DataError, match="is not text \\(byte .* is not UTF-8\\)"):
        load(str(tmp_path))


def test_cache_reuse_and_rebuild(celeba, tmp_path, monkeypatch, capsys):
    root, cache = celeba[0], str(tmp_path / "cache")
    first = load(root, cache_dir=cache, verbose=True)
    assert "saved cache" in capsys.readouterr().out
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 1

    def no_decoding(job):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(ds, "_decode_file", no_decoding)
    again = load(root, cache_dir=cache, verbose=True)
    assert "using cache" in capsys.readouterr().out
    assert torch.equal(first.images, again.images) and torch.equal(first.attrs, again.attrs)
    assert (again.names, again.n_original, again.n_skipped) == (first.names, 24, 0)
    with pytest.raises(AssertionError, match="decoded although cached"):
        load(root, cache_dir=cache, seed=1)  # another key must decode
    monkeypatch.undo()
    load(root, cache_dir=cache, seed=1)
    load(root, size=8, cache_dir=cache)
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 3
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]


def test_damaged_cache_is_rebuilt(celeba, tmp_path, capsys):
    root, cache = celeba[0], str(tmp_path)
    first = load(root, cache_dir=cache)
    (npy,) = [os.path.join(cache, f) for f in os.listdir(cache) if f.endswith(".npy")]
    for size in (100, 0):                   # a half-written file, an empty one
        with open(npy, "r+b") as f:
            f.truncate(size)
        again = load(root, cache_dir=cache)
        assert "ignoring damaged cache" in capsys.readouterr().err
        assert torch.equal(first.images, again.images)
    assert torch.equal(load(root, cache_dir=cache).images, first.images)  # repaired


def test_bad_arguments(celeba):
    with pytest.raises(DataError, match="unknown split 'validation'"):
        load(celeba[0], split="validation")
    with pytest.raises(DataError, match="--image_size must be an integer >= 8"):
        load(celeba[0], size=4)
    with pytest.raises(DataError, match="--seed must be"):
        load(celeba[0], seed=-1)


def test_unwritable_cache_dir(celeba, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match="pass a writable --cache_dir"):
        load(celeba[0], cache_dir=str(tmp_path / "a_file" / "cache"))


def test_workers_give_the_same_arrays(celeba):
    a, b = load(celeba[0], num_workers=0), load(celeba[0], num_workers=2)
    assert a.names == b.names and torch.equal(a.images, b.images) and torch.equal(a.attrs, b.attrs)
    t0 = ds.load_split("toyfaces", "test", 16, subset_fraction=0.05, verbose=False)
    t2 = ds.load_split("toyfaces", "test", 16, subset_fraction=0.05, num_workers=2, verbose=False)
    assert torch.equal(t0.images, t2.images) and torch.equal(t0.attrs, t2.attrs)


def test_download_failure_explains_the_manual_steps(tmp_path, monkeypatch):
    import torchvision.datasets

    def refuse(*args, **kwargs):
        raise RuntimeError("Too many users have viewed or downloaded this file recently")

    monkeypatch.setattr(torchvision.datasets, "CelebA", refuse)
    with pytest.raises(DataError) as e:
        load(str(tmp_path), download=True)
    msg = str(e.value)
    assert "downloading CelebA failed (Too many users" in msg and "list_attr_celeba.txt" in msg
    assert "--dataset toyfaces" in msg and "\n" not in msg


def test_load_image_file(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (30, 50, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "face.png")
    x = ds.load_image_file(str(tmp_path / "face.png"), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    Image.new("L", (40, 60), 100).save(tmp_path / "grey.jpg")
    assert ds.load_image_file(str(tmp_path / "grey.jpg"), 8).shape == (3, 8, 8)
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot read image '.*garbage.jpg'"):
        ds.load_image_file(str(tmp_path / "garbage.jpg"), 16)
    with pytest.raises(DataError, match="not found"):
        ds.load_image_file(str(tmp_path / "missing.png"), 16)


def test_to_float_and_random_flip():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8)
    assert torch.allclose(ds.to_float(x), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)
    batch = torch.arange(64 * 2 * 3 * 4, dtype=torch.float32).view(64, 2, 3, 4)
    out = ds.random_flip(batch, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, b.flip(-1)) for o, b in zip(out, batch)]
    assert all(f or torch.equal(o, b) for f, o, b in zip(flipped, out, batch))
    assert 16 < sum(flipped) < 48
    assert torch.equal(out, ds.random_flip(batch, torch.Generator().manual_seed(0)))


# ----------------------------------------------------------------------------------------------
# toyfaces

def test_toyfaces_split_is_deterministic(tmp_path, capsys):
    a = ds.load_split("toyfaces", "valid", 16, subset_fraction=0.05, seed=0)
    assert "toyfaces valid: 2,000 images in split, using 100 (5%)" in capsys.readouterr().out
    b = ds.load_split("toyfaces", "valid", 16, subset_fraction=0.05, seed=0, verbose=False,
                      data_root=str(tmp_path / "ignored"))
    c = ds.load_split("toyfaces", "valid", 16, subset_fraction=0.05, seed=1, verbose=False)
    assert (len(a), a.n_original, a.n_skipped) == (100, 2000, 0)
    assert a.images.shape == (100, 3, 16, 16) and a.attrs.shape == (100, 5)
    assert torch.equal(a.images, b.images) and a.names == b.names
    assert not torch.equal(a.images, c.images)
    i = int(a.names[3].split("_")[1])  # image i depends only on (seed, split, i)
    img, attrs = ds.draw_toyface((0, 1, i), 16)
    assert torch.equal(a.images[3], torch.from_numpy(img).permute(2, 0, 1))
    assert a.attrs[3].tolist() == attrs.tolist()


def test_toyfaces_cache(tmp_path, monkeypatch):
    a = ds.load_split("toyfaces", "test", 16, subset_fraction=0.02, cache_dir=str(tmp_path), verbose=False)
    monkeypatch.setattr(ds, "_toyface_job", None)  # would fail if called
    b = ds.load_split("toyfaces", "test", 16, subset_fraction=0.02, cache_dir=str(tmp_path), verbose=False)
    assert torch.equal(a.images, b.images) and a.names == b.names and torch.equal(a.attrs, b.attrs)


def test_toyface_attribute_rates():
    attrs = np.stack([ds.draw_toyface((7, 0, i), 16)[1] for i in range(400)])  # (400, 5)
    assert attrs.shape == (400, 5) and attrs.dtype == np.uint8
    assert np.abs(attrs.mean(0) - ds.TOYFACES_PRIORS).max() < 0.08
    assert np.abs(np.corrcoef(attrs.T) - np.eye(5)).max() < 0.2  # independent coin flips


# rows (fractions of the image height) where each attribute must show; columns: the central 60%
REGIONS = {"Smiling": (0.56, 0.86), "Mouth_Slightly_Open": (0.56, 0.86), "Eyeglasses": (0.38, 0.62),
           "Bangs": (0.2, 0.5), "Goatee": (0.68, 1.0)}


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("name", ds.TOYFACES_ATTRIBUTES)
def test_toyface_attribute_changes_only_its_region(name, size):
    S, inside = size, []
    for i in range(30):  # the same face drawn with the attribute on and off, every other one off
        others = {n: 0 for n in ds.TOYFACES_ATTRIBUTES}
        on, a_on = ds.draw_toyface((5, 0, i), S, {**others, name: 1})
        off, a_off = ds.draw_toyface((5, 0, i), S, {**others, name: 0})
        k = ds.TOYFACES_ATTRIBUTES.index(name)
        assert a_on[k] == 1 and a_off[k] == 0
        diff = np.abs(on.astype(float) - off).sum(-1)  # (S, S), summed over RGB
        assert diff.max() > 40 and diff.sum() > 120 * (S / 16) ** 2  # clearly visible
        lo, hi = REGIONS[name]
        inside.append(diff[int(lo * S):int(np.ceil(hi * S)), int(0.2 * S):int(0.8 * S)].sum() / diff.sum())
    assert min(inside) > {"Bangs": 0.7, "Eyeglasses": 0.85}.get(name, 0.9), inside


def test_toyface_counterfactuals_are_the_same_faces_redrawn():
    names = ["toyface_000003", "toyface_000010"]
    for value in (0, 1):
        cf = ds.toyface_counterfactuals(names, "test", 16, 0, "Smiling", value)
        assert cf.shape == (2, 3, 16, 16) and cf.dtype == np.uint8
        for name, img in zip(names, cf):
            i = int(name.split("_")[1])
            original, attrs = ds.draw_toyface((0, ds.SPLITS.index("test"), i), 16)
            if attrs[0] == value:                        # already has the value: the counterfactual is the face
                assert np.array_equal(img, original.transpose(2, 0, 1))
            else:
                assert not np.array_equal(img, original.transpose(2, 0, 1))
                expected, a = ds.draw_toyface((0, ds.SPLITS.index("test"), i), 16, {"Smiling": value})
                assert np.array_equal(img, expected.transpose(2, 0, 1)) and a[0] == value


def test_toyface_canvas_sizes():
    for size in (8, 16, 64):
        img, attrs = ds.draw_toyface((0, 0, 0), size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8 and attrs.shape == (5,)
    with pytest.raises(DataError, match="unknown attribute"):
        ds.draw_toyface((0, 0, 0), 16, {"Smile": 1})


def test_a_split_too_big_for_memory_is_a_clear_error():
    with pytest.raises(DataError, match=r"at 100000x100000 need .* GiB, more memory than this machine gives"):
        ds.load_split("toyfaces", "train", 100000, "./data", 0.5, 0, None, False, 0, verbose=False)


def test_cache_follows_the_annotation_files(celeba, tmp_path):
    # a changed label or a changed split assignment: the next load decodes afresh
    root = tmp_path / "root"
    shutil.copytree(celeba[0], root)
    base, cache = root / "celeba", str(tmp_path / "cache")
    first = load(str(root), cache_dir=cache)
    name, col = first.names[0], CELEBA_ATTRIBUTES.index("Smiling")
    attr = base / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith(name))
    fields = lines[row].split()
    fields[1 + col] = "1" if fields[1 + col] == "-1" else "-1"             # flip one label
    lines[row] = " ".join(fields)
    attr.write_text("\n".join(lines) + "\n")
    relabelled = load(str(root), cache_dir=cache)
    assert relabelled.names == first.names and torch.equal(relabelled.images, first.images)
    assert relabelled.attrs[0, col] == 1 - first.attrs[0, col]
    part = base / "list_eval_partition.txt"
    part.write_text(part.read_text().replace(f"{name} 0", f"{name} 2"))     # move it to the test split
    assert name not in load(str(root), cache_dir=cache, subset_fraction=1.0).names
    assert name in load(str(root), split="test", cache_dir=cache, subset_fraction=1.0).names
