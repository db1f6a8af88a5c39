"""app.py: its handlers on a tiny run (plain values in and out, bad input as one clear UserError), its command-line
errors, and the page itself in headless Chromium (skipped where gradio, selenium or Chromium is missing)."""
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import app
from common import UserError, load_checkpoint
from dataset import TOYFACES_ATTRIBUTES, preprocess_pil, to_float
from fakes import ROOT, assert_user_error, run_here
from generate import EDIT_DEFAULTS, SAMPLE_DEFAULTS, guide_probabilities, load_run, oracle_probabilities

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def models(toy_run):
    return load_run(str(toy_run[0]), torch.device("cpu"))


def face(h=40, w=30, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def p_of(cell: str) -> float:
    """'0.93 present' -> 0.93, checked against its word."""
    p, word = cell.split()
    assert word == ("present" if float(p) > 0.5 else "absent"), cell
    return float(p)


def test_defaults_are_generate_recipes():
    assert app.parse_scales(app.EDIT_SCALES) == EDIT_DEFAULTS["guidance_scale"]
    assert app.parse_scales(app.SAMPLE_SCALES) == SAMPLE_DEFAULTS["guidance_scale"]
    assert app.counterfactual.__defaults__[0] == EDIT_DEFAULTS["strength"]
    assert app.parse_scales("7.5, 15 30") == [7.5, 15.0, 30.0]


def test_counterfactual_of_an_uploaded_image(models):
    upload = face()                                                  # 30x40, not square, not the model's 16 px
    x = to_float(torch.from_numpy(preprocess_pil(upload, 16)).permute(2, 0, 1)[None])
    target = int(guide_probabilities(models, x)[0, models.guide.cfg.target_index] < 0.5)   # what the guide says it is not
    r = app.counterfactual(models, upload, target, scales="30 10000")   # the tiny guide needs a huge scale to change much
    original, cf, diff = (np.array(im) for im in r["images"])
    assert original.shape == cf.shape == diff.shape == (16, 16, 3)
    assert np.array_equal(original, preprocess_pil(upload, 16))      # prepared like the training data
    names = [row[0] for row in r["table"]]
    assert names == [n + " (steered)" if n == models.attribute else n for n in models.attr_names]
    before, after = (oracle_probabilities(models, to_float(torch.from_numpy(a).permute(2, 0, 1)[None]))[0]
                     for a in (original, cf))                        # the oracle on the images the page shows
    for row, b, a in zip(r["table"], before.tolist(), after.tolist()):
        assert abs(p_of(row[1]) - b) < 0.006 and abs(p_of(row[2]) - a) < 0.02, (row, b, a)
    steered = r["table"][models.target_index]
    assert r["flipped_oracle"] == ((p_of(steered[2]) > 0.5) == bool(target)) and isinstance(r["flipped_guide"], bool)
    assert r["scale"] in (30, 10000) and (r["scale"] == 10000 or r["flipped_guide"])   # 30 only if the guide flips
    assert r["seconds"] > 0 and f"scale {r['scale']:g}; {r['seconds']:.1f} s" in r["summary"]
    changed = (original != cf).any(-1)                               # (16, 16)
    assert changed.any() and diff.any(-1)[changed].all()             # the map is lit wherever a pixel changed
    assert (diff == 255).all(-1).any()                               # and white where it changed most


def test_strength_zero_and_the_gradio_payload(models, tmp_path):
    path = tmp_path / "face.png"
    face(20, 20, seed=1).save(path)
    r = app.counterfactual(models, {"path": str(path)}, 0, strength=0.0)    # the dict a browser upload arrives as
    original, cf, diff = (np.array(im) for im in r["images"])
    assert np.array_equal(original, cf) and not diff.any()
    assert all(row[1] == row[2] for row in r["table"])


def test_sample_returns_faces_and_the_oracles_rate(models):
    r = app.sample(models, 0, "0 8", n=3)
    assert set(r["rates"]) == {0.0, 8.0} and len(r["images"]) == 6
    for k, scale in enumerate((0, 8)):
        tiles = r["images"][3 * k:3 * k + 3]
        assert all(im.size == (16, 16) and caption.startswith(f"s={scale} p=") for im, caption in tiles)
        p = [float(caption.split("=")[-1]) for _, caption in tiles]             # p(present) per face
        assert r["rates"][scale] == pytest.approx(np.mean([q < 0.5 for q in p]))
    assert "Smiling absent by the oracle" in r["summary"]


def test_bad_input_is_one_clear_message_and_the_handler_still_works(models, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("1", (6000, 5000)).save(tmp_path / "huge.png")        # 30 MP, a few kB on disk
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(chunk(*c) for c in (   # a header claiming
        (b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)), (b"IDAT", zlib.compress(b"\0" * 10)),
        (b"IEND", b""))))                                   # 400 MP, which PIL's decompression-bomb guard refuses
    for image, message in ((str(tmp_path / "notes.png"), "not a readable image"),
                           (str(tmp_path / "bomb.png"), "over 25 MP; upload a smaller one"),
                           (str(tmp_path / "huge.png"), "6000x5000 is over 25 MP; upload a smaller one"),
                           (None, "no face given")):
        with pytest.raises(UserError, match=message):
            app.counterfactual(models, image, 1)
    for scales in ("abc", "", "-1", "nan", "inf", "30 x", "30 60 30", "²", "1" * 400):
        with pytest.raises(UserError, match="guidance scales"):
            app.counterfactual(models, face(), 1, scales=scales)
        with pytest.raises(UserError, match="guidance scales"):
            app.sample(models, 1, scales)
    with pytest.raises(UserError, match="faces per scale must be 1 or more"):
        app.sample(models, 1, "8", n=0)
    for strength in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="strength must be in"):
            app.counterfactual(models, face(), 1, strength=strength)
    r = app.counterfactual(models, face(), 1, strength=0.0)        # served again after the errors
    assert len(r["images"]) == 3


def test_command_line_errors(toy_run, tmp_path, capsys, monkeypatch):
    out = toy_run[0]
    assert_user_error(run_here("app.py", "--run_dir", tmp_path / "nope", "--device", "cpu", cwd=tmp_path, capsys=capsys,
                               monkeypatch=monkeypatch), "nope", "not found")
    assert_user_error(run_here("app.py", "--device", "cpu", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch),
                      "pass --run_dir")
    files = [out / "diffusion_final.pth", out / "classifier_best.pth", out / "oracle_best.pth"]
    flags = ("--diffusion_model", "--classifier_model", "--oracle_model")
    swapped = [x for pair in zip(flags, [files[1], files[0], files[2]]) for x in pair]
    assert_user_error(run_here("app.py", *swapped, "--device", "cpu", cwd=tmp_path, capsys=capsys,
                               monkeypatch=monkeypatch), "is a classifier checkpoint, expected a diffusion")
    oracle = load_checkpoint(str(files[2]), "oracle")                # an oracle of 32 px images: not this run's
    oracle["image_size"] = 32
    torch.save(oracle, tmp_path / "oracle32.pth")
    assert_user_error(run_here("app.py", "--run_dir", out, "--oracle_model", tmp_path / "oracle32.pth", "--device",
                               "cpu", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch), "32x32", "same run")
    monkeypatch.setitem(sys.modules, "gradio", None)                 # as where only requirements.txt is installed
    assert_user_error(run_here("app.py", "--run_dir", out, "--device", "cpu", cwd=tmp_path, capsys=capsys,
                               monkeypatch=monkeypatch), "gradio cannot be imported", "requirements-app.txt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_in_headless_chromium(toy_run, tmp_path):
    """Upload a face, press the button: the counterfactual, the difference map and the oracle's table appear; a
    broken upload then gives its message while the result stays; the server is stopped at the end."""
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -r requirements-app.txt)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-app.txt)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    if not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)):
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(tmp_path / "server.log", "w")                         # a file: the samplers' progress bars fill pipes
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--run_dir", str(toy_run[0]), "--port",
                               str(port), "--device", "cpu"], cwd=tmp_path, env=env, stdout=log, stderr=log)
    url, t_begin, driver = f"http://127.0.0.1:{port}/", time.time(), None
    try:
        while True:                                                  # until the page answers
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                assert time.time() - t_begin < 90, "the server did not answer within 90 s"
                time.sleep(0.3)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "--window-size=1280,1000"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))
        face().save(tmp_path / "face.png")
        driver.find_elements(By.CSS_SELECTOR, "input[type=file]")[0].send_keys(str(tmp_path / "face.png"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[aria-label='Remove Image']"))   # the upload is in
        t_up, t_press = time.time() - t_begin, time.time()
        driver.find_element(By.ID, "edit").click()
        wait.until(lambda d: "flipped to Smiling present?" in d.find_element(By.TAG_NAME, "body").text)
        print(f"server and page up {t_up:.1f} s after the start; result {time.time() - t_press:.1f} s after the press")
        for panel in ("original", "counterfactual", "difference"):
            img = driver.find_element(By.CSS_SELECTOR, f"#{panel} img")
            assert driver.execute_script("return arguments[0].naturalWidth", img) == 16, panel
        text = driver.find_element(By.TAG_NAME, "body").text
        assert "Smiling (steered)" in text and all(name in text for name in TOYFACES_ATTRIBUTES)   # the oracle's table
        (tmp_path / "broken.png").write_text("not an image")
        driver.find_element(By.CSS_SELECTOR, "button[aria-label='Remove Image']").click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "button[aria-label='Remove Image']"))
        driver.find_elements(By.CSS_SELECTOR, "input[type=file]")[0].send_keys(str(tmp_path / "broken.png"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[aria-label='Remove Image']"))
        driver.find_element(By.ID, "edit").click()
        wait.until(lambda d: "not a readable image" in d.find_element(By.TAG_NAME, "body").text)
        assert driver.find_elements(By.CSS_SELECTOR, "#counterfactual img") and server.poll() is None
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
        log.close()
